"""DAPO in either rollout mode: the synchronous ``main_ppo`` or verl's fully-async trainer.

``--rollout-mode=async`` runs ``verl.experimental.fully_async_policy`` instead of ``main_ppo``:
rollout replicas own some of a node's GPUs and generate continuously, the trainer owns the rest
and trains on whatever the rollouts have finished, and weights travel from trainer to rollout
after every ``trigger_parameter_sync_step`` optimizer steps. A step stops waiting for the longest
trajectory; the price is that samples are up to the staleness bound behind the policy, which the
truncated importance weights of ``algorithm.rollout_correction`` correct (docs/async-dapo.md).

The async override list is the sync one (``dapo_overrides``: the same tool, reward, reward
manager, fused log-probs and varlen attention) with ``config/dapo_async.yaml`` on top, then what
follows from the user's sync-style settings, so one argument list serves both modes:

* ``data.train_batch_size`` B with ``ppo_mini_batch_size`` M becomes one mini-batch of M prompts
  a trainer step and a weight sync every B/M steps: the optimizer steps between syncs are those
  of one synchronous step, and a checkpoint's ``global_step_N`` counts syncs as the sync path's
  counts steps;
* ``trainer.total_training_steps`` S becomes ``rollout.total_rollout_steps`` S x B prompts;
* ``--gpus`` splits into rollout and trainer GPUs per node (half each unless
  ``--rollout-gpus=N``), with rollout TP and actor SP scaled to their side.

Dynamic sampling does not reach the async path: verl's fully-async trainer reads neither
``algorithm.filter_groups`` nor the V1 custom sampler, so async runs train on every group.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from recipe.retool.core.paths import Layout
from recipe.retool.core.request import LaunchError, LaunchRequest
from recipe.retool.core.topology import Topology
from recipe.retool.launch.commands import (
    CONFIG_DIR,
    dapo_command,
    dapo_overrides,
    format_value,
    load_cpu_overlay,
    load_stage_config,
    override_key,
    scaled_parallelism,
    to_overrides,
)
from recipe.retool.launch.validation import compose, validate

ASYNC_CONFIG_FILE = CONFIG_DIR / "dapo_async.yaml"
# The fully-async trainer needs rollout and training on separate GPUs.
MIN_ASYNC_GPUS = 2
# Keys of the sync-only custom sampler (config/dapo.yaml), dropped from the async list: verl's
# fully-async trainer never reads them, and a config that names them would suggest it does.
SYNC_ONLY_PREFIX = "trainer.v1.sampler."
# Sync-style keys the async path translates (module docstring) rather than passes on.
TRANSLATED_KEYS = ("data.train_batch_size", "trainer.total_training_steps")
# Logical CPUs for the Ray that the fully-async entry starts on one node. Its own actors reserve
# 23 (task runner 1, trainer 10, rollouter 10, message queue 2) before any worker, agent loop or
# reward actor; a Ray with fewer waits forever to place them, with nothing in the log: one way
# to "hang at start" (verl #3895). Logical CPUs are scheduling tokens, not threads.
ASYNC_RAY_CPUS = 64
CPU_ENTRY_MODULE = "recipe.retool.local.cpu_async_ppo"


@dataclass(frozen=True)
class AsyncConfig:
    """``config/dapo_async.yaml``: which verl config and entry, and the async overrides."""

    verl_config: str
    verl_config_package: str
    entry_module: str
    overrides: dict[str, Any]


@functools.cache
def load_async_config() -> AsyncConfig:
    raw = yaml.safe_load(ASYNC_CONFIG_FILE.read_text())
    return AsyncConfig(
        raw["verl_config"], raw["verl_config_package"], raw["entry_module"], dict(raw["overrides"])
    )


@dataclass(frozen=True)
class GpuSplit:
    """GPUs per node for rollout replicas and for the trainer (every node is split alike)."""

    rollout: int
    trainer: int


def split_gpus(topo: Topology, rollout_gpus: int | None = None) -> GpuSplit:
    """Half of each node's GPUs generate, half train, unless ``--rollout-gpus`` says otherwise.

    Generation of 16k-token multi-turn ReTool trajectories took 228 s of a 375 s synchronous step
    in verl's 7B run: rollout and training are about even, hence the default of half."""
    gpus = topo.gpus_per_node
    if gpus < MIN_ASYNC_GPUS:
        raise LaunchError(
            f"--rollout-mode=async needs at least {MIN_ASYNC_GPUS} GPUs per node (rollout and "
            f"training run on separate GPUs); this launch has {gpus}"
        )
    rollout = gpus // 2 if rollout_gpus is None else rollout_gpus
    if not 1 <= rollout < gpus:
        raise LaunchError(
            f"--rollout-gpus={rollout}: choose 1 to {gpus - 1} of the {gpus} GPUs per node "
            "(the rest train)"
        )
    return GpuSplit(rollout=rollout, trainer=gpus - rollout)


def _given(overrides: Sequence[str]) -> set[str]:
    return {override_key(o) for o in overrides}


def async_overrides(
    layout: Layout,
    experiment: str,
    model_path: Path,
    topo: Topology,
    user_overrides: Sequence[str] = (),
    rollout_gpus: int | None = None,
) -> list[str]:
    """The full async override list: the sync base (user overrides excluded), the async YAML,
    the user's overrides but the translated ones, then what is derived and the user did not set."""
    split = split_gpus(topo, rollout_gpus)
    config = load_async_config()
    base = [
        o
        for o in dapo_overrides(layout, experiment, model_path, topo, ())
        if not override_key(o).startswith(SYNC_ONLY_PREFIX)
    ]
    user = list(user_overrides)
    derived = _derived(base, user, split, topo)
    given = _given(user)
    return [
        *base,
        *to_overrides(config.overrides),
        *[o for o in user if override_key(o) not in TRANSLATED_KEYS],
        *to_overrides({k: v for k, v in derived.items() if k not in given}),
    ]


def _derived(
    base: Sequence[str], user: Sequence[str], split: GpuSplit, topo: Topology
) -> dict[str, Any]:
    """What the async keys follow from: the sync-style batch, step count and GPU split."""
    config = load_async_config()
    try:
        sync_view = compose(config.verl_config, [*base, *user], config.verl_config_package)
    except LaunchError as exc:
        raise LaunchError(f"invalid dapo configuration: {exc}") from None
    batch = int(sync_view.data.train_batch_size)
    mini = int(sync_view.actor_rollout_ref.actor.ppo_mini_batch_size)
    if batch < 1 or batch % mini:
        raise LaunchError(
            f"data.train_batch_size={batch} must be a positive multiple of "
            f"ppo_mini_batch_size={mini} (async mode syncs weights every batch/mini steps)"
        )
    steps = sync_view.trainer.total_training_steps
    stage = load_stage_config("dapo").overrides
    tp_key = "actor_rollout_ref.rollout.tensor_model_parallel_size"
    sp_key = "actor_rollout_ref.actor.ulysses_sequence_parallel_size"
    derived: dict[str, Any] = {
        "trainer.n_gpus_per_node": split.trainer,
        "trainer.nnodes": topo.nnodes,
        "rollout.n_gpus_per_node": split.rollout,
        "rollout.nnodes": topo.nnodes,
        tp_key: scaled_parallelism(stage[tp_key], split.rollout),
        sp_key: scaled_parallelism(stage[sp_key], split.trainer * topo.nnodes),
        "async_training.trigger_parameter_sync_step": batch // mini,
        "rollout.total_rollout_steps": None if steps is None else int(steps) * batch,
    }
    if topo.device == "cpu":
        derived |= load_cpu_overlay("dapo_async").overrides
    if topo.nnodes == 1:  # a multi-node run joins a cluster whose nodes declared theirs
        derived["ray_kwargs.ray_init.num_cpus"] = ASYNC_RAY_CPUS
    return derived


def async_command(overrides: Sequence[str], topo: Topology) -> list[str]:
    """verl's fully-async entry; on CPU behind the shims of ``local/cpu_async_ppo.py``."""
    module = CPU_ENTRY_MODULE if topo.device == "cpu" else load_async_config().entry_module
    return [sys.executable, "-m", module, *overrides]


def check_async_parallelism(cfg: Any, topo: Topology) -> list[str]:
    """Rollout TP must divide the rollout GPUs, actor SP the trainer's, and a mini-batch's
    trajectories the trainer's data-parallel size."""
    rollout_gpus = int(cfg.rollout.n_gpus_per_node)
    trainer_world = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    tp = int(cfg.actor_rollout_ref.rollout.tensor_model_parallel_size)
    sp = int(cfg.actor_rollout_ref.actor.ulysses_sequence_parallel_size)
    errors = []
    if rollout_gpus % tp:
        errors.append(f"rollout TP {tp} does not divide the {rollout_gpus} rollout GPUs per node")
    if trainer_world % sp:
        errors.append(f"actor Ulysses SP {sp} does not divide the {trainer_world} trainer GPUs")
    elif rollout_gpus + int(cfg.trainer.n_gpus_per_node) != topo.gpus_per_node:
        errors.append(
            f"rollout.n_gpus_per_node={rollout_gpus} + trainer.n_gpus_per_node="
            f"{cfg.trainer.n_gpus_per_node} != {topo.gpus_per_node} GPUs per node "
            "(set the split with --rollout-gpus)"
        )
    else:
        trajectories = int(cfg.actor_rollout_ref.actor.ppo_mini_batch_size) * int(
            cfg.actor_rollout_ref.rollout.n
        )
        if trajectories % (trainer_world // sp):
            errors.append(
                f"ppo_mini_batch_size×n = {trajectories} is not divisible by the actor's "
                f"data-parallel size {trainer_world // sp}"
            )
    return errors


def validate_async(overrides: Sequence[str], topo: Topology) -> Any:
    """Compose against verl's ``fully_async_ppo_trainer`` config, as ``validate`` does
    the sync path; raise :class:`LaunchError` on any mistake."""
    config = load_async_config()
    return validate(
        "dapo",
        overrides,
        topo,
        verl_config=(config.verl_config, config.verl_config_package),
        parallelism=check_async_parallelism,
    )


def describe(composed: Any) -> list[str]:
    """What an async launch does differently, one line each, read from the composed config."""
    training = composed.async_training
    correction = composed.algorithm.rollout_correction
    rollout_gpus = int(composed.rollout.n_gpus_per_node)
    trainer_gpus = int(composed.trainer.n_gpus_per_node)
    lines = [
        f"rollout mode async: {rollout_gpus} rollout + {trainer_gpus} trainer GPUs per node, "
        f"weights synced every {training.trigger_parameter_sync_step} trainer steps of "
        f"{composed.actor_rollout_ref.actor.ppo_mini_batch_size} prompts "
        f"({composed.actor_rollout_ref.rollout.checkpoint_engine.backend})",
        f"staleness bound async_training.staleness_threshold={training.staleness_threshold}, "
        f"partial rollouts async_training.partial_rollout="
        f"{format_value(bool(training.partial_rollout))}",
    ]
    if correction.rollout_is:
        lines.append(
            f"off-policy correction: truncated IS per {correction.rollout_is}, "
            f"threshold {correction.rollout_is_threshold} (rollout_corr/* metrics)"
        )
    else:
        lines.append("off-policy correction: off (algorithm.rollout_correction.rollout_is=null)")
    lines.append(
        "dynamic sampling: off (verl's fully-async trainer reads neither filter_groups nor the "
        "custom sampler; every group trains, zero-advantage ones included)"
    )
    return lines


@dataclass(frozen=True)
class DapoPlan:
    """A validated DAPO launch: the override list, the command and what to print first."""

    overrides: list[str]
    command: list[str]
    composed: Any
    notes: list[str]


def plan_dapo(
    layout: Layout,
    experiment: str,
    model_path: Path,
    topo: Topology,
    request: LaunchRequest,
    extra_overrides: Sequence[str] = (),
) -> DapoPlan:
    """Compose and validate DAPO in the mode ``request.rollout_mode`` names (sync: main_ppo as
    before; async: the fully-async trainer). ``extra_overrides`` follow the user's."""
    user = [*request.overrides, *extra_overrides]
    if request.rollout_mode == "sync":
        overrides = dapo_overrides(layout, experiment, model_path, topo, user)
        composed = validate("dapo", overrides, topo)
        return DapoPlan(overrides, dapo_command(overrides, topo), composed, [])
    overrides = async_overrides(layout, experiment, model_path, topo, user, request.rollout_gpus)
    composed = validate_async(overrides, topo)
    return DapoPlan(overrides, async_command(overrides, topo), composed, describe(composed))
