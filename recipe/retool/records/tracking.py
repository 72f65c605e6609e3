"""Weights & Biases around a run: credentials checked before any GPU starts, one run per
experiment across retries, offline runs kept on the checkpoints volume, results logged.

verl's ``Tracking`` calls ``wandb.init(project, name, entity, config)`` and nothing else, so a
run's identity travels in the environment, which wandb reads: ``WANDB_RUN_ID`` (a stable id made
from the stage and the experiment, so every attempt and relaunch of one experiment continues one
run), ``WANDB_RESUME=allow`` (continue that run when it exists, start it when not) and
``WANDB_DIR`` (on the checkpoints volume, so an offline run outlives its container;
``make wandb-sync`` uploads it later).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recipe.retool.core.envfile import DOTENV, read_dotenv
from recipe.retool.core.paths import Layout

WANDB = "wandb"
WANDB_DIRNAME = "wandb"  # under the checkpoints root
# Modes in which wandb needs no account: it writes locally (offline) or not at all.
NO_KEY_MODES = frozenset({"offline", "disabled", "dryrun"})
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_MAX_ID = 96


def launch_env(dotenv: Path | None = None) -> dict[str, str]:
    """Where a launch looks for credentials: ``.env`` (:data:`DOTENV`, what Modal's containers
    get), with this process's environment on top."""
    return {**read_dotenv(dotenv or DOTENV), **os.environ}


def loggers(composed: Any) -> list[str]:
    """``trainer.logger`` of a composed verl config, as a list (verl accepts one name too)."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(composed, "trainer.logger", default=None)
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def wandb_ready(env: Mapping[str, str]) -> bool:
    """Whether wandb can start in ``env``: a key, or a mode that needs none."""
    return bool(env.get("WANDB_API_KEY")) or env.get("WANDB_MODE", "online") in NO_KEY_MODES


def check_wandb(composed: Any, env: Mapping[str, str]) -> None:
    """Raise :class:`LaunchError` when the run logs to wandb and wandb could not start: verl would
    raise only once the GPUs are up, and with no terminal to ask for a key."""
    from recipe.retool.core.request import LaunchError  # here: a launch client imports this module

    if WANDB in loggers(composed) and not wandb_ready(env):
        raise LaunchError(
            "trainer.logger includes wandb but WANDB_API_KEY is not set (environment or .env): "
            "add it to .env, or set WANDB_MODE=offline there (runs are kept on the checkpoints "
            "volume; `make wandb-sync` uploads them)"
        )


def default_experiment(stage: str, launch_id: str | None = None) -> str:
    """The name of a run launched without ``--experiment-name``: from ``launch_id`` (an id every
    attempt of one launch shares, e.g. Modal's function call id, so a retry resumes the same
    experiment) when given, else from the clock (a new experiment per call)."""
    return f"{stage}-{launch_id or time.strftime('%Y%m%d-%H%M%S')}"


def run_id(stage: str, experiment: str) -> str:
    """The wandb run id of ``stage``/``experiment``: the same for every attempt and relaunch.

    wandb ids may not contain ``/\\#?%:``; a name that needs changing (or is long) gets a short
    hash of the original, so two experiments never share an id."""
    raw = f"{stage}-{experiment}"
    safe = _UNSAFE.sub("-", raw)
    if safe == raw and len(raw) <= _MAX_ID:
        return raw
    digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
    return f"{safe[: _MAX_ID - 9]}-{digest}"


def wandb_dir(layout: Layout) -> Path:
    """Where wandb writes (``<dir>/wandb/offline-run-*`` when offline): the checkpoints volume."""
    return layout.checkpoints / WANDB_DIRNAME


def run_env(layout: Layout, stage: str, experiment: str) -> dict[str, str]:
    """The environment that gives a training run its stable wandb identity (module docstring)."""
    directory = wandb_dir(layout)
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "WANDB_RUN_ID": run_id(stage, experiment),
        "WANDB_RESUME": "allow",
        "WANDB_DIR": str(directory),
    }


def run_url(project: str, run: str, entity: str | None) -> str:
    """The run's page (wandb's default entity when ``entity`` is unknown here)."""
    return f"https://wandb.ai/{entity or '<your-entity>'}/{project}/runs/{run}"


def flat_numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested result (an evaluation summary), keys joined by ``/``."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flat_numbers(value, name + "/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def log_results(
    layout: Layout,
    *,
    project: str,
    run: str,
    metrics: Mapping[str, float],
    images: Mapping[str, Path] | None = None,
    env: Mapping[str, str] = os.environ,
) -> str | None:
    """Log a finished result (an evaluation, the learning curve) as the summary of wandb run
    ``run`` in ``project``, with its plots; returns the run's URL, or ``None`` (and says so) when
    wandb is not configured here. Logging never fails the result it reports."""
    if not wandb_ready(env):
        print("note: wandb is not configured (WANDB_API_KEY / WANDB_MODE): results not logged")
        return None
    import wandb

    directory = wandb_dir(layout)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        live = wandb.init(project=project, id=run, name=run, resume="allow", dir=str(directory))
        for key, value in metrics.items():
            live.summary[key] = value
        live.log(
            {name: wandb.Image(str(path)) for name, path in (images or {}).items() if path.exists()}
        )
        live.finish()
    except Exception as exc:  # a tracking outage must not lose the result it reports
        print(f"note: wandb logging failed ({type(exc).__name__}: {exc}); results are on disk")
        return None
    return run_url(project, run, env.get("WANDB_ENTITY"))


def check_credentials(env: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """Warnings about missing secrets, by name only (values are never printed). wandb's key is
    not a warning but a launch error where the run logs to wandb (``tracking.check_wandb``)."""
    notes = []
    if not env.get("HF_TOKEN"):
        notes.append("HF_TOKEN is not set: public models and datasets still download, rate-limited")
    return notes


def sync_offline_runs(layout: Layout) -> int:
    """``wandb sync`` every offline run under the volume's WANDB_DIR: its exit status, 0 when
    there is none, 2 (said in one line) without ``WANDB_API_KEY``."""
    import subprocess
    import sys

    runs = sorted((wandb_dir(layout) / "wandb").glob("offline-run-*"))
    if not runs:
        print("no offline wandb runs on the checkpoints volume")
        return 0
    if not os.environ.get("WANDB_API_KEY"):
        print("error: wandb sync needs WANDB_API_KEY in .env", file=sys.stderr)
        return 2
    return subprocess.run(["wandb", "sync", *map(str, runs)], check=False).returncode
