"""The problems an evaluation samples: rows of a verl RL parquet (``prep``'s layout)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipe.retool.eval.config import DEFAULT_DATASETS, EvalError


@dataclass(frozen=True)
class Problem:
    index: int  # row in the file
    source_id: str
    data_source: str
    messages: list[dict[str, Any]]
    ground_truth: str
    tools_kwargs: dict[str, Any] = field(default_factory=dict)


def load_problems(path: Path, max_problems: int | None = None) -> list[Problem]:
    """Rows of a verl RL parquet (``prep.RL_SCHEMA``): prompt, reward_model, extra_info."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise EvalError(
            f"dataset {path} not found; run prep first (python -m recipe.retool.data.prep)"
        )
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise EvalError(f"cannot read {path}: {exc}") from None
    missing = {"prompt", "reward_model"} - set(table.column_names)
    if missing:
        raise EvalError(f"{path} is not a verl RL file (missing columns {sorted(missing)})")
    rows = table.to_pylist()[:max_problems] if max_problems else table.to_pylist()
    problems = []
    for i, row in enumerate(rows):
        extra = row.get("extra_info") or {}
        truth = (row.get("reward_model") or {}).get("ground_truth")
        if not row.get("prompt") or truth is None:
            raise EvalError(f"{path} row {i}: empty prompt or ground truth")
        problems.append(
            Problem(
                index=i,
                source_id=str(extra.get("source_id", extra.get("index", i))),
                data_source=row.get("data_source") or "math_dapo",
                messages=[{"role": m["role"], "content": m["content"]} for m in row["prompt"] if m],
                ground_truth=str(truth),
                tools_kwargs={
                    k: v for k, v in (extra.get("tools_kwargs") or {}).items() if v is not None
                },
            )
        )
    if not problems:
        raise EvalError(f"{path} has no rows")
    return problems


def dataset_paths(data_dir: Path, names: Sequence[str]) -> dict[str, Path]:
    """``<data>/rl/<name>.parquet`` (the prep layout), or ``<data_dir>/<name>.parquet``."""
    if not names:
        raise EvalError(
            f"no dataset named: pass --datasets as a comma-separated list, e.g. "
            f"{','.join(DEFAULT_DATASETS)}"
        )
    found = {}
    for name in names:
        candidates = [data_dir / "rl" / f"{name}.parquet", data_dir / f"{name}.parquet"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise EvalError(
                f"dataset {name!r} not found (looked for {candidates[0]} and {candidates[1]}); "
                "run prep first (python -m recipe.retool.data.prep)"
            )
        found[name] = path
    return found
