"""Where everything lives: volume names, mount points, experiment layout, checkpoint discovery.

One source of truth for the Modal app, the local smoke run and docker compose. The same layout
is used everywhere; only the roots differ (``/data`` on Modal, ``./runs/<ts>/data`` locally)::

    <data>/sft/train.parquet, <data>/rl/{train,aime_2024,aime_2025}.parquet
    <models>/Qwen/Qwen2.5-7B-Instruct/...
    <checkpoints>/sft-experiments/<exp>/global_step_N/huggingface/...   (SFT, verl sft_trainer)
    <checkpoints>/dapo-experiments/<exp>/global_step_N/actor/...         (DAPO, verl main_ppo)
    <checkpoints>/<stage>-experiments/<exp>/checkpoint_info.json

A step directory is *complete* only when verl's tracker file (``latest_checkpointed_iteration.txt``,
written after all shards) has reached it and its Hugging Face weights exist; anything else is a
partial save from an interrupted run and is never picked up by the next stage.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Stage = Literal["sft", "dapo"]
STAGES: tuple[Stage, ...] = ("sft", "dapo")

BASE_MODEL_ID = "Qwen/Qwen2.5-7B-Instruct"
# Pinned so that a re-run downloads exactly the weights the docs' numbers came from.
BASE_MODEL_REVISION = "a09a35458c702b33eeacc393d103063234e8bc28"

DATA_VOLUME = "retool-sft-data"
MODELS_VOLUME = "retool-sft-models"
CHECKPOINTS_VOLUME = "retool-sft-checkpoints"

# The deployed sandbox (recipe/retool/modal_fusion_sandbox.py): DAPO looks its URL up by name.
SANDBOX_APP_NAME = "retool-sandbox"
SANDBOX_FUNCTION_NAME = "serve"

DATA_MOUNT = Path("/data")
MODELS_MOUNT = Path("/models")
CHECKPOINTS_MOUNT = Path("/checkpoints")
HF_CACHE = MODELS_MOUNT / ".hf-cache"  # HF_HOME in the trainer image: downloads persist

EVAL_SETS = ("aime_2024", "aime_2025")  # rl/<name>.parquet: DAPO validation and evaluation
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # written by verl after a complete save
INFO_FILE = "checkpoint_info.json"
_STEP_RE = re.compile(r"^global_step_(\d+)$")


class CheckpointNotFound(LookupError):
    """No complete checkpoint where one was expected (a user-facing, one-line error)."""


@dataclass(frozen=True)
class Layout:
    """The three roots. ``Layout.modal()`` for containers, ``Layout.local(dir)`` for CPU runs."""

    data: Path
    models: Path
    checkpoints: Path

    @classmethod
    def modal(cls) -> Layout:
        return cls(DATA_MOUNT, MODELS_MOUNT, CHECKPOINTS_MOUNT)

    @classmethod
    def local(cls, root: Path) -> Layout:
        return cls(root / "data", root / "models", root / "checkpoints")

    @classmethod
    def from_env(cls) -> Layout:
        """Modal's mounts, or a local root when ``RETOOL_ROOT`` is set (tests, ``.local()``)."""
        root = os.environ.get("RETOOL_ROOT")
        return cls.local(Path(root)) if root else cls.modal()

    def sft_train_file(self) -> Path:
        return self.data / "sft" / "train.parquet"

    def rl_file(self, name: str) -> Path:
        return self.data / "rl" / f"{name}.parquet"

    def model_dir(self, model_id: str = BASE_MODEL_ID) -> Path:
        return self.models / model_id

    def stage_root(self, stage: Stage) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        return self.checkpoints / f"{stage}-experiments"

    def experiment_dir(self, stage: Stage, experiment: str) -> Path:
        return self.stage_root(stage) / check_experiment_name(experiment)


def check_experiment_name(experiment: str) -> str:
    """``experiment`` when it can name one directory, else a ValueError saying what to change."""
    if not experiment or "/" in experiment or experiment.startswith("."):
        raise ValueError(
            f"invalid experiment name {experiment!r}: it names one directory, so it must be "
            "non-empty, without '/' and not start with '.' (e.g. retool-7b)"
        )
    return experiment


@dataclass(frozen=True)
class Checkpoint:
    stage: Stage
    experiment: str
    step: int
    path: Path
    complete: bool

    @property
    def hf_dir(self) -> Path:
        """Hugging Face weights of this step (SFT saves them at the top, PPO under ``actor/``)."""
        return self.path / ("huggingface" if self.stage == "sft" else "actor/huggingface")


def _tracked_step(experiment_dir: Path) -> int:
    try:
        return int((experiment_dir / TRACKER_FILE).read_text().strip())
    except (OSError, ValueError):
        return -1


def _has_hf_weights(hf_dir: Path) -> bool:
    return (hf_dir / "config.json").is_file() and any(hf_dir.glob("*.safetensors"))


def list_checkpoints(
    layout: Layout, stage: Stage, experiment: str | None = None
) -> list[Checkpoint]:
    """All step directories of a stage (one experiment or all), oldest first."""
    root = layout.stage_root(stage)
    if not root.is_dir():
        return []
    experiments = [root / experiment] if experiment else sorted(p for p in root.iterdir())
    found: list[Checkpoint] = []
    for exp_dir in experiments:
        if not exp_dir.is_dir():
            continue
        tracked = _tracked_step(exp_dir)
        for step_dir in exp_dir.iterdir():
            match = _STEP_RE.match(step_dir.name)
            if not match or not step_dir.is_dir():
                continue
            step = int(match.group(1))
            ckpt = Checkpoint(stage, exp_dir.name, step, step_dir, complete=False)
            complete = step <= tracked and _has_hf_weights(ckpt.hf_dir)
            found.append(Checkpoint(stage, exp_dir.name, step, step_dir, complete))
    return sorted(found, key=lambda c: (c.path.stat().st_mtime, c.step))


def latest_checkpoint(layout: Layout, stage: Stage, experiment: str | None = None) -> Checkpoint:
    """The newest complete checkpoint: the highest step of the most recently written experiment."""
    complete = [c for c in list_checkpoints(layout, stage, experiment) if c.complete]
    if not complete:
        where = layout.experiment_dir(stage, experiment) if experiment else layout.stage_root(stage)
        raise CheckpointNotFound(
            f"no complete {stage} checkpoint under {where}; run the {stage} stage first "
            f"(or pass an explicit checkpoint path)"
        )
    newest_exp = complete[-1].experiment
    return max((c for c in complete if c.experiment == newest_exp), key=lambda c: c.step)


@dataclass
class CheckpointInfo:
    """What ``checkpoint_info.json`` records about an experiment's latest complete checkpoint."""

    experiment: str
    stage: Stage
    step: int
    path: str
    base_model: str
    created_at: float = field(default_factory=time.time)
    metrics: dict[str, Any] = field(default_factory=dict)


def write_checkpoint_info(layout: Layout, info: CheckpointInfo) -> Path:
    """Write ``checkpoint_info.json`` atomically (temp file + rename): readers never see half."""
    target = layout.experiment_dir(info.stage, info.experiment) / INFO_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{INFO_FILE}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(info), handle, indent=2, sort_keys=True)
        handle.write("\n")
    Path(tmp).replace(target)
    return target


def read_checkpoint_info(layout: Layout, stage: Stage, experiment: str) -> CheckpointInfo | None:
    """The recorded info, or ``None`` when it is missing or unreadable (never raises)."""
    path = layout.experiment_dir(stage, experiment) / INFO_FILE
    try:
        raw = json.loads(path.read_text())
        return CheckpointInfo(**raw)
    except (OSError, ValueError, TypeError):
        return None


def resolve_model_dir(layout: Layout, spec: str | None = "latest") -> Path:
    """The Hugging Face directory a user means by ``spec`` (what serving loads):

    * ``latest`` (or empty): the latest complete DAPO checkpoint, else the latest complete SFT one;
    * ``sft`` / ``dapo``: the latest complete checkpoint of that stage;
    * ``base``: the base model on the models volume;
    * a directory, absolute or relative to the checkpoints root: a step directory (its
      ``huggingface/`` or ``actor/huggingface/`` is used) or a Hugging Face directory itself;
    * an experiment name, ``sft/<name>`` or ``dapo/<name>``: that experiment's latest complete step
      (a bare name found under both stages is ambiguous and must carry its stage).

    Raises :class:`CheckpointNotFound` with a one-line reason when nothing usable is there.
    """
    spec = (spec or "latest").strip()
    if spec == "latest":
        for stage in ("dapo", "sft"):
            try:
                return latest_checkpoint(layout, stage).hf_dir
            except CheckpointNotFound:
                continue
        raise CheckpointNotFound(
            f"no complete DAPO or SFT checkpoint under {layout.checkpoints}; train first, or name "
            "a checkpoint path, an experiment or `base`"
        )
    if spec in STAGES:
        return latest_checkpoint(layout, spec).hf_dir  # type: ignore[arg-type]
    if spec == "base":
        candidate = layout.model_dir()
        if not _has_hf_weights(candidate):
            raise CheckpointNotFound(f"no base model at {candidate}; run download_model first")
        return candidate
    as_path = Path(spec) if Path(spec).is_absolute() else layout.checkpoints / spec
    if as_path.is_dir():
        for candidate in (as_path / "huggingface", as_path / "actor" / "huggingface", as_path):
            if _has_hf_weights(candidate):
                return candidate
        raise CheckpointNotFound(
            f"{as_path} has no Hugging Face weights (config.json + *.safetensors); merge the "
            "checkpoint first (modal run recipe/retool/retool_modal_sft.py::merge_checkpoint)"
        )
    if Path(spec).is_absolute():
        raise CheckpointNotFound(f"no checkpoint directory at {spec}")
    stage_prefix, _, name = spec.partition("/")
    if name and stage_prefix in STAGES:
        return latest_checkpoint(layout, stage_prefix, name).hf_dir  # type: ignore[arg-type]
    if "/" in spec or spec.startswith("."):
        raise CheckpointNotFound(f"no checkpoint directory {as_path}")
    stages = [s for s in STAGES if layout.experiment_dir(s, spec).is_dir()]
    if not stages:
        raise CheckpointNotFound(
            f"{spec!r} is neither `latest`, `base`, a checkpoint directory nor an experiment under "
            f"{layout.stage_root('sft')} or {layout.stage_root('dapo')}"
        )
    if len(stages) > 1:
        raise CheckpointNotFound(f"experiment {spec!r} exists for both stages: say sft/{spec} or "
                                 f"dapo/{spec}")  # fmt: skip
    return latest_checkpoint(layout, stages[0], spec).hf_dir
