"""What a DAPO run did, read from the metrics verl logged, never assumed.

``config/dapo.yaml`` turns on verl's ``file`` logger and :func:`recipe.retool.stages.dapo.run_dapo`
points it (``VERL_FILE_LOGGER_PATH``) at ``<experiment>/metrics/<attempt>.jsonl`` on the
checkpoints volume, one file per attempt because verl's logger truncates its file on open. Each
line is ``{"step": N, "data": {metric: value}}``. This module turns those lines into the numbers
the smoke's report, the learning-curve report and ``docs/gpu-runs/`` rows print: steps that ran,
rewards, tool calls per trajectory, validation accuracy in order, and where a step's time went.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METRICS_DIRNAME = "metrics"
_VAL_ACC = re.compile(r"^val-core/[^/]+/acc/mean@\d+$")
_VAL_AUX = re.compile(r"^val-aux/[^/]+/(tool_calls|tool_errors|num_turns)/mean@\d+$")
TIMING_PREFIX = "timing_s/"


def metrics_dir(experiment_dir: Path) -> Path:
    return experiment_dir / METRICS_DIRNAME


def read_steps(directory: Path) -> list[tuple[int, dict[str, Any]]]:
    """Every logged ``(step, metrics)`` in the order logged, attempts in the order they ran."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                rows.append((int(record["step"]), dict(record["data"])))
    return rows


def read_run(experiment_dir: Path) -> list[tuple[int, dict[str, Any]]]:
    """A run's metrics one row per step, in step order, over every attempt: a step logged again
    after a resume (or in two records, training and validation) is merged, later values winning."""
    by_step: dict[int, dict[str, Any]] = {}
    for step, data in read_steps(metrics_dir(experiment_dir)):
        by_step.setdefault(step, {}).update(data)
    return sorted(by_step.items())


def _mean_of(data: dict[str, Any], pattern: re.Pattern[str]) -> float | None:
    values = [float(v) for k, v in data.items() if pattern.match(k)]
    return statistics.fmean(values) if values else None


@dataclass
class DapoSummary:
    """A run's numbers; lists are in step order (validation: in the order it ran)."""

    train_steps: list[int] = field(default_factory=list)
    reward_mean: list[float] = field(default_factory=list)
    tool_calls_per_traj: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    val_tool_calls: list[float] = field(default_factory=list)
    val_tool_errors: list[float] = field(default_factory=list)
    timing_s: dict[str, float] = field(default_factory=dict)  # mean seconds per phase
    budget_exhausted_steps: int = 0

    @property
    def steps(self) -> int:
        return len(self.train_steps)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "steps": self.steps}


def summarize(rows: list[tuple[int, dict[str, Any]]]) -> DapoSummary:
    """Training rows carry ``critic/score/mean``; validation rows carry ``val-core/.../acc``."""
    out = DapoSummary()
    timings: dict[str, list[float]] = {}
    for step, data in rows:
        acc = _mean_of(data, _VAL_ACC)
        if acc is not None:
            out.val_steps.append(step)
            out.val_acc.append(acc)
            aux = {m.group(1): float(v) for k, v in data.items() if (m := _VAL_AUX.match(k))}
            if "tool_calls" in aux:
                out.val_tool_calls.append(aux["tool_calls"])
                out.val_tool_errors.append(aux.get("tool_errors", 0.0))
        if "critic/score/mean" not in data:
            continue
        out.train_steps.append(step)
        out.reward_mean.append(float(data["critic/score/mean"]))
        if "tool_call_counts/mean" in data:
            out.tool_calls_per_traj.append(float(data["tool_call_counts/mean"]))
        if "timing_s/step" in data:
            out.step_s.append(float(data["timing_s/step"]))
        out.budget_exhausted_steps += int(data.get("training/filter_groups/budget_exhausted", 0))
        for key, value in data.items():
            if key.startswith(TIMING_PREFIX) and isinstance(value, int | float):
                timings.setdefault(key[len(TIMING_PREFIX) :], []).append(float(value))
    out.timing_s = {name: round(statistics.fmean(v), 3) for name, v in sorted(timings.items())}
    return out


def describe(summary: DapoSummary) -> str:
    """One line for a report table, every number from the run."""
    if not summary.steps:
        return "main_ppo logged no training step"
    parts = [
        f"{summary.steps} main_ppo steps",
        f"mean reward {statistics.fmean(summary.reward_mean):+.2f}",
    ]
    if summary.tool_calls_per_traj:
        parts.append(f"{statistics.fmean(summary.tool_calls_per_traj):.2f} tool calls/trajectory")
    if summary.val_acc:
        parts.append("val acc " + "→".join(f"{a:.2f}" for a in summary.val_acc))
    if summary.val_tool_calls:  # verl's V1 trainer logs tool calls for validation only
        calls = statistics.fmean(summary.val_tool_calls)
        parts.append(f"{calls:.2f} tool calls/trajectory in validation")
    if summary.budget_exhausted_steps:
        parts.append(f"{summary.budget_exhausted_steps} steps hit the dynamic-sampling bound")
    return ", ".join(parts)
