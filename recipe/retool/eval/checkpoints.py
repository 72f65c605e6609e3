"""What is evaluated, and where its reports go.

A checkpoint spec (``base``, ``latest``, ``sft``, an experiment, a path) resolves to a
:class:`CheckpointRef`: its Hugging Face directory, checked to load, and the label its reports
are filed under (``<checkpoints>/eval/<label>``). A report is never overwritten: a second
evaluation of the same checkpoint is refused, or written beside the first and listed in the
index (:data:`INDEX_FILE`).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from recipe.retool.core.paths import (
    BASE_MODEL_ID,
    CheckpointNotFound,
    Layout,
    resolve_model_dir,
    weights_problem,
)
from recipe.retool.eval.config import EvalError

SUMMARY_FILE = "summary.json"  # written last, only by a successful run: "this eval is done"
INDEX_FILE = "index.jsonl"  # next to the report directories: one line per finished evaluation

_STEP_DIR = re.compile(r"^global_step_(\d+)$")
_STAGE_DIR = re.compile(r"^(sft|dapo)-experiments$")


@dataclass(frozen=True)
class CheckpointRef:
    """A model to evaluate: its HF directory plus what the report says about it."""

    label: str  # also the report directory's name: base, sft-<exp>-step<N>, ...
    path: Path
    stage: str | None = None  # base | sft | dapo | None (an arbitrary model directory)
    experiment: str | None = None
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    @classmethod
    def from_path(cls, path: Path) -> CheckpointRef:
        """Describe a directory; a ``<stage>-experiments/<exp>/global_step_N/...`` path keeps
        its stage, experiment and step; a step directory resolves to its HF weights."""
        path = Path(path)
        if not (path / "config.json").is_file():
            for sub in ("huggingface", "actor/huggingface"):
                if (path / sub / "config.json").is_file():
                    path = path / sub
                    break
        stage = experiment = step = None
        parts = path.parts
        for i, part in enumerate(parts):
            if _STAGE_DIR.match(part) and i + 1 < len(parts):
                stage, experiment = _STAGE_DIR.match(part).group(1), parts[i + 1]
            if _STEP_DIR.match(part):
                step = int(_STEP_DIR.match(part).group(1))
        if stage and step is not None:
            label = f"{stage}-{experiment}-step{step}"
        else:
            label = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.name).strip("-.") or "model"
        return cls(label, path, stage, experiment, step)


def check_model_dir(path: Path) -> None:
    """An HF model directory whose weights load (headers checked, :func:`weights_problem`), or a
    one-line error saying what is missing or broken."""
    if not path.is_dir():
        raise EvalError(f"checkpoint {path} does not exist")
    if not (path / "config.json").is_file():
        raise EvalError(f"{path} is not a Hugging Face model directory (no config.json)")
    if any(path.glob("pytorch_model*.bin")) and not any(path.glob("*.safetensors")):
        return  # pickled weights: no header to check without loading them
    if problem := weights_problem(path):
        raise EvalError(
            f"{problem}; merge the checkpoint first "
            "(modal run recipe/retool/retool_modal_sft.py::merge_checkpoint)"
        )


def resolve_checkpoint(spec: str, layout: Layout, base_model: str = BASE_MODEL_ID) -> CheckpointRef:
    """``base`` | ``latest`` (DAPO if any, else SFT) | ``sft`` | ``dapo`` | an experiment | a path.

    The same resolution serving uses (:func:`recipe.retool.core.paths.resolve_model_dir`), plus the
    label the reports are filed under.
    """
    if spec == "base":
        ref = CheckpointRef("base", layout.model_dir(base_model), "base")
    else:
        try:
            path = resolve_model_dir(layout, spec)
        except CheckpointNotFound as exc:
            raise EvalError(str(exc)) from None
        ref = CheckpointRef.from_path(path)
    check_model_dir(ref.path)
    return ref


def eval_dir(layout: Layout, label: str) -> Path:
    """Where a checkpoint's reports go by default: ``<checkpoints>/eval/<label>``."""
    return layout.checkpoints / "eval" / label


def has_report(directory: Path) -> bool:
    """Whether an evaluation wrote its reports to ``directory`` (finished or not)."""
    return (directory / SUMMARY_FILE).exists() or any(directory.glob("eval_*.json"))


def report_dir(out_dir: Path, *, force: bool = False) -> Path:
    """Where this evaluation writes: ``out_dir`` while it holds no report. A report there is
    never overwritten: without ``force`` the evaluation is refused; with it the new reports go
    to a sibling ``<out_dir>@<time>`` and both are listed in the index (:data:`INDEX_FILE`)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"--out-dir {out_dir} is a file, not a directory")
    if not has_report(out_dir):
        return out_dir
    if not force:
        raise EvalError(
            f"{out_dir} already holds a report; pass --force to keep it and write a new one "
            f"next to it (listed in {out_dir.parent / INDEX_FILE}), or choose --out-dir"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fresh = out_dir.with_name(f"{out_dir.name}@{stamp}")
    serial = 1
    while fresh.exists():  # two evaluations in one second
        serial += 1
        fresh = out_dir.with_name(f"{out_dir.name}@{stamp}.{serial}")
    return fresh


def add_to_index(out_dir: Path, summary: dict[str, Any]) -> None:
    """One JSON line per finished evaluation in ``<parent>/index.jsonl``: which checkpoint, with
    which settings, which report directory, what it scored (``O_APPEND``: lines never mix)."""
    cfg = summary["config"]
    entry = {
        "report": out_dir.name,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": summary["checkpoint"],
        "backend": summary["backend"],
        "n": cfg["n"],
        "max_problems": cfg["max_problems"],
        "mean@k": {name: o.get("mean@k") for name, o in summary["datasets"].items()},
    }
    with (out_dir.parent / INDEX_FILE).open("a") as index:
        index.write(json.dumps(entry, sort_keys=True) + "\n")
