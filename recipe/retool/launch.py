"""Build and validate the SFT / DAPO command lines. Knows verl and Hydra, nothing about Modal.

Every stage is ``config/<stage>.yaml`` (verl overrides as data) + paths and topology filled in
here + the user's overrides, last wins. Before anything expensive starts, :func:`validate`
composes the full list against the installed verl's own Hydra config, so a misspelt key or a
wrongly typed value fails in about a second with the close matches named, and checks that the
parallel layout fits the GPU count.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import shlex
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from recipe.retool.paths import EVAL_SETS, Layout, Stage, check_experiment_name

CONFIG_DIR = Path(__file__).resolve().parent / "config"
RETOOL_DIR = Path(__file__).resolve().parent
REWARD_FILE = RETOOL_DIR / "verl_plugins" / "reward.py"
REWARD_MANAGER_FILE = RETOOL_DIR / "verl_plugins" / "reward_manager.py"
TOOL_CONFIG_FILE = RETOOL_DIR / "sandbox_fusion_modal_config.yaml"
SAMPLER_FILE = RETOOL_DIR / "verl_plugins" / "dapo_sampler.py"

# Price used for the cost line printed before launch. Source: a third-party listing of Modal's
# H100 price, May 2026 (about $3.95 per GPU-hour). Check modal.com/pricing before budgeting.
GPU_PRICE_PER_HOUR = {"H100": 3.95}

Device = Literal["cuda", "cpu"]


class LaunchError(ValueError):
    """A user mistake in the launch configuration; the message says what and how to fix it."""


@dataclass(frozen=True)
class StageConfig:
    verl_config: str
    estimate_hours: float
    overrides: dict[str, Any]


@functools.cache
def load_stage_config(stage: Stage) -> StageConfig:
    raw = yaml.safe_load((CONFIG_DIR / f"{stage}.yaml").read_text())
    return StageConfig(raw["verl_config"], float(raw["estimate_hours"]), dict(raw["overrides"]))


@dataclass(frozen=True)
class CpuOverlay:
    """What a stage changes to run on CPU (``make local-smoke``, CI): device, kernels, workers."""

    overrides: dict[str, Any]
    ray_cpus: int | None = None  # logical CPUs of the stage's Ray (DAPO)


@functools.cache
def load_cpu_overlay(name: str) -> CpuOverlay:
    """``config/<name>_cpu.yaml`` for ``sft``, ``dapo`` or ``dapo_async``: data beside the GPU
    configs, so the launcher needs nothing of the CPU runtime (``local/``) to build a command."""
    raw = yaml.safe_load((CONFIG_DIR / f"{name}_cpu.yaml").read_text())
    return CpuOverlay(dict(raw["overrides"]), raw.get("ray_cpus"))


@dataclass(frozen=True)
class Topology:
    """Where a stage runs. ``device="cpu"`` is the laptop smoke path (see local/cpu_compat.py)."""

    gpus_per_node: int = 8
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    device: Device = "cuda"
    gpu_type: str = "H100"

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or self.nnodes < 1:
            raise LaunchError(
                f"{self.gpus_per_node} GPUs per node on {self.nnodes} node(s): both must be >= 1 "
                "(--gpus / RETOOL_GPUS, --nodes / RETOOL_NODES)"
            )

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nnodes


@dataclass(frozen=True)
class LaunchArgs:
    """Options a user passes before the Hydra overrides (``--experiment-name=x``). The GPU count
    is fixed when the Modal function is defined: ``RETOOL_GPUS=2 modal run ...``."""

    experiment: str | None = None
    sft_checkpoint: str | None = None
    sandbox: str | None = None  # DAPO's tool sandbox, one of SANDBOX_CHOICES
    rollout_mode: str = "sync"  # DAPO's trainer, one of ROLLOUT_MODES (async_dapo.py)
    rollout_gpus: str | None = None  # async DAPO: rollout GPUs per node (default: half)
    overrides: list[str] = field(default_factory=list)
    # Resume an experiment although it was started from another base model or dataset.
    allow_other_base: bool = False


_OPTION_NAMES = {
    "experiment-name": "experiment",
    "sft-checkpoint": "sft_checkpoint",
    "sandbox": "sandbox",
    "rollout-mode": "rollout_mode",
    "rollout-gpus": "rollout_gpus",
}
_FLAG_NAMES = {"allow-other-base": "allow_other_base"}  # options without a value
# Where DAPO's tool calls run (recipe/retool/tool_sandbox.py); no --sandbox: each node's own
# sandbox if its self-test passes, else a pool of Modal Sandboxes, else the run stops.
SANDBOX_CHOICES = ("node", "deployed", "modal")
# DAPO's trainer: verl's synchronous main_ppo, or its fully-async trainer (async_dapo.py).
ROLLOUT_MODES = ("sync", "async")


def parse_launch_args(args: Sequence[str]) -> LaunchArgs:
    """Split ``--name=value`` / ``--name value`` options from ``key=value`` Hydra overrides."""
    values: dict[str, Any] = {}
    overrides: list[str] = []
    items = list(args)
    while items:
        item = items.pop(0)
        if item == "--":
            continue
        if item[2:] in _FLAG_NAMES:
            values[_FLAG_NAMES[item[2:]]] = True
        elif item.startswith("--"):
            name, _, value = item[2:].partition("=")
            if name not in _OPTION_NAMES:
                known = ", ".join(f"--{n}" for n in [*_OPTION_NAMES, *_FLAG_NAMES])
                raise LaunchError(
                    f"unknown option --{name} (known: {known}; Hydra keys: key=value)"
                )
            if not value:
                if not items or items[0].startswith("--"):
                    raise LaunchError(f"option --{name} needs a value")
                value = items.pop(0)
            values[_OPTION_NAMES[name]] = value
        elif "=" in item or item.startswith("~"):
            overrides.append(item)
        else:
            raise LaunchError(
                f"cannot read argument {item!r}: expected key=value or --option=value"
            )
    if values.get("sandbox", SANDBOX_CHOICES[0]) not in SANDBOX_CHOICES:
        raise LaunchError(f"--sandbox={values['sandbox']}: choose {' or '.join(SANDBOX_CHOICES)}")
    if values.get("rollout_mode", ROLLOUT_MODES[0]) not in ROLLOUT_MODES:
        raise LaunchError(
            f"--rollout-mode={values['rollout_mode']}: choose {' or '.join(ROLLOUT_MODES)}"
        )
    if "rollout_gpus" in values and not values["rollout_gpus"].isdigit():
        raise LaunchError(f"--rollout-gpus={values['rollout_gpus']}: expected a GPU count")
    if "experiment" in values:
        try:
            check_experiment_name(values["experiment"])
        except ValueError as exc:
            raise LaunchError(f"--experiment-name: {exc}") from None
    return LaunchArgs(overrides=overrides, **values)


def format_value(value: Any) -> str:
    """Render a Python value in Hydra's override grammar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./:\-+@~]+", text) and text not in {"true", "false", "null"}:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def to_overrides(mapping: dict[str, Any]) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in mapping.items()]


def attention_implementation() -> str:
    """The attention verl's trainers load on a GPU: torch's varlen flash attention
    (``verl_plugins/varlen_attention.py``), registered in each trainer process by
    ``verl_plugins/trainer_setup.py``.

    verl's FSDP actor asks transformers for ``flash_attention_2`` unless told otherwise, which
    needs the ``flash-attn`` package (no binary wheel for the image's torch); ``sdpa`` has no
    varlen kernel, so verl's packed micro-batches would attend through one quadratic mask.
    """
    from recipe.retool.verl_plugins.varlen_attention import NAME

    return NAME


def scaled_parallelism(configured: int, gpus: int) -> int:
    """The largest size that divides both the configured size (the 8-GPU layout) and ``gpus``:
    TP/SP 4 becomes 2 on 2 GPUs and 1 on one, so ``--gpus N`` needs no hand-written overrides."""
    return math.gcd(int(configured), max(int(gpus), 1))


def sft_overrides(
    layout: Layout,
    experiment: str,
    model_path: Path,
    topo: Topology,
    user_overrides: Iterable[str] = (),
    *,
    train_file: Path | None = None,
) -> list[str]:
    """The full SFT override list: YAML base, then paths and topology, then device, then user."""
    stage = load_stage_config("sft")
    filled = {
        "data.train_files": str(train_file or layout.sft_train_file()),
        "model.path": str(model_path),
        "trainer.experiment_name": experiment,
        "trainer.default_local_dir": str(layout.experiment_dir("sft", experiment)),
        "trainer.n_gpus_per_node": topo.gpus_per_node,
        "trainer.nnodes": topo.nnodes,
        "engine.ulysses_sequence_parallel_size": scaled_parallelism(
            stage.overrides["engine.ulysses_sequence_parallel_size"], topo.world_size
        ),
    }
    if topo.device == "cpu":
        device = to_overrides(load_cpu_overlay("sft").overrides)
    else:
        device = [f"+model.override_config.attn_implementation={attention_implementation()}"]
    return [*to_overrides(stage.overrides), *to_overrides(filled), *device, *user_overrides]


def sft_command(overrides: Sequence[str], topo: Topology) -> list[str]:
    """``torchrun`` for one node of the SFT job (multi-node: static rendezvous on node 0)."""
    # Both run verl's sft_trainer after the trainer plugins (trainer_setup.py); the CPU one first
    # installs its CPU shims.
    module = (
        "recipe.retool.local.cpu_compat"
        if topo.device == "cpu"
        else "recipe.retool.verl_plugins.trainer_setup"
    )
    if topo.nnodes == 1:
        rdzv = ["--standalone"]
    else:
        rdzv = [
            f"--nnodes={topo.nnodes}",
            f"--node_rank={topo.node_rank}",
            f"--master_addr={topo.master_addr}",
            f"--master_port={topo.master_port}",
        ]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    return [*torchrun, *rdzv, f"--nproc_per_node={topo.gpus_per_node}", "-m", module, *overrides]


def dapo_overrides(
    layout: Layout,
    experiment: str,
    model_path: Path,
    topo: Topology,
    user_overrides: Iterable[str] = (),
) -> list[str]:
    """The full DAPO override list: YAML base, then paths and topology, then device, then user.
    The tool reads the sandbox URL from SANDBOX_FUSION_ENDPOINT."""
    stage = load_stage_config("dapo")
    tp_key = "actor_rollout_ref.rollout.tensor_model_parallel_size"
    sp_key = "actor_rollout_ref.actor.ulysses_sequence_parallel_size"
    filled = {
        "data.train_files": str(layout.rl_file("train")),
        "data.val_files": [str(layout.rl_file(name)) for name in EVAL_SETS],
        "actor_rollout_ref.model.path": str(model_path),
        "actor_rollout_ref.rollout.multi_turn.tool_config_path": str(TOOL_CONFIG_FILE),
        "reward.custom_reward_function.path": str(REWARD_FILE),
        "reward.reward_manager.module.path": str(REWARD_MANAGER_FILE),
        "trainer.v1.sampler.custom_sampler.path": str(SAMPLER_FILE),
        "trainer.experiment_name": experiment,
        "trainer.default_local_dir": str(layout.experiment_dir("dapo", experiment)),
        "trainer.n_gpus_per_node": topo.gpus_per_node,
        "trainer.nnodes": topo.nnodes,
        tp_key: scaled_parallelism(stage.overrides[tp_key], topo.gpus_per_node),
        sp_key: scaled_parallelism(stage.overrides[sp_key], topo.world_size),
    }
    if topo.device == "cpu":
        device = _cpu_dapo_overrides(topo)
    else:
        device = [
            f"++actor_rollout_ref.model.override_config.attn_implementation="
            f"{attention_implementation()}"
        ]
    return [*to_overrides(stage.overrides), *to_overrides(filled), *device, *user_overrides]


def _cpu_dapo_overrides(topo: Topology) -> list[str]:
    """``config/dapo_cpu.yaml``, plus on one node the Ray resources main_ppo's own ``ray.init``
    declares: a logical "GPU" per training rank (see ``local/cpu_compat.py``) and the overlay's
    ``ray_cpus``. A multi-node run joins a cluster whose nodes declared theirs
    (:func:`ray_node_command`)."""
    overlay = load_cpu_overlay("dapo")
    overrides = to_overrides(overlay.overrides)
    if topo.nnodes > 1:
        return overrides
    ray_init = [
        f"++ray_kwargs.ray_init.num_gpus={topo.gpus_per_node}",
        f"ray_kwargs.ray_init.num_cpus={overlay.ray_cpus}",
    ]
    return [*overrides, *ray_init]


def dapo_command(overrides: Sequence[str], topo: Topology) -> list[str]:
    """verl's ``main_ppo``; on CPU behind the shims of ``local/cpu_ppo.py``."""
    module = "recipe.retool.local.cpu_ppo" if topo.device == "cpu" else "verl.trainer.main_ppo"
    return [sys.executable, "-m", module, *overrides]


RAY_PORT = 6379


def ray_node_command(topo: Topology) -> list[str]:
    """``ray start`` for one node of a multi-node DAPO job: node 0 is the head, others join it.

    ``main_ppo`` then runs on node 0 only, with ``RAY_ADDRESS`` pointing at the head, and verl
    places its workers across every GPU the cluster reports. On CPU the GPUs are logical (one per
    training rank, ``local/cpu_compat.py``) and each node declares the logical CPUs main_ppo's
    actors reserve (``ray_cpus`` of ``config/dapo_cpu.yaml``), however few cores it has.
    """
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--num-gpus={topo.gpus_per_node}"]
    if topo.device == "cpu":
        ray.append(f"--num-cpus={load_cpu_overlay('dapo').ray_cpus}")
    if topo.node_rank == 0:
        return [*ray, "--head", f"--node-ip-address={topo.master_addr}", f"--port={RAY_PORT}"]
    return [*ray, f"--address={ray_address(topo)}", "--block"]


def ray_address(topo: Topology) -> str:
    """The Ray head's GCS address: node 0's, on :data:`RAY_PORT`."""
    return f"{topo.master_addr}:{RAY_PORT}"


# ---------------------------------------------------------------------------------------------
# Validation against verl's own Hydra config
# ---------------------------------------------------------------------------------------------


# The package whose config/ holds a verl config: ppo_trainer and sft_trainer_engine live in
# verl.trainer; the fully-async trainer's config in its own package (config/dapo_async.yaml).
VERL_TRAINER_PACKAGE = "verl.trainer"


def _verl_config_dir(package: str = VERL_TRAINER_PACKAGE) -> str:
    import importlib

    return str(Path(importlib.import_module(package).__file__).parent / "config")


def _leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key in a composed config, read without resolving interpolations."""
    from omegaconf import DictConfig

    keys: list[str] = []
    for key in cfg:
        path = f"{prefix}{key}"
        keys.append(path)
        child = cfg._get_node(key)
        if isinstance(child, DictConfig):
            keys.extend(_leaf_keys(child, path + "."))
    return keys


@functools.cache
def _base_config(verl_config: str, package: str = VERL_TRAINER_PACKAGE):
    return _compose(verl_config, (), package)


# Hydra's config search path is process-global: stages launched from threads (the learning
# curve's arms) compose one at a time.
_HYDRA_LOCK = threading.Lock()


def _compose(verl_config: str, overrides: Sequence[str], package: str = VERL_TRAINER_PACKAGE):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with _HYDRA_LOCK:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=_verl_config_dir(package), version_base=None):
            return compose(config_name=verl_config, overrides=list(overrides))


def compose(verl_config: str, overrides: Sequence[str], package: str = VERL_TRAINER_PACKAGE):
    """``overrides`` composed against a verl config; a mistake raises :class:`LaunchError`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return _compose(verl_config, overrides, package)
    except (HydraException, OmegaConfBaseException) as exc:
        raise LaunchError(_explain_compose_error(str(exc), verl_config, package)) from None


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def override_value(overrides: Sequence[str], key: str) -> str | None:
    """The value the last override of ``key`` sets (the one verl sees), as written."""
    values = [o.split("=", 1)[1] for o in overrides if "=" in o and override_key(o) == key]
    return values[-1] if values else None


# Numeric keys for which verl also accepts a word ("after_each_epoch" in its SFT trainer).
STRING_ALSO_ACCEPTED = frozenset({"trainer.save_freq", "trainer.test_freq"})


def _type_errors(base, composed, overrides: Sequence[str]) -> list[str]:
    """Values whose type contradicts verl's default (e.g. ``trainer.total_epochs=two``)."""
    from omegaconf import OmegaConf

    errors = []
    last_value_of = {override_key(o): o for o in overrides if not o.startswith(("+", "~"))}
    for key in last_value_of:
        if key in STRING_ALSO_ACCEPTED:
            continue
        default = OmegaConf.select(base, key, throw_on_missing=False)
        value = OmegaConf.select(composed, key, throw_on_missing=False)
        if default is None or value is None:
            continue
        numeric = isinstance(default, int | float) and not isinstance(default, bool)
        if isinstance(default, bool) and not isinstance(value, bool):
            errors.append(f"{key}={value!r}: expected true or false")
        elif numeric and (isinstance(value, bool) or not isinstance(value, int | float)):
            errors.append(f"{key}={value!r}: expected a number")
        elif numeric and isinstance(default, int) and isinstance(value, float):
            errors += [] if value.is_integer() else [f"{key}={value!r}: expected an integer"]
    return errors


def validate(
    stage: Stage,
    overrides: Sequence[str],
    topo: Topology,
    *,
    verl_config: tuple[str, str] | None = None,
    parallelism: Callable[[Any, Topology], list[str]] | None = None,
):
    """Compose ``overrides`` against verl's config; raise :class:`LaunchError` on any mistake.

    ``verl_config`` (name, package) and ``parallelism`` replace the stage's config and layout
    checks, for another verl entry (the fully-async trainer: ``async_dapo.validate_async``)."""
    name, package = verl_config or (load_stage_config(stage).verl_config, VERL_TRAINER_PACKAGE)
    composed = compose(name, overrides, package)
    errors = _type_errors(_base_config(name, package), composed, overrides)
    if not errors:  # the checks below read these values as numbers
        # another verl entry (the fully-async trainer) brings its own minima and layout checks
        errors += _range_errors(stage, composed) if verl_config is None else []
    if not errors:
        check = parallelism or functools.partial(check_parallelism, stage)
        errors += check(composed, topo)
    if not errors and stage == "dapo" and verl_config is None:
        # main_ppo's own checks; verl's fully-async entry runs none (its train_batch_size is 0)
        errors += _verl_ppo_checks(composed)
    if errors:
        raise LaunchError(f"invalid {stage} configuration: " + "; ".join(errors))
    return composed


# Counts that verl 0.9.1 takes without complaint below their minimum and then quietly does nothing
# with (trainer.total_epochs=-5 trains zero epochs): key -> smallest value that works. A null
# (verl's "unset") passes.
_MINIMA: dict[Stage, dict[str, int]] = {
    "sft": {
        "trainer.total_epochs": 1,
        "data.train_batch_size": 1,
        "data.micro_batch_size_per_gpu": 1,
        "data.max_length": 1,
        "trainer.total_training_steps": 1,
    },
    "dapo": {
        "trainer.total_epochs": 1,
        "data.train_batch_size": 1,
        "trainer.total_training_steps": 1,
        "actor_rollout_ref.rollout.n": 1,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 1,
        "data.max_prompt_length": 1,
        "data.max_response_length": 1,
    },
}


def _range_errors(stage: Stage, cfg: Any) -> list[str]:
    """Counts below the least that can train (:data:`_MINIMA`)."""
    from omegaconf import OmegaConf

    errors = []
    for key, least in _MINIMA[stage].items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < least:
            errors.append(f"{key}={format_value(value)}: must be >= {least}")
    return errors


# Keys verl 0.9.1 reads in one batching mode only, by the switch that picks the mode: with dynamic
# batch sizes micro-batches are cut by tokens, otherwise by count (verl.workers.engine.utils.
# prepare_micro_batches; the actor's switch also governs its log-prob pass).
_MODE_ONLY_KEYS = {
    "sft": ("data.use_dynamic_bsz", {
        True: ("data.micro_batch_size_per_gpu",),
        False: ("data.max_token_len_per_gpu",),
    }),
    "dapo": ("actor_rollout_ref.actor.use_dynamic_bsz", {
        True: ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
               "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu"),
        False: ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
                "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu"),
    }),
}  # fmt: skip


def ineffective_overrides(stage: Stage, composed: Any, user_overrides: Sequence[str]) -> list[str]:
    """The user's overrides that the composed config leaves unread, each with the reason."""
    from omegaconf import OmegaConf

    switch, unread = _MODE_ONLY_KEYS[stage]
    mode = bool(OmegaConf.select(composed, switch))
    given = {override_key(o) for o in user_overrides if not o.startswith("~")}
    return [
        f"{key} has no effect while {switch}={format_value(mode)}"
        for key in unread[mode]
        if key in given
    ]


def _verl_ppo_checks(cfg: Any) -> list[str]:
    """verl's own ``validate_config`` (what main_ppo runs first), here before any GPU starts."""
    import contextlib
    import io

    from hydra.errors import HydraException
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            validate_config(
                config=cfg,
                use_reference_policy=need_reference_policy(cfg),
                use_critic=need_critic(cfg),
            )
    except (AssertionError, ValueError, TypeError, HydraException) as exc:
        # Instantiation errors wrap the real one: "Error in call to target ...\nAssertionError(..)".
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        cause = next((line for line in lines if "Error(" in line), lines[0] if lines else "")
        return [f"verl rejects it: {cause}"]
    return []


def _explain_compose_error(
    message: str, verl_config: str, package: str = VERL_TRAINER_PACKAGE
) -> str:
    first = message.strip().splitlines()[0]
    match = re.search(r"override '([^']+)'|Key '([^']+)'", message)
    if not match:
        return f"invalid override: {first}"
    key = next(g for g in match.groups() if g)
    if not key:
        return f"invalid override: {first}"
    known = _leaf_keys(_base_config(verl_config, package))
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown key '{key}' in verl's {verl_config} config{hint} (prefix '+' to add a new key)"


def check_parallelism(stage: Stage, cfg: Any, topo: Topology) -> list[str]:
    """Parallel sizes must divide the GPU count and batches must split evenly."""
    world = topo.world_size
    errors: list[str] = []
    if stage == "sft":
        sp = int(cfg.engine.ulysses_sequence_parallel_size)
        if world % sp:
            errors.append(f"Ulysses SP {sp} does not divide {world} GPUs")
        else:
            dp = world // sp
            if int(cfg.data.train_batch_size) % dp:
                errors.append(
                    f"data.train_batch_size={cfg.data.train_batch_size} is not divisible by the "
                    f"data-parallel size {dp} ({world} GPUs / SP {sp})"
                )
        return errors
    rollout = cfg.actor_rollout_ref.rollout
    actor = cfg.actor_rollout_ref.actor
    tp = int(rollout.tensor_model_parallel_size)
    sp = int(actor.ulysses_sequence_parallel_size)
    if topo.gpus_per_node % tp:
        errors.append(f"rollout TP {tp} does not divide {topo.gpus_per_node} GPUs per node")
    if world % sp:
        errors.append(f"actor Ulysses SP {sp} does not divide {world} GPUs")
    n = int(rollout.n)
    mini = int(actor.ppo_mini_batch_size)
    batch = int(cfg.data.train_batch_size)
    if batch % mini:
        errors.append(
            f"data.train_batch_size={batch} is not divisible by ppo_mini_batch_size={mini}"
        )
    if not errors and (mini * n) % (world // sp):
        errors.append(
            f"ppo_mini_batch_size×n = {mini * n} is not divisible by the actor's data-parallel "
            f"size {world // sp}"
        )
    return errors


def estimate_cost(stage: Stage, topo: Topology) -> str:
    """One line: GPU-hours × price, from the stage's ``estimate_hours`` (scaled by GPU count)."""
    hours = load_stage_config(stage).estimate_hours * 8 / max(topo.world_size, 1)
    gpu_hours = hours * topo.world_size
    line = f"{stage}: ~{hours:.1f} h on {topo.world_size}×{topo.gpu_type} = {gpu_hours:.0f} GPU-h"
    price = GPU_PRICE_PER_HOUR.get(topo.gpu_type)
    if price is None:
        return f"{line} (no price on file for {topo.gpu_type})"
    return f"{line} ≈ ${gpu_hours * price:,.0f} at ${price}/GPU-h (third-party listing, May 2026)"


def render(command: Sequence[str]) -> str:
    """A copy-pasteable shell line (for logs and dry runs)."""
    return shlex.join(command)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recipe.retool.launch check sft|dapo [--gpus N] [--nodes N] [ARGS...]``.

    The dry run Modal lacks: validates a launch exactly as ``train``/``train_dapo`` will, on this
    machine, before any GPU starts (``make sft``/``make dapo`` run it first), and prints the
    command line and the cost line.
    """
    import argparse

    from recipe.retool.paths import BASE_MODEL_ID, MODELS_MOUNT
    from recipe.retool.tracking import check_wandb, launch_env

    parser = argparse.ArgumentParser(
        prog="python -m recipe.retool.launch", description=main.__doc__
    )
    parser.add_argument("action", choices=["check"])
    parser.add_argument("stage", choices=["sft", "dapo"])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node (RETOOL_GPUS)")
    parser.add_argument("--nodes", type=int, default=1)
    ns, rest = parser.parse_known_args(argv)  # the rest: options and overrides, as after --
    layout = Layout.from_env()  # the volumes in a container, RETOOL_ROOT in a test
    try:
        topo = Topology(gpus_per_node=ns.gpus, nnodes=ns.nodes)
        parsed = parse_launch_args(rest)
        experiment = parsed.experiment or f"{ns.stage}-<timestamp>"
        if ns.stage == "sft":
            model = MODELS_MOUNT / BASE_MODEL_ID
            overrides = sft_overrides(layout, experiment, model, topo, parsed.overrides)
            command = sft_command(overrides, topo)
            composed = validate(ns.stage, overrides, topo)
            notes: list[str] = []
        else:
            from recipe.retool.async_dapo import plan_dapo

            model = Path(parsed.sft_checkpoint or "<latest complete SFT checkpoint>")
            plan = plan_dapo(layout, experiment, model, topo, parsed)
            overrides, command, composed, notes = (
                plan.overrides,
                plan.command,
                plan.composed,
                plan.notes,
            )
        start = _dapo_start_note(layout, parsed.sft_checkpoint) if ns.stage == "dapo" else None
        check_wandb(composed, launch_env())
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    for warning in ineffective_overrides(ns.stage, composed, parsed.overrides):
        print(f"warning: {warning}", file=sys.stderr)
    print(render(command))
    print(f"ok: {len(overrides)} overrides compose against verl's config")
    if start:
        print(start)
    print(estimate_cost(ns.stage, topo))
    return 0


def _dapo_start_note(layout: Layout, requested: str | None) -> str:
    """What ``check`` can say of DAPO's start: checked here where the checkpoints volume is
    mounted, else (a laptop) left to the launch, which refuses a missing or broken one in one
    line (``stages.resolve_sft_checkpoint``)."""
    what = f"--sft-checkpoint={requested}" if requested else "the latest complete SFT checkpoint"
    if not layout.checkpoints.is_dir():
        return (
            f"note: DAPO's start ({what}) is checked at launch: {layout.checkpoints} (the "
            "checkpoints volume) is not mounted here"
        )
    from recipe.retool.paths import CheckpointNotFound
    from recipe.retool.stages import resolve_sft_checkpoint

    try:
        return f"DAPO starts from {resolve_sft_checkpoint(layout, requested)}"
    except CheckpointNotFound as exc:
        raise LaunchError(str(exc)) from None


if __name__ == "__main__":
    # Run the importable copy: the modules main() calls (async_dapo) raise
    # recipe.retool.launch.LaunchError, which this __main__ copy's LaunchError would not catch.
    from recipe.retool import launch as importable

    sys.exit(importable.main())
