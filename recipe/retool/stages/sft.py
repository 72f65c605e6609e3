"""Cold-start SFT: validate, run verl's SFT trainer under torchrun, record the final checkpoint."""

from __future__ import annotations

import os
import time
from pathlib import Path

from recipe.retool.core.paths import (
    Layout,
    Origin,
)
from recipe.retool.core.request import LaunchError, LaunchRequest, production_sized
from recipe.retool.core.topology import Topology
from recipe.retool.launch.commands import override_value, sft_command, sft_overrides
from recipe.retool.launch.cost import estimate_cost
from recipe.retool.launch.validation import validate
from recipe.retool.records import tracking
from recipe.retool.records.tracking import default_experiment
from recipe.retool.stages.process import TRAINING_ENV, Runner, run_subprocess
from recipe.retool.stages.record import (
    StageResult,
    check_origin,
    metrics_file_env,
    record_run,
    write_report,
)


def check_sft_inputs(layout: Layout, model: Path, request: LaunchRequest) -> None:
    """:class:`~recipe.retool.core.request.LaunchError` unless SFT's data (or a
    ``data.train_files`` override) and base model are where the run will read them."""
    given = any("data.train_files" in o for o in request.overrides)
    if not layout.sft_train_file().exists() and not given:
        raise LaunchError(f"no SFT data at {layout.sft_train_file()}: run prep_dataset first")
    if not (Path(model) / "config.json").exists():
        raise LaunchError(f"no model at {model}: run download_model first")


def run_sft(
    layout: Layout,
    topo: Topology,
    request: LaunchRequest,
    *,
    model_path: Path | None = None,
    runner: Runner = run_subprocess,
    launch_id: str | None = None,
) -> StageResult:
    """Validate, run verl's SFT trainer, record the final checkpoint in checkpoint_info.json.

    ``launch_id``: see :func:`default_experiment`."""
    if topo.nnodes > 1 and not request.experiment:
        raise LaunchError("multi-node runs need --experiment-name (shared by all nodes)")
    experiment = request.experiment or default_experiment("sft", launch_id)
    model = model_path or layout.model_dir()
    overrides = sft_overrides(layout, experiment, model, topo, request.overrides)
    tracking.check_wandb(validate("sft", overrides, topo), os.environ)
    check_sft_inputs(layout, model, request)
    origin = Origin(str(model), override_value(overrides, "data.train_files") or "")
    check_origin(layout, "sft", experiment, origin, allow_other=request.allow_other_base,
                 write=topo.node_rank == 0)  # fmt: skip
    if topo.device == "cuda" and production_sized(request, model_path):
        print(estimate_cost("sft", topo), flush=True)
    command = sft_command(overrides, topo)
    env = dict(TRAINING_ENV) if topo.device == "cuda" else {}
    if topo.node_rank == 0:  # verl logs on rank 0 only
        env |= metrics_file_env(layout, "sft", experiment) | tracking.run_env(
            layout, "sft", experiment
        )
    start = time.time()
    try:
        code = runner(command, env)
    finally:
        if topo.node_rank == 0:
            write_report(layout, "sft", experiment)
    ckpt = record_run(layout, "sft", experiment, origin, code) if topo.node_rank == 0 else None
    return StageResult("sft", experiment, code, ckpt, time.time() - start)
