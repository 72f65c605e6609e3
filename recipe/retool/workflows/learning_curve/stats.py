"""The learning curve's statistics: where DAPO starts, and whether a rise is more than noise.

Two questions decide whether a curve shows anything:

* **Where to start.** GRPO learns only from groups whose samples score differently. A start that
  solves nothing or everything gives every group the same reward and nothing to learn from, so
  the start's held-out accuracy must lie inside a band (:class:`Band`; :func:`pick_start` picks
  one of the saved SFT steps when a start is made).
* **Is the rise real.** Validation scores the same held-out problems before and after DAPO, so the
  rise is a paired difference. :func:`paired_bootstrap` resamples problems (not samples: the
  samples of one problem are correlated) and gives a 95 % interval for the mean rise.
* **Is it learning.** A control whose reward carries no information is not flat: random rewards
  move accuracy too (it drifted down by 0.16-0.28 in three runs), so "the control's interval
  includes 0" is the wrong test. :class:`Criterion` / :func:`judge`: every seed's own rise is
  above 0 (its interval's lower end) *and* beats the control's rise by a margin.

Per-problem scores come from verl's validation dumps (``trainer.validation_data_dir``): one JSON
line per sample with its prompt (``input``) and the reward's ``acc``, one file per step.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Band:
    """Held-out accuracies where GRPO has signal: [lo, hi]."""

    lo: float = 0.2
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


def pick_start(acc_by_step: Mapping[int, float], band: Band, target: float | None = None) -> int:
    """The step (in step order) whose accuracy lies in ``band``: the first one, or with
    ``target`` the one nearest it (the later of two as near: more SFT, the same room)."""
    inside = [step for step in sorted(acc_by_step) if acc_by_step[step] in band]
    if inside:
        if target is None:
            return inside[0]
        return min(reversed(inside), key=lambda step: abs(acc_by_step[step] - target))
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


@dataclass(frozen=True)
class Criterion:
    """When the arms show that DAPO learns. Each seed must stand on its own (its rise's 95 %
    interval lies above 0) and against the control (it rose by ``min_gap`` more than the
    control did, whichever way the control drifted); ``min_seeds`` seeds guard against one lucky
    seed. The control's own drift is reported, never tested against 0."""

    min_seeds: int = 3
    min_gap: float = 0.10

    def describe(self) -> str:
        return (
            f">= {self.min_seeds} seeds, each with a rise whose 95 % CI is above 0 and which beats "
            f"the control's rise by >= {self.min_gap:.2f}"
        )


def judge(rows: Sequence[Mapping[str, Any]], criterion: Criterion = Criterion()) -> dict[str, Any]:
    """The verdict of a proof's arm rows (``control``, ``rise``, ``rise_ci95``, ``failed``), each
    part derived from them, and the one line the report and the command print. ``holds`` is
    ``None`` where there is no control arm (a curve, not a proof)."""
    failed = [r["arm"] for r in rows if r.get("failed")]
    seeds = [r for r in rows if not r["control"] and not r.get("failed")]
    control = next((r for r in rows if r["control"] and not r.get("failed")), None)
    out: dict[str, Any] = {
        "criterion": asdict(criterion),
        "seeds": len(seeds),
        "failed_arms": failed,
        "mean_rise": round(statistics.fmean(r["rise"] for r in seeds), 4) if seeds else None,
        "every_seed_ci_above_0": bool(seeds) and all(r["rise_ci95"][0] > 0.0 for r in seeds),
    }
    if control is None:
        out["holds"] = None
        out["line"] = "Not judged: no control arm finished (a curve, not a proof)."
        return out
    gaps = [r["rise"] - control["rise"] for r in seeds]
    out |= {
        "control_rise": control["rise"],
        "control_ci95": control["rise_ci95"],
        "min_gap_to_control": round(min(gaps), 4) if gaps else None,
        "every_seed_beats_control": bool(gaps) and min(gaps) >= criterion.min_gap,
        "enough_seeds": len(seeds) >= criterion.min_seeds,
    }
    out["holds"] = bool(
        not failed
        and out["enough_seeds"]
        and out["every_seed_ci_above_0"]
        and out["every_seed_beats_control"]
    )
    out["line"] = _verdict_line(out, seeds, control, criterion)
    return out


def _verdict_line(
    v: Mapping[str, Any],
    seeds: Sequence[Mapping[str, Any]],
    control: Mapping[str, Any],
    criterion: Criterion,
) -> str:
    lows = ", ".join(f"{r['rise']:+.3f} [{r['rise_ci95'][0]:+.3f}, {r['rise_ci95'][1]:+.3f}]"
                     for r in seeds)  # fmt: skip
    lo, hi = control["rise_ci95"]
    drift = f"the control drifted {control['rise']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    if v["holds"]:
        return (
            f"The proof holds: {len(seeds)} seeds rose {lows}, every interval above 0; {drift}, "
            f"and every seed beat it by >= {v['min_gap_to_control']:.3f} "
            f"(criterion: {criterion.describe()})."
        )
    why = []
    if v["failed_arms"]:
        why.append(f"arms {', '.join(v['failed_arms'])} failed")
    if not v["enough_seeds"]:
        why.append(f"{len(seeds)} seeds finished, {criterion.min_seeds} needed")
    if not v["every_seed_ci_above_0"]:
        why.append("a seed's interval reaches 0 or below")
    if not v["every_seed_beats_control"]:
        gap = v["min_gap_to_control"]
        why.append(
            f"a seed beat the control by only {gap:+.3f} (< {criterion.min_gap:.2f})"
            if gap is not None
            else "no seed to compare with the control"
        )
    return (
        f"The proof does NOT hold ({'; '.join(why)}): seeds {lows or 'none'}; {drift} "
        f"(criterion: {criterion.describe()})."
    )


def rise_of(val_dir: Path) -> dict[str, Any]:
    """The arm's rise from its first to its last validation dump, with the paired interval, and
    the same at every validation in between (how the rise grows with steps)."""
    dumps = validation_dumps(val_dir) if val_dir.is_dir() else {}
    if len(dumps) < 2:
        return {"rise": None, "rise_ci95": None}
    first = min(dumps)
    start = read_validation_dump(dumps[first])
    by_step = {}
    for step in sorted(dumps)[1:]:
        rise = paired_bootstrap(start, read_validation_dump(dumps[step]))
        by_step[str(step)] = {
            "rise": round(rise.rise, 4),
            "ci95": [round(rise.ci95[0], 4), round(rise.ci95[1], 4)],
        }
    last = by_step[str(max(dumps))]
    return {
        "rise": last["rise"],
        "rise_ci95": last["ci95"],
        "rise_steps": [first, max(dumps)],
        "rise_problems": len(start),
        "rise_by_step": by_step,
    }
