"""Where everything lives: volume names, mount points, experiment layout, checkpoint discovery.

One source of truth for the Modal app, the local smoke run and docker compose. The same layout
is used everywhere; only the roots differ (``/data`` on Modal, ``./runs/<ts>/data`` locally)::

    <data>/sft/train.parquet, <data>/rl/{train,aime_2024,aime_2025}.parquet
    <models>/Qwen/Qwen2.5-7B-Instruct/...
    <checkpoints>/sft-experiments/<exp>/global_step_N/huggingface/...   (SFT, verl sft_trainer)
    <checkpoints>/dapo-experiments/<exp>/global_step_N/actor/...         (DAPO, verl main_ppo)
    <checkpoints>/<stage>-experiments/<exp>/checkpoint_info.json, origin.json

A step directory is *complete* only when verl's tracker file (``latest_checkpointed_iteration.txt``,
written after all shards) has reached it and its Hugging Face weights are *loadable*
(:func:`weights_problem`: the config parses, every safetensors header parses and every tensor's
bytes are there); anything else is a partial or broken save and is never picked up by the next
stage, by evaluation or by serving.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
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
ORIGIN_FILE = "origin.json"  # what an experiment trains from (base model, data), from its launch
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

    def failed_call_file(self, call_id: str) -> Path:
        """Where a launch's failure that no retry can fix is kept for the retries of that
        function call (``modal_common.fail_for_good``)."""
        return self.checkpoints / ".failed-calls" / f"{call_id}.txt"


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
    problem: str | None  # why the step is not complete; None when it is

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def hf_dir(self) -> Path:
        """Hugging Face weights of this step (SFT saves them at the top, PPO under ``actor/``)."""
        return self.path / ("huggingface" if self.stage == "sft" else "actor/huggingface")


def _tracked_step(experiment_dir: Path) -> int:
    try:
        return int((experiment_dir / TRACKER_FILE).read_text().strip())
    except (OSError, ValueError):
        return -1


# Bytes per element of each safetensors dtype (the format's spec), to check a tensor's extent.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _safetensors_problem(path: Path) -> tuple[set[str], str | None]:
    """The tensor names in one safetensors file, and why it would not load (``None``: it would).

    Reads only the header: 8 bytes of length, then the JSON table of tensors and byte ranges,
    which is checked against each tensor's shape and dtype and against the file's size, so a
    truncated or half-written file is caught without loading a byte of weights."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return set(), f"{path.name}: {size} bytes, no safetensors header"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return set(), f"{path.name}: header of {length} bytes in a {size}-byte file"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as exc:
        return set(), f"{path.name}: unreadable safetensors header ({exc})"
    if not isinstance(header, dict):
        return set(), f"{path.name}: safetensors header is not a table"
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            start, stop = (int(x) for x in entry["data_offsets"])
            count = math.prod(int(d) for d in entry["shape"])
            width = _DTYPE_BYTES.get(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            return set(), f"{path.name}: malformed header entry for {name}"
        if stop < start or (width is not None and stop - start != count * width):
            return set(), f"{path.name}: {name} spans {stop - start} bytes, not {count} × {width}"
        end = max(end, stop)
    if size < 8 + length + end:
        return set(), f"{path.name}: truncated ({size} bytes of {8 + length + end})"
    return set(header), None


def weights_problem(hf_dir: Path) -> str | None:
    """Why ``hf_dir`` would not load with ``from_pretrained``, or ``None`` when it would.

    Cheap (headers only, no weights read): ``config.json`` parses; with an index, every tensor it
    maps is in the named shard's header; every safetensors file's header parses and its tensors'
    bytes are all present."""
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except OSError:
        return f"no config.json in {hf_dir}"
    except ValueError as exc:
        return f"{hf_dir / 'config.json'} does not parse ({exc})"
    if not isinstance(config, dict):
        return f"{hf_dir / 'config.json'} is not a mapping"
    index_file = hf_dir / SAFETENSORS_INDEX
    if index_file.exists():
        try:
            weight_map = dict(json.loads(index_file.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{index_file} does not parse ({exc})"
        files = sorted({hf_dir / str(name) for name in weight_map.values()})
    else:
        weight_map, files = {}, sorted(hf_dir.glob("*.safetensors"))
    if not files:
        return f"no *.safetensors weights in {hf_dir} (config only)"
    names: set[str] = set()
    for path in files:
        found, problem = _safetensors_problem(path)
        if problem:
            return f"{hf_dir}: {problem}"
        names |= found
    missing = sorted(set(weight_map) - names)
    if missing:
        return f"{hf_dir}: {len(missing)} tensor(s) of the index in no shard (first: {missing[0]})"
    return None


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
            ckpt = Checkpoint(stage, exp_dir.name, step, step_dir, problem=None)
            problem = (
                f"not saved to the end (verl's tracker is at step {tracked})"
                if step > tracked
                else weights_problem(ckpt.hf_dir)
            )
            found.append(Checkpoint(stage, exp_dir.name, step, step_dir, problem))
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
    base_model: str  # what the weights came from: the base model (SFT) or SFT step (DAPO)
    created_at: float = field(default_factory=time.time)
    metrics: dict[str, Any] = field(default_factory=dict)
    data: str = ""  # the training data (data.train_files); "" in files written before it was kept


def _write_json_atomic(target: Path, data: dict[str, Any]) -> Path:
    """Write JSON to a temp file and rename it into place: readers never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    Path(tmp).replace(target)
    return target


def write_checkpoint_info(layout: Layout, info: CheckpointInfo) -> Path:
    """Write ``checkpoint_info.json`` atomically (temp file + rename): readers never see half."""
    target = layout.experiment_dir(info.stage, info.experiment) / INFO_FILE
    return _write_json_atomic(target, asdict(info))


@dataclass(frozen=True)
class Origin:
    """What an experiment trains from, written at its first launch (``origin.json``) so that a
    relaunch under the same name, which resumes its weights, can be checked against it before
    ``checkpoint_info.json`` (written only at a clean finish) exists."""

    base_model: str  # the model directory the run starts from (DAPO: the SFT step)
    data: str  # data.train_files


def read_origin(layout: Layout, stage: Stage, experiment: str) -> Origin | None:
    """The experiment's recorded origin: ``origin.json``, else what an older run's
    ``checkpoint_info.json`` says (its data unknown: ``""``), else ``None``."""
    try:
        raw = json.loads((layout.experiment_dir(stage, experiment) / ORIGIN_FILE).read_text())
        return Origin(str(raw["base_model"]), str(raw["data"]))
    except (OSError, ValueError, KeyError, TypeError):
        info = read_checkpoint_info(layout, stage, experiment)
        return Origin(info.base_model, info.data) if info else None


def write_origin(layout: Layout, stage: Stage, experiment: str, origin: Origin) -> Path:
    target = layout.experiment_dir(stage, experiment) / ORIGIN_FILE
    return _write_json_atomic(target, asdict(origin))


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
        if problem := weights_problem(candidate):
            raise CheckpointNotFound(f"no base model at {candidate} ({problem}); run "
                                     "download_model first")  # fmt: skip
        return candidate
    as_path = Path(spec) if Path(spec).is_absolute() else layout.checkpoints / spec
    if as_path.is_dir():
        candidates = (as_path / "huggingface", as_path / "actor" / "huggingface", as_path)
        for candidate in candidates:
            if weights_problem(candidate) is None:
                return candidate
        configured = next((c for c in candidates if (c / "config.json").exists()), as_path)
        raise CheckpointNotFound(
            f"{as_path} has no Hugging Face weights that load ({weights_problem(configured)}); "
            "merge the checkpoint first "
            "(modal run recipe/retool/retool_modal_sft.py::merge_checkpoint)"
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


def resolve_sft_checkpoint(layout: Layout, requested: str | None) -> Path:
    """``--sft-checkpoint`` (a path or an SFT experiment name), else the latest complete SFT step.

    Always a directory with Hugging Face weights: verl writes ``huggingface/`` with config only
    unless ``hf_model`` is saved, and such a step is refused here, not after the GPUs start.
    """
    if not requested:
        return latest_checkpoint(layout, "sft").hf_dir
    is_path = "/" in requested or Path(requested).exists()
    return resolve_model_dir(layout, requested if is_path else f"sft/{requested}")
