"""The pipeline's stages as plain functions: what Modal, docker compose and the CPU smoke all run.

Each function takes a :class:`~recipe.retool.core.paths.Layout` (where things live) and a
:class:`~recipe.retool.Topology` (where it runs), so the Modal app is a thin shell and the
same code is tested on temporary directories. Training stays a subprocess (torchrun / main_ppo)
so verl's own entry points run unmodified.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from recipe.retool import launch, run_metrics, tracking
from recipe.retool.core.constants import RAY_TOKEN_ENV
from recipe.retool.core.paths import (
    BASE_MODEL_ID,
    BASE_MODEL_REVISION,
    Checkpoint,
    CheckpointInfo,
    CheckpointNotFound,
    Layout,
    Origin,
    Stage,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint_info,
    read_origin,
    resolve_model_dir,
    weights_problem,
    write_checkpoint_info,
    write_origin,
)
from recipe.retool.core.request import LaunchError, LaunchRequest
from recipe.retool.core.topology import Topology
from recipe.retool.tracking import default_experiment

Runner = Callable[[Sequence[str], dict[str, str]], int]

# Environment for every training subprocess. expandable_segments breaks CUDA IPC weight sync
# (pidfd_getfd: Operation not permitted) on Modal; NVLink multicast is unsupported there.
TRAINING_ENV = {
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False",
    "NCCL_NVLS_ENABLE": "0",
    "TOKENIZERS_PARALLELISM": "true",
    "HYDRA_FULL_ERROR": "1",
}
COMPLETE_MARKER = ".download-complete"


def run_subprocess(command: Sequence[str], env: dict[str, str], stdout: IO | None = None) -> int:
    """Run a training command with the project importable, streaming its output (to ``stdout``,
    stderr included, when given)."""
    repo_root = str(Path(__file__).resolve().parents[2])
    merged = {**os.environ, **env}
    merged["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, merged.get("PYTHONPATH")]))
    stderr = subprocess.STDOUT if stdout is not None else None
    return subprocess.run(
        list(command), env=merged, check=False, stdout=stdout, stderr=stderr
    ).returncode


def check_credentials(env: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """Warnings about missing secrets, by name only (values are never printed). wandb's key is
    not a warning but a launch error where the run logs to wandb (``tracking.check_wandb``)."""
    notes = []
    if not env.get("HF_TOKEN"):
        notes.append("HF_TOKEN is not set: public models and datasets still download, rate-limited")
    return notes


@dataclass(frozen=True)
class StageResult:
    stage: Stage
    experiment: str
    returncode: int
    checkpoint: Checkpoint | None
    seconds: float


def metrics_file_env(layout: Layout, stage: Stage, experiment: str) -> dict[str, str]:
    """``VERL_FILE_LOGGER_PATH`` for verl's ``file`` logger (on in sft.yaml and dapo.yaml): one
    file per attempt under ``<experiment>/metrics/`` (the logger truncates on open), all of which
    :func:`run_summary` reads."""
    log_dir = run_metrics.metrics_dir(layout.experiment_dir(stage, experiment))
    log_dir.mkdir(parents=True, exist_ok=True)
    return {"VERL_FILE_LOGGER_PATH": str(log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.jsonl")}


def run_summary(layout: Layout, stage: Stage, experiment: str) -> dict[str, Any]:
    """What ``checkpoint_info.json`` records of a run, from the metrics verl logged over every
    attempt (a step logged again after a resume counts once, its last value kept):

    * both stages: ``steps``, the last step logged;
    * SFT: ``train_loss`` of that step, ``tokens`` trained on, and ``val_loss`` when validated;
    * DAPO: ``reward_mean`` of the last step, ``val_steps`` and ``val_acc`` (mean@k accuracy) in
      the order validation ran.

    ``{}`` when verl logged nothing (a ``trainer.logger`` override without ``file``);
    ``{"unreadable": reason}`` when a metrics file cannot be parsed.
    """
    try:
        rows = run_metrics.read_run(layout.experiment_dir(stage, experiment))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}
    if stage == "dapo":
        summary = run_metrics.summarize(rows)
        if not summary.steps:
            return {}
        return {
            "steps": summary.train_steps[-1],
            "reward_mean": summary.reward_mean[-1],
            "val_steps": summary.val_steps,
            "val_acc": summary.val_acc,
        }
    train = [(step, data) for step, data in rows if "train/loss" in data]
    if not train:
        return {}
    metrics: dict[str, Any] = {
        "steps": train[-1][0],
        "train_loss": float(train[-1][1]["train/loss"]),
        "tokens": int(sum(data.get("train/global_tokens", 0) for _, data in train)),
    }
    val = [data["val/loss"] for _, data in rows if "val/loss" in data]
    if val:
        metrics["val_loss"] = float(val[-1])
    return metrics


def check_origin(
    layout: Layout, stage: Stage, experiment: str, origin: Origin, *, allow_other: bool, write: bool
) -> None:
    """Refuse to resume ``experiment`` from another base model or dataset than it was started
    with (its weights would continue under a record that names the new ones), unless
    ``allow_other`` (``--allow-other-base``). ``write``: record ``origin`` (the node that runs
    the trainer; every node checks)."""
    recorded = read_origin(layout, stage, experiment)
    if recorded is not None and recorded != origin:
        changed = [
            f"{what} {old} (now {new})"
            for what, old, new in (
                ("base model", recorded.base_model, origin.base_model),
                ("data", recorded.data, origin.data),
            )
            if old and old != new
        ]
        if changed and not allow_other:
            raise LaunchError(
                f"experiment {experiment!r} was started from {' and '.join(changed)}: pick "
                "another --experiment-name, or pass --allow-other-base to resume it anyway"
            )
        if changed:
            print(f"note: {experiment} resumes with {'; '.join(changed)}", flush=True)
    if write and recorded != origin:
        write_origin(layout, stage, experiment, origin)


def _record(
    layout: Layout, stage: Stage, experiment: str, origin: Origin, returncode: int
) -> Checkpoint | None:
    """The run's newest complete checkpoint; ``checkpoint_info.json`` only when the run finished,
    with the run's numbers (:func:`run_summary`).

    The info file is the pipeline's "stage done" marker, so an interrupted run (whose partial
    progress verl resumes from) never writes it.
    """
    _make_portable(layout.experiment_dir(stage, experiment))
    try:
        ckpt = latest_checkpoint(layout, stage, experiment)
    except CheckpointNotFound:
        return None
    if returncode != 0:
        return ckpt
    metrics = run_summary(layout, stage, experiment)
    write_checkpoint_info(
        layout,
        CheckpointInfo(experiment, stage, ckpt.step, str(ckpt.hf_dir), origin.base_model,
                       metrics=metrics, data=origin.data),
    )  # fmt: skip
    return ckpt


def _report(layout: Layout, stage: Stage, experiment: str) -> None:
    """The run's ``report.md``/``report.png`` from its metrics, brought up to date whenever the
    trainer returns (finished, failed or interrupted); a report never fails the run it describes."""
    from recipe.retool.run_report import write_run_report

    try:
        write_run_report(layout.experiment_dir(stage, experiment), stage)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"note: no run report ({type(exc).__name__}: {exc})", flush=True)


def _make_portable(experiment_dir: Path) -> None:
    """Every checkpoint's Hugging Face config loads with plain transformers, whatever attention
    the run trained with (``varlen_attention.make_portable``)."""
    from recipe.retool.verl_plugins.varlen_attention import make_portable

    for config in experiment_dir.glob("global_step_*/**/huggingface/config.json"):
        make_portable(config.parent)


def _production_sized(request: LaunchRequest, model_path: Path | None = None) -> bool:
    """Whether a run trains the configured model on the prepared data: the cost line's estimate
    (``estimate_hours``) is for that run only, and would be wrong by orders of magnitude for the
    smoke's or the learning curve's small models and data."""
    return model_path is None and not any(
        o.startswith("data.train_files=") for o in request.overrides
    )


def _from_configured_model(layout: Layout, sft_step: Path) -> bool:
    """Whether an SFT checkpoint was trained from the configured base model, as its run's
    ``checkpoint_info.json`` records (the smoke's DAPO starts from an SFT of a tiny model)."""
    root = layout.stage_root("sft")
    if not sft_step.is_relative_to(root):
        return False
    info = read_checkpoint_info(layout, "sft", sft_step.relative_to(root).parts[0])
    return info is not None and info.base_model == str(layout.model_dir())


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
    overrides = launch.sft_overrides(layout, experiment, model, topo, request.overrides)
    tracking.check_wandb(launch.validate("sft", overrides, topo), os.environ)
    check_sft_inputs(layout, model, request)
    origin = Origin(str(model), launch.override_value(overrides, "data.train_files") or "")
    check_origin(layout, "sft", experiment, origin, allow_other=request.allow_other_base,
                 write=topo.node_rank == 0)  # fmt: skip
    if topo.device == "cuda" and _production_sized(request, model_path):
        print(launch.estimate_cost("sft", topo), flush=True)
    command = launch.sft_command(overrides, topo)
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
            _report(layout, "sft", experiment)
    ckpt = _record(layout, "sft", experiment, origin, code) if topo.node_rank == 0 else None
    return StageResult("sft", experiment, code, ckpt, time.time() - start)


def resolve_sft_checkpoint(layout: Layout, requested: str | None) -> Path:
    """``--sft-checkpoint`` (a path or an SFT experiment name), else the latest complete SFT step.

    Always a directory with Hugging Face weights: verl writes ``huggingface/`` with config only
    unless ``hf_model`` is saved, and such a step is refused here, not after the GPUs start.
    """
    if not requested:
        return latest_checkpoint(layout, "sft").hf_dir
    is_path = "/" in requested or Path(requested).exists()
    return resolve_model_dir(layout, requested if is_path else f"sft/{requested}")


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
        env |= RAY_CLUSTER_ENV | {"RAY_ADDRESS": launch.ray_address(topo)}
        # verl logs from a Ray actor, which on a cluster inherits its node's `ray start`
        # environment, not main_ppo's: the metrics path travels in the job's runtime env.
        job_env = [
            f"++ray_kwargs.ray_init.runtime_env.env_vars.{k}={v}" for k, v in metrics_env.items()
        ]
    from recipe.retool.async_dapo import plan_dapo

    plan = plan_dapo(layout, experiment, start_from, topo, request, job_env)
    for note in plan.notes:
        print(note, flush=True)
    origin = Origin(
        str(start_from), launch.override_value(plan.overrides, "data.train_files") or ""
    )
    check_origin(layout, "dapo", experiment, origin, allow_other=request.allow_other_base,
                 write=True)  # fmt: skip
    tracking.check_wandb(plan.composed, os.environ)
    print(f"DAPO starts from {start_from}", flush=True)
    if (
        topo.device == "cuda"
        and _production_sized(request)
        and _from_configured_model(layout, start_from)
    ):
        print(launch.estimate_cost("dapo", topo), flush=True)
    start = time.time()
    try:
        code = runner(plan.command, env)
    finally:
        _report(layout, "dapo", experiment)
    ckpt = _record(layout, "dapo", experiment, origin, code)
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
    ``main_ppo``. A worker node returns ``None`` once the cluster ends; its sandbox stops then."""
    from recipe.retool.tool_sandbox import tool_sandbox

    with tool_sandbox(request.sandbox, deployed_url=deployed_url) as sandbox_url:
        if topo.nnodes > 1:
            join_ray_cluster(topo, dapo_env(sandbox_url), runner=runner)
            if topo.node_rank > 0:
                return None  # served the cluster until the job ended
        return run_dapo(
            layout, topo, request, sandbox_url=sandbox_url, runner=runner, launch_id=launch_id
        )


def dapo_env(sandbox_url: str) -> dict[str, str]:
    """Environment of every DAPO process: main_ppo *and* each Ray node, whose workers run the
    tool (its yaml reads SANDBOX_FUSION_ENDPOINT inside the agent-loop actors). Whichever of them
    starts Ray (main_ppo's own ``ray.init`` on one node, ``ray start`` on several) starts it
    without its open metrics ports (:data:`RAY_METRICS_OFF_ENV`)."""
    return {**TRAINING_ENV, **RAY_METRICS_OFF_ENV, "SANDBOX_FUSION_ENDPOINT": sandbox_url}


# Ray 2.60 serves Prometheus metrics, without its token, on every interface from three processes,
# whatever --node-ip-address says (a loopback one is replaced by the routable address):
# - the dashboard agent's exporter (--metrics-export-port): off with enable_metrics_collection=0,
#   which the raylet turns into the agent's --disable-metrics-collection;
# - the dashboard head's (44227) and the autoscaler monitor's (44217): Ray offers no host for
#   them and catches any error starting them (dashboard/head.py, autoscaler/_private/monitor.py),
#   so a port they cannot bind leaves them off. Nothing in a run reads these metrics.
# What stays open then (docs/sandbox-security.md, "What stays open"): Ray's gRPC ports (GCS,
# raylets, workers, the agent), which demand RAY_AUTH_TOKEN; the dashboard on 127.0.0.1 and the
# agents on the node's own address, which answer 401 without it.
RAY_METRICS_OFF_ENV = {
    "RAY_enable_metrics_collection": "0",
    "DASHBOARD_METRIC_PORT": "-1",
    "AUTOSCALER_METRIC_PORT": "-1",
}


# Ray 2.60 turns token authentication on by itself only for a process that starts a cluster
# (`ray start --head`, a local ray.init); a node joining with `ray start --address`, or a driver
# connecting, leaves it off and sends no token, and the head refuses it ("InvalidAuthToken")
# (ray/_private/authentication/authentication_token_setup.py). Every process of a multi-node run
# names the mode, and every node holds the same token in RAY_AUTH_TOKEN, which Ray reads before
# ~/.ray/auth_token: the containers of a Modal cluster share no home directory, so a token the
# head generated there would reach no other node. The Modal app hands every node the same
# per-launch token as a secret (modal_common.ray_cluster_secret).
RAY_CLUSTER_ENV = {"RAY_AUTH_MODE": "token"}


def _alive_ray_nodes(env: dict[str, str]) -> int:
    """Alive nodes of the cluster at ``RAY_ADDRESS`` (0 while it does not answer)."""
    probe = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, **env}, check=False)  # fmt: skip
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout else 0


def _head_listens(topo: Topology) -> bool:
    """Whether the Ray head's GCS port accepts connections yet."""
    try:
        with socket.create_connection((topo.master_addr, launch.RAY_PORT), timeout=2):
            return True
    except OSError:
        return False


def join_ray_cluster(
    topo: Topology,
    env: dict[str, str],
    *,
    runner: Runner = run_subprocess,
    alive_nodes: Callable[[dict[str, str]], int] = _alive_ray_nodes,
    head_listens: Callable[[Topology], bool] | None = None,
    timeout_s: float = 900,
    poll_s: float = 5,
) -> None:
    """Multi-node DAPO: node 0 starts the Ray head and waits for every node; the others join
    once the head listens (a ``ray start`` aimed at no head waits minutes for the GCS before it
    fails, measured with Ray 2.60) and serve until the cluster ends. Every node must hold the
    same ``RAY_AUTH_TOKEN`` (in ``env`` or this process's environment)."""
    if not (env.get(RAY_TOKEN_ENV) or os.environ.get(RAY_TOKEN_ENV)):
        raise LaunchError(
            f"multi-node DAPO needs {RAY_TOKEN_ENV}, the same on every node (the Modal app's "
            "train_dapo_multinode sets it)"
        )
    command = launch.ray_node_command(topo)
    env = {**env, **RAY_CLUSTER_ENV}
    deadline = time.monotonic() + timeout_s
    if topo.node_rank == 0:
        if runner(command, env) != 0:
            raise RuntimeError("the Ray head did not start")
        head_env = env | {"RAY_ADDRESS": launch.ray_address(topo)}
        while (alive := alive_nodes(head_env)) < topo.nnodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{alive} of {topo.nnodes} nodes joined within {timeout_s:.0f} s"
                )
            time.sleep(poll_s)
        return
    while True:
        if (head_listens or _head_listens)(topo):
            started = time.monotonic()
            if runner(command, env) == 0 or time.monotonic() - started > 60:
                return  # joined and served until the cluster went away
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not join the Ray head at {topo.master_addr}")
        time.sleep(poll_s)


def download_model(
    layout: Layout,
    model_id: str = BASE_MODEL_ID,
    revision: str = BASE_MODEL_REVISION,
    *,
    force: bool = False,
    downloader: Callable[..., str] | None = None,
) -> Path:
    """Snapshot a model into the models volume; resumable, and skipped once complete."""
    target = layout.model_dir(model_id)
    marker = target / COMPLETE_MARKER
    if marker.exists() and marker.read_text().strip() == revision and not force:
        print(f"{model_id}@{revision[:12]} already complete at {target}")
        return target
    if downloader is None:
        from huggingface_hub import snapshot_download as downloader
    target.mkdir(parents=True, exist_ok=True)
    downloader(
        repo_id=model_id,
        revision=revision,
        local_dir=str(target),
        token=os.environ.get("HF_TOKEN") or None,
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
    )
    if not (target / "config.json").exists():
        raise RuntimeError(f"download of {model_id} finished without config.json in {target}")
    marker.write_text(revision + "\n")
    return target


def describe_checkpoints(layout: Layout) -> str:
    """A table of every checkpoint per stage and experiment, marking partial saves."""
    lines = [f"{'stage':<5} {'experiment':<32} {'step':>6}  {'status':<8} path"]
    for stage in ("sft", "dapo"):
        ckpts = list_checkpoints(layout, stage)
        for ckpt in sorted(ckpts, key=lambda c: (c.experiment, c.step)):
            status = "complete" if ckpt.complete else "partial"
            why = f"  ({ckpt.problem})" if ckpt.problem else ""
            lines.append(
                f"{stage:<5} {ckpt.experiment:<32} {ckpt.step:>6}  {status:<8} {ckpt.path}{why}"
            )
        for exp in sorted({c.experiment for c in ckpts}):
            if read_checkpoint_info(layout, stage, exp) is None:
                lines.append(f"{stage:<5} {exp:<32} {'':>6}  note     checkpoint_info.json missing")
    if len(lines) == 1:
        lines.append("(no checkpoints yet: run `make sft`)")
    return "\n".join(lines)


class WeightsExist(ValueError):
    """A merge would replace loadable Hugging Face weights and was not forced."""


MERGE_STAGING = ".huggingface.merging"  # the merger's output until it is checked and renamed
MERGE_REPLACED = ".huggingface.replaced"  # forced: the old weights until the new are in place


def merge_checkpoint(
    layout: Layout,
    stage: Stage,
    experiment: str,
    step: int,
    *,
    force: bool = False,
    runner: Runner = run_subprocess,
) -> Path:
    """FSDP shards → HF safetensors with verl's model merger (for steps saved without them).

    Never in place: the merger writes to a staging directory next to ``huggingface/``, the result
    must load (:func:`~recipe.retool.core.paths.weights_problem`), and only then is it renamed into
    place, so a merge killed at any moment leaves the step as it was. Loadable weights already
    there are replaced only with ``force``, and are kept until the new ones are in place."""
    step_dir = layout.experiment_dir(stage, experiment) / f"global_step_{step}"
    shards = step_dir if stage == "sft" else step_dir / "actor"
    if not (shards / "fsdp_config.json").exists():
        raise CheckpointNotFound(f"no FSDP checkpoint at {shards} (missing fsdp_config.json)")
    target, staging, replaced = (shards / n for n in ("huggingface", MERGE_STAGING, MERGE_REPLACED))
    if replaced.is_dir() and not target.exists():  # a forced merge killed between its renames
        replaced.rename(target)
    shutil.rmtree(replaced, ignore_errors=True)
    if weights_problem(target) is None and not force:
        raise WeightsExist(
            f"{target} already holds weights that load; pass --force to merge again (they are "
            "kept until the new ones load)"
        )
    shutil.rmtree(staging, ignore_errors=True)  # what a killed merge left
    command = [
        sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
        "--local_dir", str(shards), "--target_dir", str(staging),
    ]  # fmt: skip
    if runner(command, {}) != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"model merger failed for {shards}")
    if problem := weights_problem(staging):
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"the merged weights do not load: {problem}")
    from recipe.retool.verl_plugins.varlen_attention import make_portable

    make_portable(staging)  # loads with plain transformers, like every saved step (_record)
    if target.exists():
        target.rename(replaced)
    staging.rename(target)
    shutil.rmtree(replaced, ignore_errors=True)
    return target
