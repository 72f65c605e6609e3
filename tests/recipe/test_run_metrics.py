"""Summaries of verl's logged metrics: from a real GPU run's file, and across resumed attempts."""

from __future__ import annotations

import json
from pathlib import Path

from recipe.retool.records import run_metrics

GPU_RUNS = Path(__file__).resolve().parents[2] / "docs" / "gpu-runs"


def test_the_committed_gpu_row_is_what_its_metrics_say(tmp_path: Path) -> None:
    """docs/gpu-runs' DAPO row was derived from the run's own metrics file, by this code."""
    (tmp_path / "a.jsonl").write_bytes((GPU_RUNS / "dapo_curve_h200.metrics.jsonl").read_bytes())
    summary = run_metrics.summarize(run_metrics.read_steps(tmp_path)).to_json()
    row = json.loads((GPU_RUNS / "dapo_curve_h200.json").read_text())
    for key in ("steps", "train_steps", "reward_mean", "val_steps", "val_acc", "val_tool_calls"):
        assert summary[key] == row[key]
    assert summary["steps"] == 12 and summary["val_steps"] == [0, 4, 8, 12]


def _write(path: Path, records: list[tuple[int, dict]]) -> None:
    path.write_text("".join(json.dumps({"step": s, "data": d}) + "\n" for s, d in records))


def test_attempts_are_read_in_order_and_every_number_comes_from_them(tmp_path: Path) -> None:
    val = {"val-core/synthetic/acc/mean@4": 0.25, "val-aux/synthetic/tool_calls/mean@4": 1.5,
           "val-aux/synthetic/tool_errors/mean@4": 0.3}  # fmt: skip
    _write(tmp_path / "20260101-000000.jsonl", [
        (0, val),
        (1, {"critic/score/mean": -0.5, "timing_s/gen": 2.0, "timing_s/step": 4.0,
             "training/filter_groups/budget_exhausted": 1}),
    ])  # fmt: skip
    _write(tmp_path / "20260101-010000.jsonl", [
        (2, {"critic/score/mean": 0.5, "timing_s/gen": 4.0, "timing_s/step": 6.0}),
        (2, {**val, "val-core/synthetic/acc/mean@4": 0.75}),
    ])  # fmt: skip
    s = run_metrics.summarize(run_metrics.read_steps(tmp_path))
    assert s.train_steps == [1, 2] and s.reward_mean == [-0.5, 0.5]
    assert s.val_steps == [0, 2] and s.val_acc == [0.25, 0.75]
    assert s.val_tool_calls == [1.5, 1.5] and s.val_tool_errors == [0.3, 0.3]
    assert s.timing_s == {"gen": 3.0, "step": 5.0} and s.step_s == [4.0, 6.0]
    assert s.budget_exhausted_steps == 1
    line = run_metrics.describe(s)
    assert line.startswith("2 main_ppo steps, mean reward +0.00")
    assert "val acc 0.25→0.75" in line and "1 steps hit the dynamic-sampling bound" in line


def test_a_run_that_logged_no_step_says_so(tmp_path: Path) -> None:
    assert run_metrics.describe(run_metrics.summarize([])) == "main_ppo logged no training step"
    assert run_metrics.read_steps(tmp_path) == []


def test_validation_only_rows_are_not_training_steps() -> None:
    s = run_metrics.summarize([(0, {"val-core/x/acc/mean@2": 0.5})])
    assert s.steps == 0 and s.val_acc == [0.5]


def test_read_run_merges_a_step_logged_twice_and_orders_by_step(tmp_path: Path) -> None:
    """A resumed attempt logs its first steps again; the later attempt's values win."""
    log = run_metrics.metrics_dir(tmp_path)
    log.mkdir()
    _write(log / "1.jsonl", [(1, {"critic/score/mean": -1.0}), (2, {"critic/score/mean": -0.5})])
    _write(log / "2.jsonl", [(2, {"critic/score/mean": 0.5}), (2, {"val-core/s/acc/mean@2": 0.4})])
    assert run_metrics.read_run(tmp_path) == [
        (1, {"critic/score/mean": -1.0}),
        (2, {"critic/score/mean": 0.5, "val-core/s/acc/mean@2": 0.4}),
    ]
