"""The learning curve's statistics: where DAPO starts, and whether a rise is more than noise.

Two questions decide whether a curve shows anything:

* **Where to start.** GRPO learns only from groups whose samples score differently. A start that
  solves nothing or everything gives every group the same reward and nothing to learn from, so
  the start is the first SFT step whose held-out accuracy lies inside a band (:func:`pick_start`).
* **Is the rise real.** Validation scores the same held-out problems before and after DAPO, so the
  rise is a paired difference. :func:`paired_bootstrap` resamples problems (not samples: the
  samples of one problem are correlated) and gives a 95 % interval for the mean rise. A control
  arm whose reward carries no information must show an interval that includes 0.

Per-problem scores come from verl's validation dumps (``trainer.validation_data_dir``): one JSON
line per sample with its prompt (``input``) and the reward's ``acc``, one file per step.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Band:
    """Held-out accuracies where GRPO has signal: [lo, hi]."""

    lo: float = 0.25
    hi: float = 0.65

    def __post_init__(self) -> None:
        if not 0.0 <= self.lo < self.hi <= 1.0:
            raise ValueError(f"band must satisfy 0 <= lo < hi <= 1, got [{self.lo}, {self.hi}]")

    def __contains__(self, acc: float) -> bool:
        return self.lo <= acc <= self.hi

    def __str__(self) -> str:
        return f"[{self.lo:.0%}, {self.hi:.0%}]"


class NoStartInBand(RuntimeError):
    """No saved SFT step scored inside the band: a curve from any of them cannot show learning."""


def pick_start(acc_by_step: Mapping[int, float], band: Band) -> int:
    """The first step (in step order) whose accuracy lies in ``band``."""
    for step in sorted(acc_by_step):
        if acc_by_step[step] in band:
            return step
    measured = ", ".join(f"{s}: {a:.2f}" for s, a in sorted(acc_by_step.items()))
    raise NoStartInBand(
        f"no saved SFT step scored inside {band} held-out accuracy ({measured or 'none measured'})"
    )


def past_band(acc: float, band: Band) -> bool:
    """Once SFT scores above the band, later steps will not come back into it: stop measuring."""
    return acc > band.hi


def read_validation_dump(path: Path) -> dict[str, float]:
    """Per-problem accuracy (mean over its samples) from one verl validation dump file."""
    scores: dict[str, list[float]] = defaultdict(list)
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            scores[row["input"]].append(float(row["acc"]))
    if not scores:
        raise ValueError(f"{path} holds no validation samples")
    return {problem: statistics.fmean(values) for problem, values in scores.items()}


def validation_dumps(directory: Path) -> dict[int, Path]:
    """``{step: file}`` for verl's ``<step>.jsonl`` dumps in ``directory``."""
    return {int(p.stem): p for p in directory.glob("*.jsonl") if p.stem.isdigit()}


@dataclass(frozen=True)
class Rise:
    """Last validation minus first, over the same problems, with a 95 % bootstrap interval."""

    rise: float
    ci95: tuple[float, float]
    problems: int


def paired_bootstrap(
    first: Mapping[str, float],
    last: Mapping[str, float],
    *,
    resamples: int = 10_000,
    seed: int = 0,
) -> Rise:
    """Mean of ``last - first`` over the problems both scored, and its percentile interval from
    ``resamples`` draws of problems with replacement (seeded: the same inputs give the same
    interval)."""
    problems = sorted(set(first) & set(last))
    if not problems:
        raise ValueError("the two validations share no problem")
    diffs = np.array([last[p] - first[p] for p in problems])
    draws = np.random.default_rng(seed).integers(0, len(diffs), size=(resamples, len(diffs)))
    lo, hi = np.percentile(diffs[draws].mean(axis=1), [2.5, 97.5])
    return Rise(rise=float(diffs.mean()), ci95=(float(lo), float(hi)), problems=len(diffs))


def rise_of(val_dir: Path) -> dict[str, Any]:
    """The arm's rise from its first and last validation dumps, with the paired interval."""
    dumps = validation_dumps(val_dir) if val_dir.is_dir() else {}
    if len(dumps) < 2:
        return {"rise": None, "rise_ci95": None}
    first, last = min(dumps), max(dumps)
    rise = paired_bootstrap(read_validation_dump(dumps[first]), read_validation_dump(dumps[last]))
    return {
        "rise": round(rise.rise, 4),
        "rise_ci95": [round(rise.ci95[0], 4), round(rise.ci95[1], 4)],
        "rise_steps": [first, last],
        "rise_problems": rise.problems,
    }


def verdict(rows: Sequence[dict]) -> dict[str, Any]:
    """What the arms show together, each line derived from their rows."""
    seeds = [r for r in rows if not r["control"] and r.get("rise") is not None]
    control = next((r for r in rows if r["control"] and r.get("rise") is not None), None)
    out: dict[str, Any] = {
        "seeds": len(seeds),
        "mean_rise": round(sum(r["rise"] for r in seeds) / len(seeds), 4) if seeds else None,
    }
    if control is not None and seeds:
        lo, hi = control["rise_ci95"]
        out["control_rise"] = control["rise"]
        out["control_below_every_seed"] = all(control["rise"] < r["rise"] for r in seeds)
        out["control_ci_includes_0"] = lo <= 0.0 <= hi
        out["holds"] = out["control_below_every_seed"] and out["control_ci_includes_0"]
    return out
