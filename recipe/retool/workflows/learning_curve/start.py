"""The proof's kept start (``recipe/retool/curve_start/``): one SFT checkpoint of the small model
with the record of how it was made, each file's sha256 checked before a proof uses it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from recipe.retool.workflows.learning_curve.stats import NoStartInBand

START_DIR = Path(__file__).resolve().parents[2] / "curve_start"  # data, beside config/


START_RECORD = "start.json"


class StartRefused(NoStartInBand):
    """The kept start is missing, differs from its record, or scores outside the band here."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


REMAKE_HINT = "remake it with `python -m recipe.retool.workflows.learning_curve --make-start`"


def read_start(directory: Path) -> dict[str, Any]:
    """The start's record, once every file it lists has been found with its recorded sha256."""
    record_file = directory / START_RECORD
    if not record_file.is_file():
        raise StartRefused(f"no start checkpoint at {directory} (no {START_RECORD}): {REMAKE_HINT}")
    record = json.loads(record_file.read_text())
    for name, digest in record["files"].items():
        path = directory / name
        if not path.is_file() or _sha256(path) != digest:
            raise StartRefused(
                f"the start checkpoint's {name} is missing or differs from {record_file}: "
                f"{REMAKE_HINT}"
            )
    return record


def export_start(hf_dir: Path, out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Copy an SFT step's Hugging Face files to ``out`` with its record (hashes added); the
    directory is replaced as a whole, so a reader never sees half of two starts."""
    staging = out.with_name(out.name + ".making")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files = {}
    for src in sorted(p for p in hf_dir.iterdir() if p.is_file()):
        shutil.copy2(src, staging / src.name)
        files[src.name] = _sha256(staging / src.name)
    record = {**record, "files": files}
    (staging / START_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return record
