"""A launch checked against the installed verl's own Hydra config before anything expensive
starts: the full override list composed (a misspelt key or a wrongly typed value fails in about a
second, the close matches named), counts that would quietly train nothing refused, the parallel
layout fitted to the GPU count, and for DAPO verl's own ``validate_config``."""

from __future__ import annotations

import difflib
import functools
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from recipe.retool.core.paths import Stage
from recipe.retool.core.request import LaunchError
from recipe.retool.core.topology import Topology
from recipe.retool.launch.commands import (
    format_value,
    load_stage_config,
    override_key,
)

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
    checks, for another verl entry (the fully-async trainer: ``async_plan.validate_async``)."""
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
