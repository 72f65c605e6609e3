"""The learning curve's statistics: the start band, the paired bootstrap interval, and the
criterion that judges a proof."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipe.retool.workflows.learning_curve.stats import (
    Band,
    Criterion,
    NoStartInBand,
    judge,
    paired_bootstrap,
    past_band,
    pick_start,
    read_validation_dump,
    validation_dumps,
)


def test_the_start_is_the_first_step_inside_the_band():
    acc = {750: 0.05, 500: 0.01, 800: 0.31, 850: 0.52, 1000: 0.74}
    assert pick_start(acc, Band(0.25, 0.65)) == 800
    assert pick_start(acc, Band(0.5, 0.6)) == 850
    assert pick_start({100: 0.25}, Band(0.25, 0.65)) == 100  # edges belong to the band
    assert pick_start(acc, Band(0.25, 0.65), target=0.5) == 850
    assert pick_start({1: 0.3, 2: 0.4, 3: 0.3}, Band(0.25, 0.65), target=0.3) == 3  # the later


def test_no_step_in_the_band_names_what_was_measured():
    with pytest.raises(NoStartInBand) as err:
        pick_start({750: 0.05, 1000: 0.99}, Band(0.25, 0.65))
    assert "[25%, 65%]" in str(err.value) and "750: 0.05, 1000: 0.99" in str(err.value)


def test_past_band_and_bad_bands():
    band = Band(0.25, 0.65)
    assert past_band(0.7, band) and not past_band(0.65, band) and not past_band(0.1, band)
    for lo, hi in [(0.6, 0.5), (-0.1, 0.5), (0.2, 1.5)]:
        with pytest.raises(ValueError, match="band"):
            Band(lo, hi)


def test_no_change_gives_a_zero_interval():
    scores = {f"p{i}": i / 10 for i in range(10)}
    rise = paired_bootstrap(scores, dict(scores))
    assert (rise.rise, rise.ci95, rise.problems) == (0.0, (0.0, 0.0), 10)


def test_a_uniform_rise_is_exact_and_a_noisy_one_brackets_its_mean():
    first = {f"p{i}": 0.25 for i in range(40)}
    assert paired_bootstrap(first, {p: 0.75 for p in first}).ci95 == pytest.approx((0.5, 0.5))
    # half the problems gain 0.5, half lose 0.25: mean +0.125, spread over the problems
    last = {p: (0.75 if i % 2 else 0.0) for i, p in enumerate(first)}
    rise = paired_bootstrap(first, last, seed=1)
    assert rise.rise == pytest.approx(0.125)
    lo, hi = rise.ci95
    assert lo < 0.125 < hi and lo > 0.0  # ~±0.12 at 40 problems: clearly above 0
    assert paired_bootstrap(first, last, seed=1) == rise  # seeded: the same interval again


def test_an_uninformative_change_has_an_interval_around_zero():
    first = {f"p{i}": 0.5 for i in range(64)}
    last = {p: 0.5 + (0.25 if i % 2 else -0.25) for i, p in enumerate(first)}
    rise = paired_bootstrap(first, last)
    assert rise.rise == 0.0 and rise.ci95[0] < 0.0 < rise.ci95[1]


def test_only_shared_problems_are_paired():
    rise = paired_bootstrap({"a": 0.0, "b": 1.0}, {"a": 1.0, "c": 0.0})
    assert (rise.rise, rise.problems) == (1.0, 1)
    with pytest.raises(ValueError, match="share no problem"):
        paired_bootstrap({"a": 0.0}, {"b": 1.0})


def test_validation_dumps_are_read_per_problem(tmp_path: Path):
    """verl's ``<step>.jsonl``: one line per sample with its prompt and the reward's ``acc``."""
    rows = [("q1", 1.0), ("q1", 0.0), ("q2", 1.0), ("q1", 1.0), ("q2", 1.0)]
    lines = [json.dumps({"input": q, "output": "...", "score": a, "acc": a}) for q, a in rows]
    (tmp_path / "0.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "15.jsonl").write_text(lines[0] + "\n")
    (tmp_path / "notes.jsonl").write_text("")
    assert validation_dumps(tmp_path) == {0: tmp_path / "0.jsonl", 15: tmp_path / "15.jsonl"}
    assert read_validation_dump(tmp_path / "0.jsonl") == {"q1": pytest.approx(2 / 3), "q2": 1.0}
    (tmp_path / "1.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no validation samples"):
        read_validation_dump(tmp_path / "1.jsonl")


def arm(name: str, rise: float, lo: float, hi: float, *, control: bool = False, **kw) -> dict:
    return {"arm": name, "control": control, "rise": rise, "rise_ci95": [lo, hi], **kw}


SEEDS = [
    arm("seed1", 0.15, 0.10, 0.20),
    arm("seed2", 0.08, 0.03, 0.13),
    arm("seed3", 0.12, 0.07, 0.17),
]
CONTROL = arm("control", -0.16, -0.20, -0.12, control=True)


def test_the_proof_holds_when_every_seed_rises_and_beats_the_drifting_control():
    v = judge([*SEEDS, CONTROL])
    assert (
        v["holds"] is True and v["seeds"] == 3 and v["mean_rise"] == pytest.approx(0.1167, abs=1e-4)
    )
    assert v["min_gap_to_control"] == pytest.approx(0.24) and v["every_seed_beats_control"]
    assert v["control_rise"] == -0.16 and v["control_ci95"] == [-0.20, -0.12]  # reported drift
    assert v["criterion"] == {"min_seeds": 3, "min_gap": 0.10}
    assert v["line"].startswith("The proof holds: 3 seeds rose +0.150 [+0.100, +0.200], +0.080")
    assert "the control drifted -0.160 [-0.200, -0.120]" in v["line"]


@pytest.mark.parametrize(
    ("rows", "why"),
    [
        # a seed whose interval reaches 0: not shown to rise, however far above the control
        ([SEEDS[0], SEEDS[1], arm("seed3", 0.05, 0.0, 0.1), CONTROL], "interval reaches 0"),
        # all seeds rise, but one only 0.05 above a control that rose too
        ([*SEEDS, arm("control", 0.03, 0.0, 0.06, control=True)], "by only +0.050 (< 0.10)"),
        ([*SEEDS[:2], CONTROL], "2 seeds finished, 3 needed"),
        ([*SEEDS[:2], {**SEEDS[2], "failed": True}, CONTROL], "arms seed3 failed"),
    ],
)
def test_the_proof_fails_by_each_part_of_the_criterion(rows, why):
    v = judge(rows)
    assert v["holds"] is False and why in v["line"] and v["line"].startswith("The proof does NOT")


def test_a_wider_criterion_and_no_control():
    assert judge([*SEEDS[:2], CONTROL], Criterion(min_seeds=2, min_gap=0.2))["holds"] is True
    v = judge(SEEDS)
    assert v["holds"] is None and "no control" in v["line"] and v["every_seed_ci_above_0"]
    assert judge([arm("control", 0.0, -0.1, 0.1, control=True)])["holds"] is False
