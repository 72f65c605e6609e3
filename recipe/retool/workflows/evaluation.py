"""The Modal app's evaluation on the volumes: one checkpoint, or an experiment's base vs SFT vs
DAPO side by side, with the tool sandbox DAPO's nodes get (this node's, else the pool); then its
numbers and plots to wandb (project ``retool-eval``) where it is configured."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from recipe.retool.core.constants import EVAL_PROJECT
from recipe.retool.core.paths import EVAL_SETS, Layout
from recipe.retool.eval.checkpoints import CheckpointRef, eval_dir, report_dir, resolve_checkpoint
from recipe.retool.eval.config import EvalConfig
from recipe.retool.eval.report import show_summary
from recipe.retool.eval.runner import evaluate_checkpoint
from recipe.retool.records import tracking
from recipe.retool.stages.tool_sandbox import tool_sandbox
from recipe.retool.workflows.pipeline import evaluate_experiment


@dataclass(frozen=True)
class Evaluated:
    result: dict[str, Any]
    experiment: str  # "" for one checkpoint
    checkpoint: CheckpointRef | None


def evaluate_on_volumes(
    layout: Layout,
    deployed_url: Callable[[], str],
    *,
    checkpoint: str = "latest",
    n: int = 0,
    max_problems: int = 0,
    experiment: str = "",
    force: bool = False,
) -> Evaluated:
    """Run the evaluation; a mistake raises ``EvalError``, ``LaunchError``,
    ``CheckpointNotFound`` or ``NodeSandboxError`` with one line."""
    cfg = EvalConfig.from_yaml()
    cfg = replace(cfg, n=n or cfg.n, max_problems=max_problems or cfg.max_problems)
    with tool_sandbox(None, deployed_url=deployed_url) as sandbox_url:
        if experiment:
            files = evaluate_experiment(layout, experiment, sandbox_url, cfg, backend="vllm")
            return Evaluated({"comparison": [str(f) for f in files]}, experiment, None)
        ref = resolve_checkpoint(checkpoint, layout)
        datasets = {name: layout.rl_file(name) for name in EVAL_SETS}
        out_dir = report_dir(eval_dir(layout, ref.label), force=force)
        result = evaluate_checkpoint(ref.path, datasets, out_dir, cfg, sandbox_url, "vllm",
                                     checkpoint=ref)  # fmt: skip
        return Evaluated(result, "", ref)


def report(layout: Layout, evaluated: Evaluated) -> None:
    """Print the comparison (or the checkpoint's summary table and plots) and log the numbers."""
    if evaluated.experiment:
        compare = Path(evaluated.result["comparison"][0])
        print(compare.read_text())
        plots, run = {"compare": compare.with_suffix(".png")}, evaluated.experiment
        numbers = tracking.flat_numbers(json.loads(compare.with_suffix(".json").read_text()))
    else:
        ref = evaluated.checkpoint
        plots = {p.stem: p for p in show_summary(evaluated.result, ref, layout)}
        run, numbers = ref.label, tracking.flat_numbers(evaluated.result["datasets"])
    tracking.log_results(layout, project=EVAL_PROJECT, run=f"eval-{run}", metrics=numbers,
                         images=plots)  # fmt: skip
