"""DAPO from an SFT checkpoint on one node or a Ray cluster, with the tool pointed at a sandbox
(each node's own unless told otherwise: :mod:`.tool_sandbox`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from recipe.retool.core.paths import (
    Layout,
    Origin,
    read_checkpoint_info,
    resolve_sft_checkpoint,
)
from recipe.retool.core.request import LaunchRequest, production_sized
from recipe.retool.core.topology import Topology
from recipe.retool.launch.commands import override_value, ray_address
from recipe.retool.launch.cost import estimate_cost
from recipe.retool.records import tracking
from recipe.retool.records.tracking import default_experiment
from recipe.retool.stages.process import TRAINING_ENV, Runner, run_subprocess
from recipe.retool.stages.ray_cluster import RAY_CLUSTER_ENV, RAY_METRICS_OFF_ENV, join_ray_cluster
from recipe.retool.stages.record import (
    StageResult,
    check_origin,
    metrics_file_env,
    record_run,
    write_report,
)


def _from_configured_model(layout: Layout, sft_step: Path) -> bool:
    """Whether an SFT checkpoint was trained from the configured base model, as its run's
    ``checkpoint_info.json`` records (the smoke's DAPO starts from an SFT of a tiny model)."""
    root = layout.stage_root("sft")
    if not sft_step.is_relative_to(root):
        return False
    info = read_checkpoint_info(layout, "sft", sft_step.relative_to(root).parts[0])
    return info is not None and info.base_model == str(layout.model_dir())


def run_dapo(
    layout: Layout,
    topo: Topology,
    request: LaunchRequest,
    *,
    sandbox_url: str,
    runner: Runner = run_subprocess,
    launch_id: str | None = None,
) -> StageResult:
    """DAPO from the latest SFT checkpoint, with the tool pointed at ``sandbox_url``.

    ``launch_id``: see :func:`default_experiment`."""
    experiment = request.experiment or default_experiment("dapo", launch_id)
    start_from = resolve_sft_checkpoint(layout, request.sft_checkpoint)
    # verl's loggers: the metrics file of this attempt, and the experiment's one wandb run.
    metrics_env = metrics_file_env(layout, "dapo", experiment) | tracking.run_env(
        layout, "dapo", experiment
    )
    env = dapo_env(sandbox_url) | metrics_env
    job_env: list[str] = []
    if topo.nnodes > 1:  # join the Ray cluster that join_ray_cluster started
        env |= RAY_CLUSTER_ENV | {"RAY_ADDRESS": ray_address(topo)}
        # verl logs from a Ray actor, which on a cluster inherits its node's `ray start`
        # environment, not main_ppo's: the metrics path travels in the job's runtime env.
        job_env = [
            f"++ray_kwargs.ray_init.runtime_env.env_vars.{k}={v}" for k, v in metrics_env.items()
        ]
    from recipe.retool.launch.async_plan import plan_dapo

    plan = plan_dapo(layout, experiment, start_from, topo, request, job_env)
    for note in plan.notes:
        print(note, flush=True)
    origin = Origin(str(start_from), override_value(plan.overrides, "data.train_files") or "")
    check_origin(layout, "dapo", experiment, origin, allow_other=request.allow_other_base,
                 write=True)  # fmt: skip
    tracking.check_wandb(plan.composed, os.environ)
    print(f"DAPO starts from {start_from}", flush=True)
    if (
        topo.device == "cuda"
        and production_sized(request)
        and _from_configured_model(layout, start_from)
    ):
        print(estimate_cost("dapo", topo), flush=True)
    start = time.time()
    try:
        code = runner(plan.command, env)
    finally:
        write_report(layout, "dapo", experiment)
    ckpt = record_run(layout, "dapo", experiment, origin, code)
    return StageResult("dapo", experiment, code, ckpt, time.time() - start)


def dapo_on_node(
    layout: Layout,
    topo: Topology,
    request: LaunchRequest,
    *,
    deployed_url: Callable[[], str],
    runner: Runner = run_subprocess,
    launch_id: str | None = None,
) -> StageResult | None:
    """What every node of a DAPO job does: start the tool's sandbox (this node's own unless
    ``SANDBOX_FUSION_ENDPOINT`` or ``--sandbox=deployed`` says otherwise; ``tool_sandbox.py``),
    then, on several nodes, join the Ray cluster with the tool pointed at it; node 0 runs
    ``main_ppo``. A worker node returns ``None`` once the cluster ends; its sandbox stops then.

    The sandbox's self-test also checks that no call reaches the Ray head. A pool of Modal
    Sandboxes is tagged with the experiment and node, so a retried attempt's start ends what a
    killed one left behind, and it writes its report (calls, latency, cost) beside the run's."""
    from recipe.retool.stages.tool_sandbox import modal_sandbox, node_sandbox, tool_sandbox

    experiment = request.experiment or default_experiment("dapo", launch_id)
    head = ray_address(topo) if topo.nnodes > 1 else ""
    pooled = []

    def start_pool():
        pooled.append(True)
        return modal_sandbox(overrides=request.overrides, nodes=topo.nnodes,
                             name=f"{experiment}-node{topo.node_rank}", targets=head,
                             report_dir=layout.experiment_dir("dapo", experiment))  # fmt: skip

    with tool_sandbox(
        request.sandbox,
        deployed_url=deployed_url,
        start_node=lambda: node_sandbox(head),
        start_pool=start_pool,
    ) as sandbox_url:
        if topo.nnodes > 1:
            join_ray_cluster(topo, dapo_env(sandbox_url), runner=runner)
            if topo.node_rank > 0:
                return None  # served the cluster until the job ended
        result = run_dapo(
            layout, topo, request, sandbox_url=sandbox_url, runner=runner, launch_id=launch_id
        )
    if pooled:  # the pool wrote its report (calls, latency, cost) at its close: into the run's
        write_report(layout, "dapo", experiment)
    return result


def dapo_env(sandbox_url: str) -> dict[str, str]:
    """Environment of every DAPO process: main_ppo *and* each Ray node, whose workers run the
    tool (its yaml reads SANDBOX_FUSION_ENDPOINT inside the agent-loop actors). Whichever of them
    starts Ray (main_ppo's own ``ray.init`` on one node, ``ray start`` on several) starts it
    without its open metrics ports (:data:`RAY_METRICS_OFF_ENV`)."""
    return {**TRAINING_ENV, **RAY_METRICS_OFF_ENV, "SANDBOX_FUSION_ENDPOINT": sandbox_url}
