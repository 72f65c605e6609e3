"""A training run's own report, ``report.md`` + ``report.png`` next to its ``checkpoint_info.json``.

Drawn from the run's metrics files only (``run_metrics.read_run``: what verl's ``file`` logger
wrote, every attempt), so it exists offline, without wandb, and says what ran. ``stages`` writes
it whenever a run ends, cleanly or not; ``make results EXPERIMENT=x`` fetches it.

DAPO: reward, validation accuracy, response length, tool calls, and where a step's time went.
SFT: train (and validation) loss, learning rate, gradient norm, tokens per step.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.retool.records import run_metrics
from recipe.retool.records.plotting import markdown_table, pyplot, save_figure, write_atomic
from sandbox.fleet import REPORT_MD as POOL_REPORT_MD

REPORT_MD = "report.md"
REPORT_PNG = "report.png"

Rows = list[tuple[int, dict[str, Any]]]
Series = tuple[list[int], list[float]]


@dataclass(frozen=True)
class Panel:
    """One plot: a title and the metric series drawn in it, by label."""

    title: str
    series: dict[str, Series]


def series(rows: Rows, key: str) -> Series:
    """``(steps, values)`` of one metric over the steps that logged it."""
    points = [(step, float(data[key])) for step, data in rows if _is_number(data.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def dapo_panels(rows: Rows) -> list[Panel]:
    summary = run_metrics.summarize(rows)
    phases = sorted(
        {k for _, data in rows for k in data if k.startswith(run_metrics.TIMING_PREFIX)}
        - {f"{run_metrics.TIMING_PREFIX}step"}
    )
    return [
        Panel("reward (mean score)", {"train": series(rows, "critic/score/mean")}),
        Panel("validation accuracy", {"mean@k": (summary.val_steps, summary.val_acc)}),
        Panel("response length (tokens)", {"mean": series(rows, "response_length/mean")}),
        Panel(
            "tool calls per trajectory",
            {
                "train": series(rows, "tool_call_counts/mean"),
                "validation": (
                    summary.val_steps[: len(summary.val_tool_calls)],
                    summary.val_tool_calls,
                ),
            },
        ),
        Panel(
            "step time split (s)",
            {p.removeprefix(run_metrics.TIMING_PREFIX): series(rows, p) for p in phases},
        ),
    ]


def sft_panels(rows: Rows) -> list[Panel]:
    return [
        Panel(
            "loss", {"train": series(rows, "train/loss"), "validation": series(rows, "val/loss")}
        ),
        Panel("learning rate", {"lr": series(rows, "train/lr")}),
        Panel("gradient norm", {"grad norm": series(rows, "train/grad_norm")}),
        Panel("tokens per step", {"tokens": series(rows, "train/global_tokens")}),
    ]


PANELS = {"dapo": dapo_panels, "sft": sft_panels}


def _drawn(panels: list[Panel]) -> list[Panel]:
    """Panels with at least one non-empty series, and only those series."""
    kept = []
    for panel in panels:
        present = {label: s for label, s in panel.series.items() if s[0]}
        if present:
            kept.append(Panel(panel.title, present))
    return kept


def plot(panels: list[Panel], title: str, path: Path) -> Path:
    plt = pyplot()
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False, layout="constrained"
    )
    flat = [ax for row in axes for ax in row]
    for ax, panel in zip(flat, panels, strict=False):
        for label, (steps, values) in panel.series.items():
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize=7)
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return save_figure(fig, path)


def render_markdown(stage: str, experiment: str, rows: Rows, panels: list[Panel]) -> str:
    """Steps, a first/last/mean row per plotted series, and DAPO's one-line description."""
    lines = [f"# {stage} run: {experiment}", ""]
    if not rows:
        return "\n".join([*lines, "No metrics logged yet.", ""])
    lines += [f"Steps logged: {rows[0][0]}–{rows[-1][0]} ({len(rows)} rows).", ""]
    if stage == "dapo":
        lines += [run_metrics.describe(run_metrics.summarize(rows)) + ".", ""]
    lines += [f"![{stage} run]({REPORT_PNG})", ""]
    table = [
        [panel.title, label, str(len(values)), f"{values[0]:.4g}", f"{values[-1]:.4g}",
         f"{statistics.fmean(values):.4g}"]
        for panel in panels
        for label, (_, values) in panel.series.items()
    ]  # fmt: skip
    lines += [markdown_table(["panel", "series", "points", "first", "last", "mean"], table), ""]
    return "\n".join(lines)


def write_run_report(experiment_dir: Path, stage: str) -> list[Path]:
    """``report.md`` (always) and ``report.png`` (when anything was logged) in ``experiment_dir``,
    from its metrics files; returns the files written."""
    rows = run_metrics.read_run(experiment_dir)
    panels = _drawn(PANELS[stage](rows))
    experiment = experiment_dir.name
    text = render_markdown(stage, experiment, rows, panels)
    pool = experiment_dir / POOL_REPORT_MD  # what a pool of Modal Sandboxes wrote at its close
    if pool.is_file():
        text += "\n## Tool calls (" + POOL_REPORT_MD + ")\n\n" + pool.read_text()
    files = [write_atomic(experiment_dir / REPORT_MD, text)]
    if panels:
        files.append(plot(panels, f"{stage} {experiment}", experiment_dir / REPORT_PNG))
    return files
