"""One launch of a training stage, typed: what a user asks for after ``--`` (``--experiment-name``,
``--sft-checkpoint``, ...) and the verl overrides (``key=value``) that follow.

Launch arguments are read once, where they enter a process (:func:`parse`: the Modal app's
functions and the ``check`` CLI, ``python -m recipe.retool.launch check``). Everything below
takes the :class:`LaunchRequest`; where one crosses a process boundary again (``.remote`` /
``.spawn`` of a GPU function) it travels as :meth:`LaunchRequest.to_argv`, which :func:`parse`
reads back to the same request. Standard library only: the Modal app file imports it where only
modal is installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from recipe.retool.core.paths import Stage, check_experiment_name


class LaunchError(ValueError):
    """A user mistake in the launch configuration; the message says what and how to fix it."""


# Where DAPO's tool calls run (stages/tool_sandbox.py); no --sandbox: each node's own sandbox if
# its self-test passes, else a pool of Modal Sandboxes, else the run stops.
SANDBOX_CHOICES = ("node", "deployed", "modal")
# DAPO's trainer: verl's synchronous main_ppo, or its fully-async trainer (launch/async_plan.py).
ROLLOUT_MODES = ("sync", "async")


@dataclass(frozen=True)
class LaunchRequest:
    """What one launch of ``stage`` asks for. The GPU count is not here: it is fixed when the
    Modal function is defined (``RETOOL_GPUS=2 modal run ...``), so it lives in the topology."""

    stage: Stage
    experiment: str | None = None
    sft_checkpoint: str | None = None  # DAPO's start: a path or an SFT experiment name
    sandbox: str | None = None  # DAPO's tool sandbox, one of SANDBOX_CHOICES (None: the default)
    rollout_mode: str = "sync"  # DAPO's trainer, one of ROLLOUT_MODES
    rollout_gpus: int | None = None  # async DAPO: rollout GPUs per node (default: half)
    # Resume an experiment although it was started from another base model or dataset.
    allow_other_base: bool = False
    overrides: tuple[str, ...] = ()  # verl's Hydra overrides, in order: the last one wins

    def to_argv(self) -> list[str]:
        """The arguments :func:`parse` reads back to this request (``parse(stage, argv)``):
        options that differ from their default, then the overrides."""
        argv = []
        for option, name in _OPTION_NAMES.items():
            value = getattr(self, name)
            if value != _DEFAULTS[name]:  # an empty value as its own item: `--name=` reads on
                argv += [f"--{option}={value}"] if value != "" else [f"--{option}", ""]
        argv += [f"--{flag}" for flag, name in _FLAG_NAMES.items() if getattr(self, name)]
        return [*argv, *self.overrides]


_OPTION_NAMES = {
    "experiment-name": "experiment",
    "sft-checkpoint": "sft_checkpoint",
    "sandbox": "sandbox",
    "rollout-mode": "rollout_mode",
    "rollout-gpus": "rollout_gpus",
}
_FLAG_NAMES = {"allow-other-base": "allow_other_base"}  # options without a value
_DEFAULTS = {f.name: f.default for f in fields(LaunchRequest)}


def parse(stage: Stage, args: Sequence[str]) -> LaunchRequest:
    """The only reader of launch arguments: ``--name=value`` / ``--name value`` options apart
    from ``key=value`` Hydra overrides; a mistake raises :class:`LaunchError` in one line."""
    values: dict[str, Any] = {}
    overrides: list[str] = []
    items = list(args)
    while items:
        item = items.pop(0)
        if item == "--":
            continue
        if item.startswith("--") and item[2:] in _FLAG_NAMES:
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
    if "rollout_gpus" in values:
        if not values["rollout_gpus"].isdecimal():
            raise LaunchError(f"--rollout-gpus={values['rollout_gpus']}: expected a GPU count")
        values["rollout_gpus"] = int(values["rollout_gpus"])
    if "experiment" in values:
        try:
            check_experiment_name(values["experiment"])
        except ValueError as exc:
            raise LaunchError(f"--experiment-name: {exc}") from None
    return LaunchRequest(stage, overrides=tuple(overrides), **values)


def production_sized(request: LaunchRequest, model_path: Path | None = None) -> bool:
    """Whether a run trains the configured model on the prepared data: the cost line's estimate
    (``estimate_hours``) is for that run only, and would be wrong by orders of magnitude for the
    smoke's or the learning curve's small models and data."""
    return model_path is None and not any(
        o.startswith("data.train_files=") for o in request.overrides
    )
