# # ReTool on Modal: cold-start SFT, then DAPO with a code interpreter
#
# (The file keeps the seed project's name, `retool_modal_sft.py`, so its commands keep working;
# it holds every training stage, evaluation and the pipeline. Serving is `serve.py`, the sandbox
# `modal_fusion_sandbox.py`.)
#
# This app trains Qwen2.5-7B-Instruct to reason with a Python interpreter, following the ReTool
# recipe, with verl as the trainer. Every function here is a thin shell: the work is done by
# plain Python in `recipe/retool/` (`data/prep.py`, `stages.py`, `launch.py`, `paths.py`), which
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
from pathlib import Path

import modal

from recipe.retool import modal_common, paths

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
# Three volumes hold data, base models and checkpoints; `recipe/retool/paths.py` owns their names
# and layout. Secrets come from `.env` (see `.env.example`), read here without python-dotenv; a
# missing key is reported by name, never by value.

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
    from recipe.retool.launch import Topology

    try:
        cluster = modal.experimental.get_cluster_info()
        # IPv4 for torchrun and Ray: `container_ips` are Modal's IPv6 addresses, and Ray's IPv6
        # support is incomplete (ray #6967); Modal's multi-node verl, Ray and slime examples take
        # the head from `container_ipv4_ips[0]` too.
        ips, rank = list(cluster.container_ipv4_ips), cluster.rank
    except Exception:
        ips, rank = [], 0
    if len(ips) <= 1:
        return Topology(gpus_per_node=N_GPUS, gpu_type=GPU_TYPE)
    return Topology(
        gpus_per_node=N_GPUS, nnodes=len(ips), node_rank=rank, master_addr=ips[0], gpu_type=GPU_TYPE
    )


def _report_credentials() -> None:
    from recipe.retool.stages import check_credentials

    for note in check_credentials():
        print(f"note: {note}")


# ## Data and base model


@app.function(image=trainer_image, volumes=VOLUMES, secrets=secrets, env=ENV, timeout=2 * HOURS)
def prep_dataset(
    max_rows: int = 0, on_error: str = "fail", only: str = "", source_dir: str = ""
) -> None:
    """Convert ReTool-SFT, DAPO-Math-17k and AIME 2024/2025 into verl parquet on the data volume.

    With the base model downloaded first (``download_model``), its tokenizer gives token-length
    percentiles and SFT traces longer than the SFT ``data.max_length`` are dropped (and counted)
    instead of failing training mid-epoch; ``prep_summary.json`` records whether that filter ran,
    and the pipeline prepares again when it did not.
    """
    import sys

    from recipe.retool.data.convert import MalformedRow
    from recipe.retool.data.prep import PrepError, prepare
    from recipe.retool.launch import load_stage_config

    _report_credentials()
    _reload(models_volume)
    layout = paths.Layout.from_env()
    model_dir = layout.model_dir()
    has_tokenizer = (model_dir / "tokenizer_config.json").exists()
    if not has_tokenizer:
        print(
            "note: no base model yet (run download_model first): no token-length stats, and "
            "SFT traces over data.max_length are kept (the pipeline will prepare again)"
        )
    try:
        prepare(
            layout.data,
            only=[only] if only else None,
            source_dir=Path(source_dir) if source_dir else None,
            max_rows=max_rows or None,
            on_error=on_error,
            tokenizer=model_dir if has_tokenizer else None,
            sft_max_length=load_stage_config("sft").overrides["data.max_length"]
            if has_tokenizer
            else None,
        )
    except (PrepError, MalformedRow) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    _commit(data_volume, models_volume)  # the parquet, and the hub cache (HF_HOME) on /models


@app.function(image=trainer_image, volumes=VOLUMES, secrets=secrets, env=ENV, timeout=2 * HOURS)
def download_model(
    model_id: str = paths.BASE_MODEL_ID,
    revision: str = paths.BASE_MODEL_REVISION,
    force: bool = False,
) -> None:
    """Snapshot the base model into the models volume (resumable; skipped once complete)."""
    from recipe.retool.stages import download_model as download

    _report_credentials()
    _reload(models_volume)
    path = download(paths.Layout.from_env(), model_id, revision, force=force)
    _commit(models_volume)
    print(f"model ready at {path}")


# ## Training
#
# `train_gpu` runs verl's SFT trainer under torchrun on all GPUs of one container;
# `train_dapo_gpu` runs verl's PPO trainer (GRPO advantages, DAPO settings) with Ray and vLLM,
# starting from the latest complete SFT checkpoint. Every node runs its own sandbox on loopback
# for the tool calls (`tool_sandbox.py`; measured against a remote endpoint in docs/benchmarks.md);
# pass `--sandbox=deployed` to send them to the deployed `modal_fusion_sandbox.py` instead.
# `modal run ...::train` / `::train_dapo` (below, "Launching") check the launch before they spawn
# these.


def _run_stage(stage: str, arglist: tuple[str, ...]) -> None:
    """Run one stage in this container.

    Without ``--experiment-name`` the run is named after the Modal function call, which every
    retry of it shares, so a retry resumes that experiment instead of starting a new one. A
    mistake no retry can fix (bad config, missing checkpoint, no sandbox) prints one line and
    exits 2, and is kept for the retries of this call, which fail at once with the same line
    (``modal_common.fail_for_good``); anything else (Ray nodes that did not join, the trainer's
    own failure or a cut) exits non-zero, and Modal's retry resumes the run.
    """
    import sys

    from recipe.retool import launch, stages
    from recipe.retool.tool_sandbox import NodeSandboxError

    _report_credentials()
    _reload(data_volume, models_volume, checkpoints_volume)
    layout = paths.Layout.from_env()
    launch_id = modal.current_function_call_id()
    modal_common.refuse_retry(layout, launch_id)
    try:
        topo = _topology()
        if stage == "sft":
            result = stages.run_sft(layout, topo, arglist, launch_id=launch_id)
        else:  # every node starts its own sandbox first (tool_sandbox.py), then Ray
            result = stages.dapo_on_node(
                layout, topo, arglist, deployed_url=modal_common.sandbox_url, launch_id=launch_id
            )
            if result is None:
                return  # a worker node served the cluster until the job ended
    except (
        launch.LaunchError,
        paths.CheckpointNotFound,
        modal_common.SandboxNotDeployed,
        NodeSandboxError,
    ) as exc:
        modal_common.fail_for_good(layout, launch_id, f"error: {exc}")
    except RuntimeError as exc:  # e.g. Ray nodes that did not join: another attempt may work
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        _commit(checkpoints_volume)  # whatever was saved survives a failure, and the marker
    where = result.checkpoint.path if result.checkpoint else "no complete checkpoint"
    print(
        f"{stage} {result.experiment}: exit {result.returncode}, "
        f"{result.seconds / 60:.1f} min, {where}"
    )
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
# `make dapo-curve` on Modal: a small model SFT'd on synthetic tool-use problems; its saved steps
# scored on held-out problems to pick a DAPO start with room to learn; then DAPO with the
# production config from there, two seeds and a control whose rewards are shuffled, side by side
# on one GPU. Rises with paired bootstrap intervals go to
# `/checkpoints/learning-curve/<timestamp>/curve.{json,md,png}` (see docs/benchmarks.md).
#
#     modal run recipe/retool/retool_modal_sft.py::learning_curve --dapo-steps 30


@app.function(**(GPU_FUNCTION | {"gpu": f"{GPU_TYPE}:1", "timeout": 2 * HOURS}))
def learning_curve(dapo_steps: int = 0, sft_epochs: int = 0) -> dict:
    """The committed start checked on its held-out problems → DAPO arms (seeds and a
    shuffled-reward control) → curve and verdict, on one GPU; the deployed sandbox runs every
    tool call. A start that is altered or scores outside the band fails with that one line."""
    import time
    from dataclasses import replace

    from recipe.retool import learning_curve as curve

    defaults = curve.CurveSettings()
    settings = replace(
        defaults,
        sft_epochs=sft_epochs or defaults.sft_epochs,
        dapo_steps=dapo_steps or defaults.dapo_steps,
    )
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
# The same stages on a Modal cluster of `RETOOL_NODES` containers with `RETOOL_GPUS` GPUs each,
# linked by RDMA: SFT uses torchrun's static rendezvous on node 0's IPv4 address; DAPO starts a
# Ray head on node 0 and Ray workers on the others, then runs `main_ppo` on node 0 over the whole
# cluster. The Ray nodes authenticate with one token made for each launch and handed to every
# container as a secret (`modal_common.ray_cluster_secret`).


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
# AIME 2024 and 2025 with the same multi-turn code-interpreter loop as training (verl's tool agent
# loop, our tool, a sandbox on this container as DAPO's nodes run one, our reward), vLLM on one
# GPU, the ReTool paper's settings by default (n = 32, T = 1.0, top-p 0.7, 16k tokens). Reports
# (JSON, markdown, plots) go to `/checkpoints/eval/<label>/`; the summary table is printed and the
# results are logged to wandb (project `retool-eval`) where it is configured.
#
#     modal run recipe/retool/retool_modal_sft.py::evaluate --checkpoint latest  # base, sft, PATH


EVAL_PROJECT = "retool-eval"


@app.function(
    **(GPU_FUNCTION | {"gpu": f"{GPU_TYPE}:1", "timeout": 12 * HOURS}),
    **modal_common.host_resources("eval", 1),
)
def evaluate_gpu(
    checkpoint: str = "latest",
    n: int = 0,
    max_problems: int = 0,
    experiment: str = "",
    force: bool = False,
) -> dict:
    """Evaluate one checkpoint, or with --experiment base vs its SFT vs its DAPO side by side
    (``modal run ...::evaluate`` checks, then spawns this)."""
    import json
    import sys
    from dataclasses import replace

    from recipe.retool import tracking
    from recipe.retool.eval.checkpoints import eval_dir, report_dir, resolve_checkpoint
    from recipe.retool.eval.config import EvalConfig, EvalError
    from recipe.retool.eval.report import show_summary
    from recipe.retool.eval.runner import evaluate_checkpoint as run_eval
    from recipe.retool.launch import LaunchError
    from recipe.retool.pipeline import evaluate_experiment
    from recipe.retool.tool_sandbox import NodeSandboxError, tool_sandbox

    _reload(data_volume, models_volume, checkpoints_volume)
    layout = paths.Layout.from_env()
    try:
        cfg = EvalConfig.from_yaml()
        cfg = replace(cfg, n=n or cfg.n, max_problems=max_problems or cfg.max_problems)
        with tool_sandbox(None, deployed_url=modal_common.sandbox_url) as sandbox_url:
            if experiment:
                files = evaluate_experiment(layout, experiment, sandbox_url, cfg, backend="vllm")
                result = {"comparison": [str(f) for f in files]}
            else:
                ref = resolve_checkpoint(checkpoint, layout)
                datasets = {name: layout.rl_file(name) for name in paths.EVAL_SETS}
                out_dir = report_dir(eval_dir(layout, ref.label), force=force)
                result = run_eval(ref.path, datasets, out_dir, cfg, sandbox_url, "vllm",
                                  checkpoint=ref)  # fmt: skip
    except (EvalError, LaunchError, paths.CheckpointNotFound, NodeSandboxError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        _commit(checkpoints_volume)
    if experiment:
        compare = Path(result["comparison"][0])
        print(compare.read_text())
        plots, run = {"compare": compare.with_suffix(".png")}, experiment
        numbers = tracking.flat_numbers(json.loads(compare.with_suffix(".json").read_text()))
    else:
        plots = {p.stem: p for p in show_summary(result, ref, layout)}
        run, numbers = ref.label, tracking.flat_numbers(result["datasets"])
    tracking.log_results(layout, project=EVAL_PROJECT, run=f"eval-{run}", metrics=numbers,
                         images=plots)  # fmt: skip
    _commit(checkpoints_volume)  # the progress plot and wandb's files
    return result


# ## The whole pipeline
#
# download → prep → SFT → DAPO → evaluation of base, SFT and DAPO, skipping every stage that is
# already done (see `recipe/retool/pipeline.py`); an interrupted run resumes where it stopped.
#
#     modal run recipe/retool/retool_modal_sft.py::pipeline --experiment-name retool-7b


@app.function(image=trainer_image, volumes=VOLUMES, env=ENV, timeout=10 * MINUTES)
def pipeline_status(experiment: str) -> dict[str, bool]:
    """Which stages of ``experiment`` are done, read from the volumes."""
    from recipe.retool.pipeline import format_status, stage_done

    _reload(data_volume, models_volume, checkpoints_volume)
    done = stage_done(paths.Layout.from_env(), experiment)
    print(format_status(done))
    return done


@app.function(image=trainer_image, volumes=VOLUMES, secrets=secrets, env=ENV, timeout=24 * HOURS)
def pipeline_run(experiment_name: str = "retool", force: str = "") -> list[str]:
    """Run (or resume) every stage of one experiment, from a container: the chain outlives the
    client that launched it. Each stage is its own call (DAPO with its own retries)."""
    import sys

    from recipe.retool.pipeline import run_pipeline

    exp = f"--experiment-name={experiment_name}"
    try:
        outcomes = run_pipeline(
            lambda: pipeline_status.local(experiment_name),
            {
                "download": lambda: download_model.remote(),
                "prep": lambda: prep_dataset.remote(),
                "sft": lambda: train_gpu.remote(exp),
                "dapo": lambda: train_dapo_gpu.remote(exp, f"--sft-checkpoint={experiment_name}"),
                "eval": lambda: evaluate_gpu.remote(experiment=experiment_name),
            },
            force=tuple(filter(None, force.split(","))),
        )
    except ValueError as exc:  # an unknown --force stage, found before anything runs
        print(f"error: --force: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    lines = [f"{outcome.stage:<9} {outcome.action}" for outcome in outcomes]
    print("\n".join(lines))
    if outcomes and outcomes[-1].action.startswith("failed"):
        raise SystemExit(1)
    return lines


# ## Launching
#
# The seed's commands (`modal run ...::train`, `::train_dapo`), `::evaluate`, `::pipeline` and
# `make sft|dapo|eval|pipeline` (the same, detached) are local entry points: they run where
# `modal run` runs, with nothing but modal and the standard library. Each first runs
# `check_launch` in a small CPU container of the trainer image, with the volumes and secrets the
# run will have: every mistake it can see there fails in one line, exit 2, before a GPU starts.
# Then it spawns the GPU function, prints how to follow it (`recipe/retool/follow.py`) and waits;
# Ctrl-C or a closed laptop detaches a `--detach` run, which goes on.


def _check_training(stage: str, args: list[str], nodes: int) -> dict:
    """``python -m recipe.retool.launch check`` here, where the volumes are mounted (DAPO's start
    is checked too), and for SFT its data and base model; DAPO's sandbox runs a test program."""
    import contextlib
    import io
    import shlex
    import sys

    from recipe.retool import launch, stages
    from recipe.retool.eval.config import EvalError
    from recipe.retool.follow import project_override
    from recipe.retool.tool_sandbox import NodeSandboxError

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = launch.main(["check", stage, "--gpus", str(N_GPUS), "--nodes", str(nodes), *args])
    lines = out.getvalue().splitlines() + err.getvalue().splitlines()
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    command = shlex.quote(sys.executable) + " "  # the trainer's command line: long, not shown
    shown = [line for line in lines if not line.startswith(("error: ", command))]
    plan = {"lines": shown}
    if code:
        return plan | {"error": errors[-1] if errors else f"launch check exited {code}"}
    layout = paths.Layout.from_env()
    parsed = launch.parse_launch_args(args)
    try:
        if stage == "sft":
            stages.check_sft_inputs(layout, layout.model_dir(), args)
        else:
            plan["lines"].append(_check_tool_sandbox(parsed.sandbox))
    except (
        launch.LaunchError,
        NodeSandboxError,
        modal_common.SandboxNotDeployed,
        EvalError,
    ) as exc:
        return plan | {"error": str(exc)}
    project = project_override(
        parsed.overrides, launch.load_stage_config(stage).overrides["trainer.project_name"]
    )
    return plan | {"error": None, "experiment": parsed.experiment, "project": project}


def _check_tool_sandbox(choice: str | None) -> str:
    """The tool's sandbox as the run will get it (``tool_sandbox.py``'s order), checked without
    making Modal Sandboxes: those cost CPU-hours and a minute to start, so the check names them
    and the run makes them. This node's sandbox (or the deployed one) runs a test program; a
    node that fails its self-test under ``auto`` says that the run falls back to the pool."""
    from recipe.retool.eval.runner import check_sandbox
    from recipe.retool.tool_sandbox import NodeSandboxError, tool_sandbox

    if choice == "modal":
        return "sandbox: Modal Sandboxes (--sandbox=modal), made when the run starts"
    try:
        with tool_sandbox(choice or "node", deployed_url=modal_common.sandbox_url) as url:
            check_sandbox(url)
    except NodeSandboxError as exc:
        if choice is not None:
            raise
        return f"sandbox: not this node's ({exc}); the run falls back to Modal Sandboxes"
    return f"sandbox: {url} ran a test program"


def _check_evaluation(options: dict) -> dict:
    """The evaluation's settings, its checkpoint on the volume, its report directory, and the
    tool sandbox it will use (`_check_tool_sandbox`)."""
    from dataclasses import replace

    from recipe.retool.eval.checkpoints import eval_dir, report_dir, resolve_checkpoint
    from recipe.retool.eval.config import EvalConfig, EvalError
    from recipe.retool.tool_sandbox import NodeSandboxError

    layout = paths.Layout.from_env()
    lines = []
    try:
        cfg = EvalConfig.from_yaml()
        replace(cfg, n=options.get("n") or cfg.n,
                max_problems=options.get("max_problems") or cfg.max_problems)  # fmt: skip
        if not options.get("experiment"):
            ref = resolve_checkpoint(options.get("checkpoint", "latest"), layout)
            report_dir(eval_dir(layout, ref.label), force=bool(options.get("force")))
            lines.append(f"evaluates {ref.path}")
        lines.append(_check_tool_sandbox(None))
    except (EvalError, paths.CheckpointNotFound, NodeSandboxError) as exc:
        return {"lines": lines, "error": str(exc)}
    return {"lines": lines, "error": None}


@app.function(image=trainer_image, volumes=VOLUMES, secrets=secrets, env=ENV, cpu=2.0,
              memory=8 * 1024, timeout=10 * MINUTES)  # fmt: skip
def check_launch(stage: str, args: list, nodes: int = 1, options: dict | None = None) -> dict:
    """What a launch of ``stage`` (``sft``, ``dapo``, ``eval``, ``pipeline``) can check before
    any GPU starts, checked where it will run: this image's verl, the volumes, the secrets, the
    sandbox. Returns ``{"error": one line or None, "lines": [what the checks printed], ...}``
    (``experiment`` and ``project`` for training), never raises: the launch prints the line."""
    _reload(data_volume, models_volume, checkpoints_volume)
    options = options or {}
    if stage in ("sft", "dapo"):
        return _check_training(stage, list(args), nodes)
    if stage == "eval":
        return _check_evaluation(options)
    from recipe.retool.pipeline import PIPELINE_STAGES

    unknown = set(filter(None, options.get("force", "").split(","))) - set(PIPELINE_STAGES)
    if unknown:
        return {"lines": [], "error": f"--force: unknown stage(s) {sorted(unknown)}; stages are "
                                      f"{PIPELINE_STAGES}"}  # fmt: skip
    return {"lines": [], "error": None}


def _launch(stage: str, function: modal.Function, *args: str, nodes: int = 1, what: str,
            **options) -> None:  # fmt: skip
    """Check (``check_launch``), spawn ``function``, print how to follow it, then wait (the wait
    is what a detach ends). Runs where ``modal run`` runs: the follow lines are plain functions
    (``follow.py``, ``tracking.py``: the standard library at import)."""
    import sys

    from recipe.retool import follow, tracking

    plan = check_launch.remote(stage, list(args), nodes, options)
    for line in plan["lines"]:
        print(line)
    if plan["error"]:
        print(f"error: {plan['error']}", file=sys.stderr)
        raise SystemExit(2)
    call = function.spawn(*args, **options)
    if stage in ("sft", "dapo"):
        experiment = plan["experiment"] or tracking.default_experiment(stage, call.object_id)
        url = follow.training_wandb_url(stage, experiment, plan["project"])
    elif stage == "eval":
        entity = tracking.launch_env().get("WANDB_ENTITY")
        url = tracking.run_url(EVAL_PROJECT, "", entity).removesuffix("/runs/")
    else:
        url = None
    lines = follow.follow_lines(app.app_id, call.object_id, what=what, wandb_url=url)
    print("\n".join(lines), flush=True)
    try:
        call.get()
    except Exception as exc:  # the run failed: its logs (streamed above, and kept) say why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {what} failed: {first} (modal app logs {app.app_id})", file=sys.stderr)
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
def evaluate(
    checkpoint: str = "latest",
    n: int = 0,
    max_problems: int = 0,
    experiment: str = "",
    force: bool = False,
) -> None:
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
# `make results EXPERIMENT=x`: the experiment's reports (run reports, metrics, checkpoint info,
# evaluation reports; never weights) from the volumes into `runs/<x>/`.
# `make wandb-sync`: upload the offline wandb runs kept on the checkpoints volume.


@app.function(image=trainer_image, volumes=VOLUMES, env=ENV, timeout=10 * MINUTES)
def result_files(experiment: str) -> dict[str, bytes]:
    """``{path relative to the checkpoints volume: bytes}`` of ``follow.result_files``."""
    from recipe.retool.follow import result_files as wanted

    _reload(checkpoints_volume)
    layout = paths.Layout.from_env()
    return {
        str(p.relative_to(layout.checkpoints)): p.read_bytes() for p in wanted(layout, experiment)
    }


@app.local_entrypoint()
def results(experiment: str = "retool", out: str = "runs") -> None:
    """Write ``result_files(experiment)`` under ``<out>/<experiment>/``, the volume's layout."""
    target = Path(out) / experiment
    files = result_files.remote(experiment)
    for relative, body in sorted(files.items()):
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        print(path)
    if not files:
        print(f"no reports for {experiment!r} yet (make status EXPERIMENT={experiment})")


@app.function(image=trainer_image, volumes=VOLUMES, secrets=secrets, env=ENV, timeout=2 * HOURS)
def wandb_sync() -> None:
    """``wandb sync`` every offline run under the volume's WANDB_DIR (needs WANDB_API_KEY)."""
    import subprocess
    import sys

    from recipe.retool import tracking

    _reload(checkpoints_volume)
    runs = sorted((tracking.wandb_dir(paths.Layout.from_env()) / "wandb").glob("offline-run-*"))
    if not runs:
        print("no offline wandb runs on the checkpoints volume")
        return
    if not os.environ.get("WANDB_API_KEY"):
        print("error: wandb sync needs WANDB_API_KEY in .env", file=sys.stderr)
        raise SystemExit(2)
    code = subprocess.run(["wandb", "sync", *map(str, runs)], check=False).returncode
    _commit(checkpoints_volume)  # wandb marks what it synced
    if code:
        raise SystemExit(code)


# ## Checkpoints


@app.function(image=trainer_image, volumes=VOLUMES, env=ENV, timeout=10 * MINUTES)
def list_checkpoints() -> str:
    """Print every checkpoint of every experiment, marking partial (interrupted) saves."""
    from recipe.retool.stages import describe_checkpoints

    _reload(checkpoints_volume)
    table = describe_checkpoints(paths.Layout.from_env())
    print(table)
    return table


@app.function(image=trainer_image, volumes=VOLUMES, env=ENV, timeout=2 * HOURS,
              memory=128 * 1024)  # fmt: skip
def merge_checkpoint(
    experiment_name: str, step: int, stage: str = "sft", force: bool = False
) -> str:
    """Merge a step's FSDP shards into HF safetensors (``<step>/huggingface``), verl's merger.

    Atomic: the merged weights are renamed into place once they load. A step that already has
    loadable weights is left alone unless ``--force`` (its weights are kept until the new load).
    """
    import sys

    from recipe.retool.stages import merge_checkpoint as merge

    _reload(checkpoints_volume)
    try:
        target = merge(paths.Layout.from_env(), stage, experiment_name, step, force=force)
    except (paths.CheckpointNotFound, ValueError) as exc:  # no such step; weights there already
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    _commit(checkpoints_volume)
    print(f"merged into {target}")
    return str(target)


@app.function(image=trainer_image, secrets=secrets, env=ENV, timeout=5 * MINUTES)  # .env: token
def check_sandbox_connection(url: str = "") -> None:
    """Run `print(2+2)` in the deployed sandbox and report latency (or why it failed)."""
    import sys

    from sandbox.client import SandboxClient, SandboxRequestError, SandboxUnavailable

    try:
        endpoint = url or modal_common.sandbox_url()
        result = SandboxClient(endpoint, max_retries=2).run_code_sync("print(2+2)")
    except (modal_common.SandboxNotDeployed, SandboxUnavailable, SandboxRequestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{endpoint}: status={result.status} stdout={result.stdout.strip()!r} "
          f"latency={result.latency_s * 1000:.0f} ms")  # fmt: skip
    if result.stdout.strip() != "4":
        raise SystemExit(1)
