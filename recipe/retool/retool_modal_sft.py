# # ReTool on Modal: cold-start SFT, then DAPO with a code interpreter
#
# (The file keeps the seed project's name, `retool_modal_sft.py`, so its commands keep working;
# it holds every training stage, evaluation and the pipeline. Serving is `serve.py`, the sandbox
# `modal_fusion_sandbox.py`.)
#
# This app trains Qwen2.5-7B-Instruct to reason with a Python interpreter, following the ReTool
# recipe, with verl as the trainer. Every function here is a thin shell: the work is done by
# plain Python in `recipe/retool/` (`stages/`, `launch/`, `workflows/`, `core/`), which
# the test suite and `make local-smoke` run on a CPU without Modal.
#
# The stages, in order:
#
#     modal run recipe/retool/retool_modal_sft.py::download_model
#     modal run recipe/retool/retool_modal_sft.py::prep_dataset
#     modal run recipe/retool/retool_modal_sft.py::train
#     modal deploy recipe/retool/modal_fusion_sandbox.py
#     modal run recipe/retool/retool_modal_sft.py::train_dapo
#
# `train`, `train_dapo`, `evaluate` and `pipeline` are local entry points: each checks the launch
# in a small CPU container first (`check_launch`: the overrides against this image's verl, the
# start checkpoint on the volume, the sandbox DAPO will call), so a mistake fails in one line
# before any GPU starts, then spawns the GPU function (`train_gpu`, ...) and follows it.
# `make sft|dapo|eval|pipeline` run the same entry points detached (`modal run --detach`): the
# run outlives the laptop, and the launch prints how to follow it (`make logs`, `make status`,
# the wandb page).
#
# Modal imports this file twice: here, where only `pip install modal` may be installed, and in
# each container as `/root/retool_modal_sft.py`; so its top needs only modal and the standard
# library (`modal_common.py`), and every setting read below travels to the containers.
#
# Any verl Hydra override passes through after `--`:
#
#     modal run recipe/retool/retool_modal_sft.py::train -- \
#         --experiment-name=my-exp trainer.total_epochs=5
#
# The GPU count is read when the app is imported: `RETOOL_GPUS=2 modal run ...::train` (default 8).
# Multi-node: `RETOOL_NODES=2 modal run ...::train_multinode -- --experiment-name=big`.

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import modal

from recipe.retool import modal_common
from recipe.retool.core import paths

APP_NAME = "retool-sft"
# Read when the app is imported, here and again in every container: each function gets them in
# its environment (ENV), so a container reads the values the launch read.
SETTINGS = modal_common.ImportSettings()
GPU_TYPE = SETTINGS.text("RETOOL_GPU_TYPE", "H100")
N_GPUS = SETTINGS.count("RETOOL_GPUS", 8)
N_NODES = SETTINGS.count("RETOOL_NODES", 2)  # for the *_multinode functions only
ENV = SETTINGS.env
MINUTES = 60
HOURS = 60 * MINUTES

app = modal.App(APP_NAME)

# ## Image
#
# The trainer image is built from the same Dockerfile that docker compose builds, so "works in
# compose" means "builds on Modal"; project code is added last (`modal_common.py`).

trainer_image = modal_common.trainer_image()

# ## Volumes and secrets
#
# Three volumes hold data, base models and checkpoints; `recipe/retool/core/paths.py` owns their
# names and layout. Secrets come from `.env` (see `.env.example`), read here without
# python-dotenv; a missing key is reported by name, never by value.

data_volume = modal.Volume.from_name(paths.DATA_VOLUME, create_if_missing=True)
models_volume = modal.Volume.from_name(paths.MODELS_VOLUME, create_if_missing=True)
checkpoints_volume = modal.Volume.from_name(paths.CHECKPOINTS_VOLUME, create_if_missing=True)
VOLUMES = {
    str(paths.DATA_MOUNT): data_volume,
    str(paths.MODELS_MOUNT): models_volume,
    str(paths.CHECKPOINTS_MOUNT): checkpoints_volume,
}
secrets = [modal_common.dotenv_secret()]
# Every training function: all GPUs of one node, all volumes, the secrets, Modal's 24 h maximum;
# host CPU and memory per stage from config/resources.toml (`modal_common.host_resources`).
GPU_FUNCTION = {
    "image": trainer_image,
    "gpu": f"{GPU_TYPE}:{N_GPUS}",
    "volumes": VOLUMES,
    "secrets": secrets,
    "env": ENV,
    "timeout": 24 * HOURS,
}


def _reload(*volumes: modal.Volume) -> None:
    if os.environ.get("RETOOL_ROOT"):
        return
    for volume in volumes:
        volume.reload()


def _commit(*volumes: modal.Volume) -> None:
    if os.environ.get("RETOOL_ROOT"):
        return
    for volume in volumes:
        volume.commit()


def _topology():
    """This container's place in the job: one node, or its rank in a Modal cluster."""
    from recipe.retool.core.topology import Topology

    try:
        cluster = modal.experimental.get_cluster_info()
        # IPv4 for torchrun and Ray: `container_ips` are Modal's IPv6 addresses, and Ray's IPv6
        # support is incomplete (ray #6967); Modal's multi-node verl, Ray and slime examples take
        # the head from `container_ipv4_ips[0]` too.
        ips, rank = list(cluster.container_ipv4_ips), cluster.rank
    except Exception:
        ips, rank = [], 0
    return Topology.of_cluster(ips, rank, gpus_per_node=N_GPUS, gpu_type=GPU_TYPE)


def _fail(problem: object, code: int = 2) -> NoReturn:
    """A problem the user can act on: one line on stderr, never a traceback."""
    print(f"error: {problem}", file=sys.stderr)
    raise SystemExit(code) from None


def _report_credentials() -> None:
    from recipe.retool.records.tracking import check_credentials

    for note in check_credentials():
        print(f"note: {note}")


# ## Data and base model


@app.function(image=trainer_image, volumes=VOLUMES, secrets=secrets, env=ENV, timeout=2 * HOURS)
def prep_dataset(
    max_rows: int = 0, on_error: str = "fail", only: str = "", source_dir: str = ""
) -> None:
    """Convert ReTool-SFT, DAPO-Math-17k and AIME 2024/2025 into verl parquet on the data volume
    (``stages/prep.py``: after ``download_model``, SFT traces too long for SFT are dropped and
    counted; ``prep_summary.json`` says whether, and the pipeline prepares again when not)."""
    from recipe.retool.data.convert import MalformedRow
    from recipe.retool.data.prep import PrepError
    from recipe.retool.stages.prep import prepare_dataset

    _report_credentials()
    _reload(models_volume)
    try:
        prepare_dataset(paths.Layout.from_env(), only=only, source_dir=source_dir,
                        max_rows=max_rows, on_error=on_error)  # fmt: skip
    except (PrepError, MalformedRow) as exc:
        _fail(exc)
    _commit(data_volume, models_volume)  # the parquet, and the hub cache (HF_HOME) on /models


@app.function(image=trainer_image, volumes=VOLUMES, secrets=secrets, env=ENV, timeout=2 * HOURS)
def download_model(
    model_id: str = paths.BASE_MODEL_ID,
    revision: str = paths.BASE_MODEL_REVISION,
    force: bool = False,
) -> None:
    """Snapshot the base model into the models volume (resumable; skipped once complete)."""
    from recipe.retool.stages.checkpoints import download_model as download

    _report_credentials()
    _reload(models_volume)
    path = download(paths.Layout.from_env(), model_id, revision, force=force)
    _commit(models_volume)
    print(f"model ready at {path}")


# ## Training
#
# `train_gpu`: verl's SFT trainer under torchrun on all GPUs of one container. `train_dapo_gpu`:
# verl's PPO trainer (DAPO settings) with Ray and vLLM from the latest complete SFT checkpoint,
# the tool calls on each node's own sandbox (`stages/tool_sandbox.py`). Each parses its arguments
# once (`core/request.py`) and hands the request to its stage (`stages/`).


def _run_stage(stage: str, arglist: tuple[str, ...]) -> None:
    """Run one stage in this container.

    Without ``--experiment-name`` the run is named after the Modal function call, which every
    retry of it shares, so a retry resumes that experiment instead of starting a new one. A
    mistake no retry can fix (bad config, missing checkpoint, no sandbox) prints one line and
    exits 2, and is kept for the retries of this call, which fail at once with the same line
    (``modal_common.fail_for_good``); anything else (Ray nodes that did not join, the trainer's
    own failure or a cut) exits non-zero, and Modal's retry resumes the run.
    """
    from recipe.retool.core.request import LaunchError, parse
    from recipe.retool.stages import dapo, sft
    from recipe.retool.stages.tool_sandbox import NodeSandboxError

    _report_credentials()
    _reload(data_volume, models_volume, checkpoints_volume)
    layout = paths.Layout.from_env()
    launch_id = modal.current_function_call_id()
    modal_common.refuse_retry(layout, launch_id)
    try:
        request = parse(stage, arglist)  # the arguments enter this container here, once
        topo = _topology()
        if stage == "sft":
            result = sft.run_sft(layout, topo, request, launch_id=launch_id)
        else:  # every node starts its own sandbox first (tool_sandbox.py), then Ray
            result = dapo.dapo_on_node(
                layout, topo, request, deployed_url=modal_common.sandbox_url, launch_id=launch_id
            )
            if result is None:
                return  # a worker node served the cluster until the job ended
    except (
        LaunchError,
        paths.CheckpointNotFound,
        modal_common.SandboxNotDeployed,
        NodeSandboxError,
    ) as exc:
        modal_common.fail_for_good(layout, launch_id, f"error: {exc}")
    except RuntimeError as exc:  # e.g. Ray nodes that did not join: another attempt may work
        _fail(exc, 1)
    finally:
        _commit(checkpoints_volume)  # whatever was saved survives a failure, and the marker
    print(result.summary())
    if result.returncode != 0:
        raise SystemExit(result.returncode)


@app.function(**GPU_FUNCTION, **modal_common.host_resources("sft", N_GPUS))
def train_gpu(*arglist: str) -> None:
    """Cold-start SFT on this node's GPUs (``modal run ...::train`` checks, then spawns this)."""
    _run_stage("sft", arglist)


# A DAPO run outlives Modal's 24 h per attempt: a retry resumes from the last checkpoint
# (trainer.resume_mode=auto) of the same experiment (named after the function call when no
# --experiment-name is given), so the run goes on where the previous attempt stopped. A config
# mistake is not retried: it is reported and every retry of the call fails at once with it.
@app.function(
    **GPU_FUNCTION,
    **modal_common.host_resources("dapo", N_GPUS),
    retries=modal.Retries(max_retries=3, initial_delay=60.0),
)
def train_dapo_gpu(*arglist: str) -> None:
    """DAPO on this node's GPUs (``modal run ...::train_dapo`` checks, then spawns this)."""
    _run_stage("dapo", arglist)


# ## Does DAPO learn?
#
# `make dapo-curve` on Modal (`workflows/learning_curve/`): a small model SFT'd on synthetic
# tool-use problems, DAPO from a start with room to learn, seeds against a shuffled-reward
# control; `/checkpoints/learning-curve/<timestamp>/curve.{json,md,png}` (docs/benchmarks.md).
#
#     modal run recipe/retool/retool_modal_sft.py::learning_curve --dapo-steps 30


@app.function(**(GPU_FUNCTION | {"gpu": f"{GPU_TYPE}:1", "timeout": 2 * HOURS}))
def learning_curve(dapo_steps: int = 0, sft_epochs: int = 0) -> dict:
    """The committed start checked on its held-out problems → DAPO arms (seeds and a
    shuffled-reward control) → curve and verdict, on one GPU; the deployed sandbox runs every
    tool call. A start that is altered or scores outside the band fails with that one line."""
    import time

    from recipe.retool.workflows.learning_curve import proof as curve
    from recipe.retool.workflows.learning_curve.settings import given_settings

    settings = given_settings(dapo_steps=dapo_steps, sft_epochs=sft_epochs)
    root = paths.Layout.from_env().checkpoints / "learning-curve" / time.strftime("%Y%m%d-%H%M%S")
    try:
        result = curve.run(root, settings, gpus=1, sandbox_url=modal_common.sandbox_url())
    except (curve.NoStartInBand, modal_common.SandboxNotDeployed) as exc:
        raise SystemExit(f"learning curve: {exc}") from None
    finally:
        _commit(checkpoints_volume)
    curve.log_to_wandb(root, result)
    _commit(checkpoints_volume)  # wandb's files
    return result


# ## Multi-node
#
# The same stages on a Modal cluster of `RETOOL_NODES` containers (RDMA): SFT by torchrun's static
# rendezvous on node 0's IPv4 address; DAPO on a Ray cluster headed by node 0, its nodes sharing
# one token made for each launch (`modal_common.ray_cluster_secret`).


@app.function(**GPU_FUNCTION, **modal_common.host_resources("sft", N_GPUS))
@modal.clustered(size=N_NODES, rdma=True)
def train_multinode_gpu(*arglist: str) -> None:
    """SFT across nodes (``modal run ...::train_multinode`` checks, then spawns this)."""
    _run_stage("sft", arglist)


@app.function(
    **(GPU_FUNCTION | {"secrets": [*secrets, modal_common.ray_cluster_secret()]}),
    **modal_common.host_resources("dapo", N_GPUS),
)
@modal.clustered(size=N_NODES, rdma=True)
def train_dapo_multinode_gpu(*arglist: str) -> None:
    """DAPO across nodes, Ray head on node 0 (``modal run ...::train_dapo_multinode``)."""
    _run_stage("dapo", arglist)


# ## Evaluation
#
# AIME 2024 and 2025 through training's tool loop, vLLM on one GPU, the ReTool paper's settings
# (config/eval.yaml); reports in `/checkpoints/eval/<label>/`, numbers in wandb (`retool-eval`).
#
#     modal run recipe/retool/retool_modal_sft.py::evaluate --checkpoint latest  # base, sft, PATH


@app.function(
    **(GPU_FUNCTION | {"gpu": f"{GPU_TYPE}:1", "timeout": 12 * HOURS}),
    **modal_common.host_resources("eval", 1),
)
def evaluate_gpu(checkpoint: str = "latest", n: int = 0, max_problems: int = 0,
                 experiment: str = "", force: bool = False) -> dict:  # fmt: skip
    """Evaluate one checkpoint, or with --experiment base vs its SFT vs its DAPO side by side
    (``modal run ...::evaluate`` checks, then spawns this)."""
    from recipe.retool.core.request import LaunchError
    from recipe.retool.eval.config import EvalError
    from recipe.retool.stages.tool_sandbox import NodeSandboxError
    from recipe.retool.workflows import evaluation

    _reload(data_volume, models_volume, checkpoints_volume)
    layout = paths.Layout.from_env()
    try:
        evaluated = evaluation.evaluate_on_volumes(
            layout, modal_common.sandbox_url, checkpoint=checkpoint, n=n,
            max_problems=max_problems, experiment=experiment, force=force,
        )  # fmt: skip
    except (EvalError, LaunchError, paths.CheckpointNotFound, NodeSandboxError) as exc:
        _fail(exc)
    finally:
        _commit(checkpoints_volume)
    evaluation.report(layout, evaluated)
    _commit(checkpoints_volume)  # the progress plot and wandb's files
    return evaluated.result


# ## The whole pipeline
#
# download → prep → SFT → DAPO → evaluation, skipping every stage already done
# (`workflows/pipeline.py`); an interrupted run resumes where it stopped.
#
#     modal run recipe/retool/retool_modal_sft.py::pipeline --experiment-name retool-7b


@app.function(image=trainer_image, volumes=VOLUMES, env=ENV, timeout=10 * MINUTES)
def pipeline_status(experiment: str) -> dict[str, bool]:
    """Which stages of ``experiment`` are done, read from the volumes."""
    from recipe.retool.workflows.pipeline import format_status, stage_done

    _reload(data_volume, models_volume, checkpoints_volume)
    done = stage_done(paths.Layout.from_env(), experiment)
    print(format_status(done))
    return done


@app.function(image=trainer_image, volumes=VOLUMES, secrets=secrets, env=ENV, timeout=24 * HOURS)
def pipeline_run(experiment_name: str = "retool", force: str = "") -> list[str]:
    """Run (or resume) every stage of one experiment, from a container: the chain outlives the
    client that launched it. Each stage is its own call (DAPO with its own retries)."""
    from recipe.retool.workflows.pipeline import run_pipeline, training_requests

    sft, dapo = training_requests(experiment_name)  # each crosses to its GPU function as argv
    try:
        outcomes = run_pipeline(
            lambda: pipeline_status.local(experiment_name),
            {
                "download": lambda: download_model.remote(),
                "prep": lambda: prep_dataset.remote(),
                "sft": lambda: train_gpu.remote(*sft.to_argv()),
                "dapo": lambda: train_dapo_gpu.remote(*dapo.to_argv()),
                "eval": lambda: evaluate_gpu.remote(experiment=experiment_name),
            },
            force=tuple(filter(None, force.split(","))),
        )
    except ValueError as exc:  # an unknown --force stage, found before anything runs
        _fail(f"--force: {exc}")
    lines = [f"{outcome.stage:<9} {outcome.action}" for outcome in outcomes]
    print("\n".join(lines))
    if outcomes and outcomes[-1].action.startswith("failed"):
        raise SystemExit(1)
    return lines


# ## Launching
#
# The local entry points (top of this file): `check_launch` runs in a small CPU container with the
# volumes and secrets the run will have, then the GPU function is spawned and followed; Ctrl-C or
# a closed laptop detaches a `--detach` run, which goes on.


@app.function(image=trainer_image, volumes=VOLUMES, secrets=secrets, env=ENV, cpu=2.0,
              memory=8 * 1024, timeout=10 * MINUTES)  # fmt: skip
def check_launch(stage: str, args: list, nodes: int = 1, options: dict | None = None) -> dict:
    """What a launch of ``stage`` (``sft``, ``dapo``, ``eval``, ``pipeline``) can check before
    any GPU starts, checked where it will run: this image's verl, the volumes, the secrets, the
    sandbox. Returns ``{"error": one line or None, "lines": [what the checks printed], ...}``
    (``experiment`` and ``project`` for training), never raises: the launch prints the line."""
    from recipe.retool.core.request import LaunchError, parse
    from recipe.retool.core.topology import Topology
    from recipe.retool.workflows import preflight

    _reload(data_volume, models_volume, checkpoints_volume)
    layout, options = paths.Layout.from_env(), options or {}
    if stage in ("sft", "dapo"):
        try:  # the arguments enter this container here, once
            request = parse(stage, list(args))
            topo = Topology(gpus_per_node=N_GPUS, nnodes=nodes)
        except LaunchError as exc:
            return {"lines": [], "error": str(exc)}
        return preflight.check_training(
            layout, request, topo, deployed_url=modal_common.sandbox_url,
            also_refused=(modal_common.SandboxNotDeployed,),
        )  # fmt: skip
    if stage == "eval":
        return preflight.check_evaluation(layout, options, modal_common.sandbox_url)
    return preflight.check_pipeline(options)


def _launch(stage: str, function: modal.Function, *args: str, nodes: int = 1, what: str,
            **options) -> None:  # fmt: skip
    """Check (``check_launch``), spawn ``function``, print how to follow it, then wait (the wait
    is what a detach ends). Runs where ``modal run`` runs: the follow lines are plain functions
    (``records/follow.py``, ``records/tracking.py``: the standard library at import)."""
    from recipe.retool.records import follow

    plan = check_launch.remote(stage, list(args), nodes, options)
    for line in plan["lines"]:
        print(line)
    if plan["error"]:
        _fail(plan["error"])
    call = function.spawn(*args, **options)
    url = follow.launch_wandb_url(stage, plan, call.object_id)
    lines = follow.follow_lines(app.app_id, call.object_id, what=what, wandb_url=url)
    print("\n".join(lines), flush=True)
    try:
        call.get()
    except Exception as exc:  # the run failed: its logs (streamed above, and kept) say why
        print(follow.failure_line(what, exc, app.app_id), file=sys.stderr)
        raise SystemExit(1) from None


@app.local_entrypoint()
def train(*arglist: str) -> None:
    """Cold-start SFT (``make sft``). Options: --experiment-name=NAME, --allow-other-base (resume
    a name started from another model or data); then any verl override (key=value)."""
    _launch("sft", train_gpu, *arglist, what=f"sft on {N_GPUS}x{GPU_TYPE}")


@app.local_entrypoint()
def train_dapo(*arglist: str) -> None:
    """DAPO (``make dapo``). Options: --experiment-name=NAME --sft-checkpoint=PATH|EXPERIMENT
    --sandbox=node|deployed (default node: a sandbox on each node) --allow-other-base; then
    overrides."""
    _launch("dapo", train_dapo_gpu, *arglist, what=f"dapo on {N_GPUS}x{GPU_TYPE}")


@app.local_entrypoint()
def train_multinode(*arglist: str) -> None:
    """SFT across RETOOL_NODES nodes. Needs --experiment-name (shared by every node); overrides
    as ``train``."""
    _launch("sft", train_multinode_gpu, *arglist, nodes=N_NODES,
            what=f"sft on {N_NODES}x{N_GPUS}x{GPU_TYPE}")  # fmt: skip


@app.local_entrypoint()
def train_dapo_multinode(*arglist: str) -> None:
    """DAPO across RETOOL_NODES nodes (Ray head on node 0). Options and overrides as
    ``train_dapo``."""
    _launch("dapo", train_dapo_multinode_gpu, *arglist, nodes=N_NODES,
            what=f"dapo on {N_NODES}x{N_GPUS}x{GPU_TYPE}")  # fmt: skip


@app.local_entrypoint()
def evaluate(checkpoint: str = "latest", n: int = 0, max_problems: int = 0, experiment: str = "",
             force: bool = False) -> None:  # fmt: skip
    """Evaluate one checkpoint (``make eval``), or with --experiment base vs its SFT vs its DAPO.

    Settings come from config/eval.yaml; ``--n`` (samples per problem) and ``--max-problems``
    override them when given. A checkpoint evaluated before is refused unless ``--force``, which
    writes a new report directory next to the old (``eval/index.jsonl`` lists them all).
    """
    _launch("eval", evaluate_gpu, what=f"evaluation of {experiment or checkpoint}",
            checkpoint=checkpoint, n=n, max_problems=max_problems, experiment=experiment,
            force=force)  # fmt: skip


@app.local_entrypoint()
def pipeline(experiment_name: str = "retool", force: str = "") -> None:
    """``make pipeline``: spawn ``pipeline_run`` (every stage, skipping done ones), then follow."""
    _launch("pipeline", pipeline_run, what=f"pipeline {experiment_name}",
            experiment_name=experiment_name, force=force)  # fmt: skip


# ## Results and offline wandb runs
#
# `make results EXPERIMENT=x`: the experiment's reports (never weights) into `runs/<x>/`;
# `make wandb-sync`: upload the offline wandb runs kept on the checkpoints volume.


@app.function(image=trainer_image, volumes=VOLUMES, env=ENV, timeout=10 * MINUTES)
def result_files(experiment: str) -> dict[str, bytes]:
    """``{path relative to the checkpoints volume: bytes}`` of ``follow.result_files``."""
    from recipe.retool.records.follow import read_result_files

    _reload(checkpoints_volume)
    return read_result_files(paths.Layout.from_env(), experiment)


@app.local_entrypoint()
def results(experiment: str = "retool", out: str = "runs") -> None:
    """Write ``result_files(experiment)`` under ``<out>/<experiment>/``, the volume's layout."""
    from recipe.retool.records.follow import write_result_files

    written = write_result_files(result_files.remote(experiment), Path(out) / experiment)
    for path in written:
        print(path)
    if not written:
        print(f"no reports for {experiment!r} yet (make status EXPERIMENT={experiment})")


@app.function(image=trainer_image, volumes=VOLUMES, secrets=secrets, env=ENV, timeout=2 * HOURS)
def wandb_sync() -> None:
    """``wandb sync`` every offline run under the volume's WANDB_DIR (needs WANDB_API_KEY)."""
    from recipe.retool.records import tracking

    _reload(checkpoints_volume)
    code = tracking.sync_offline_runs(paths.Layout.from_env())
    _commit(checkpoints_volume)  # wandb marks what it synced
    if code:
        raise SystemExit(code)


# ## Checkpoints


@app.function(image=trainer_image, volumes=VOLUMES, env=ENV, timeout=10 * MINUTES)
def list_checkpoints() -> str:
    """Print every checkpoint of every experiment, marking partial (interrupted) saves."""
    from recipe.retool.stages.checkpoints import describe_checkpoints

    _reload(checkpoints_volume)
    table = describe_checkpoints(paths.Layout.from_env())
    print(table)
    return table


@app.function(image=trainer_image, volumes=VOLUMES, env=ENV, timeout=2 * HOURS,
              memory=128 * 1024)  # fmt: skip
def merge_checkpoint(
    experiment_name: str, step: int, stage: str = "sft", force: bool = False
) -> str:
    """Merge a step's FSDP shards into HF safetensors (``<step>/huggingface``) with verl's merger,
    atomically; loadable weights there are replaced only with ``--force``, once the new load."""
    from recipe.retool.stages.checkpoints import merge_checkpoint as merge

    _reload(checkpoints_volume)
    try:
        target = merge(paths.Layout.from_env(), stage, experiment_name, step, force=force)
    except (paths.CheckpointNotFound, ValueError) as exc:  # no such step; weights there already
        _fail(exc)
    _commit(checkpoints_volume)
    print(f"merged into {target}")
    return str(target)


@app.function(image=trainer_image, secrets=secrets, env=ENV, timeout=5 * MINUTES)  # .env: token
def check_sandbox_connection(url: str = "") -> None:
    """Run `print(2+2)` in the deployed sandbox and report latency (or why it failed)."""
    from sandbox.client import SandboxClient, SandboxRequestError, SandboxUnavailable

    try:
        endpoint = url or modal_common.sandbox_url()
        result = SandboxClient(endpoint, max_retries=2).run_code_sync("print(2+2)")
    except (modal_common.SandboxNotDeployed, SandboxUnavailable, SandboxRequestError) as exc:
        _fail(exc, 1)
    print(f"{endpoint}: status={result.status} stdout={result.stdout.strip()!r} "
          f"latency={result.latency_s * 1000:.0f} ms")  # fmt: skip
    if result.stdout.strip() != "4":
        raise SystemExit(1)
