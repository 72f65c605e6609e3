"""The learning curve's statistics: the start band and the paired bootstrap interval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipe.retool.workflows.learning_curve.stats import (
    Band,
    NoStartInBand,
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
