"""Evaluation reports: JSON, markdown and PNG plots (matplotlib, Agg backend: no display needed).

Three reports, each a directory:

* one checkpoint (``runner.evaluate_checkpoint``): ``eval_<dataset>.json``,
  ``samples_<dataset>.jsonl``, ``report.md``;
* progress of an experiment (``write_progress_report``): accuracy against training step,
  ``progress.{md,json,png}``;
* comparison (``write_comparison_report``), e.g. base vs SFT vs DAPO: ``compare.{md,json,png}``.

Files are written to a temporary name and renamed, so a reader (or a re-run after an interrupted
one) never sees half a file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from recipe.retool.core.paths import Layout
from recipe.retool.eval.checkpoints import CheckpointRef
from recipe.retool.records.plotting import markdown_table, pyplot, save_figure, write_atomic

ACCURACY_KEYS = ("mean@k", "pass@1", "pass@n", "maj@k")


class ReportError(ValueError):
    """Missing or unreadable results (a user-facing, one-line error)."""


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> Path:
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def load_results(directory: Path) -> dict[str, dict[str, Any]]:
    """``{dataset: eval json}`` from the ``eval_<dataset>.json`` files of one directory."""
    files = sorted(Path(directory).glob("eval_*.json"))
    if not files:
        raise ReportError(f"no eval_<dataset>.json in {directory}")
    results = {}
    for file in files:
        try:
            data = json.loads(file.read_text())
            results[data["dataset"]] = data
        except (OSError, ValueError, KeyError) as exc:
            raise ReportError(f"cannot read {file}: {exc}") from None
    return results


def accuracy(overall: dict[str, Any], key: str) -> float | None:
    """``mean@k``/``maj@k``, ``pass@1``, or ``pass@n`` (the largest k) from an overall block."""
    if key in ("mean@k", "maj@k"):
        return overall.get(key)
    passes = overall.get("pass@k") or {}
    if not passes:
        return None
    return passes.get("1") if key == "pass@1" else passes[max(passes, key=int)]


# ---------------------------------------------------------------------------------------------
# Markdown helpers
# ---------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


_OVERALL_HEADER = (
    "mean@k",
    "pass@1",
    "pass@k",
    "maj@k",
    "tool turns",
    "tool errors",
    "tool failures",
    "resp. tokens",
    "no answer",
    "rollout errors",
)


def _crashed(block: dict[str, Any], total: Any) -> str:
    """Rollouts that crashed of all (scored wrong, but not wrong answers); results written before
    the count was kept show "–"."""
    errors = block.get("rollout_errors")
    return "–" if errors is None else f"{errors}/{total}"


def _overall_cells(o: dict[str, Any]) -> list[str]:
    stderr = o.get("mean@k_stderr")
    mean = _pct(o.get("mean@k")) + (f" ± {100 * stderr:.1f}" if stderr is not None else "")
    return [
        mean,
        _pct(accuracy(o, "pass@1")),
        _pct(accuracy(o, "pass@n")),
        _pct(o.get("maj@k")),
        _num(o.get("mean_tool_turns")),
        _pct(o.get("tool_error_rate")),
        _pct(o.get("tool_failure_rate")),
        _num(o.get("mean_response_tokens"), 0),
        _pct(o.get("no_answer_rate")),
        _crashed(o, o.get("num_samples")),
    ]


def summarymarkdown_table(datasets: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the overall metrics, one row per dataset (k = samples per problem)."""
    rows = [[name, str(o.get("k")), *_overall_cells(o)] for name, o in datasets.items()]
    return markdown_table(["dataset", "k", *_OVERALL_HEADER], rows)


def render_checkpoint_markdown(results: dict[str, dict[str, Any]]) -> str:
    first = next(iter(results.values()))
    ckpt, cfg = first["checkpoint"], first["config"]
    where = ", ".join(
        f"{k} {ckpt[k]}" for k in ("stage", "experiment", "step") if ckpt.get(k) is not None
    )
    lines = [
        f"# Evaluation: {ckpt['label']}",
        "",
        f"Model: `{ckpt['path']}`" + (f" ({where})" if where else ""),
        "",
        f"Settings: n={cfg['n']}, temperature={cfg['temperature']}, top_p={cfg['top_p']}, "
        f"{cfg['max_response_tokens']} response tokens, {cfg['max_assistant_turns']} assistant "
        f"turns; backend {first['backend']}. Loop: verl ToolAgentLoop + code_interpreter + "
        "sandbox; correctness: the training reward's matcher.",
        "",
        "mean@k is pass@1 averaged over the k samples (± standard error over problems); pass@k "
        "is the unbiased estimator at k = n; maj@k is the majority vote over extracted answers; "
        "tool errors are the share of sandbox calls that did not succeed or timed out, tool "
        "failures the share the sandbox failed to run (the tool, not the model's code); rollout "
        "errors count rollouts that crashed (scored wrong, their error in samples_<dataset>.jsonl) "
        "of all rollouts.",
        "",
        "## Overall",
        "",
        summarymarkdown_table({name: r["overall"] for name, r in results.items()}),
    ]
    for name, result in results.items():
        rows = [
            [
                str(p["index"]),
                str(p["source_id"]),
                str(p["ground_truth"]),
                f"{p['num_correct']}/{p['k']}",
                _pct(p["maj@k"]),
                f"`{p['majority_answer']}`" if p["majority_answer"] else "–",
                _num(p["mean_tool_turns"]),
                _pct(p["tool_error_rate"]),
                _num(p["mean_response_tokens"], 0),
                _crashed(p, p["k"]),
            ]
            for p in result["per_problem"]
        ]
        header = [
            "#",
            "id",
            "answer",
            "correct",
            "maj@k",
            "majority",
            "tool turns",
            "tool errors",
            "resp. tokens",
            "rollout errors",
        ]
        lines += ["", f"## {name}: per problem", "", markdown_table(header, rows)]
    return "\n".join(lines) + "\n"


def write_checkpoint_report(
    out_dir: Path,
    results: dict[str, dict[str, Any]],
    samples: dict[str, Sequence[Any]],
    save_samples: bool = True,
) -> list[Path]:
    """``eval_<dataset>.json`` (+ ``samples_<dataset>.jsonl``) per dataset and ``report.md``."""
    out_dir = Path(out_dir)
    files = []
    for name, result in results.items():
        files.append(write_json(out_dir / f"eval_{name}.json", result))
        if save_samples:
            body = "".join(json.dumps(asdict(s)) + "\n" for s in samples.get(name, ()))
            files.append(write_atomic(out_dir / f"samples_{name}.jsonl", body))
    files.append(write_atomic(out_dir / "report.md", render_checkpoint_markdown(results)))
    return files


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def plot_progress(series: dict[str, dict[str, list[tuple[int, dict[str, Any]]]]], path: Path):
    """``series[dataset][run] = [(step, overall), ...]`` → one panel per dataset."""
    plt = pyplot()
    datasets = sorted(series)
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False, layout="constrained"
    )
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for i, (run, points) in enumerate(sorted(series[dataset].items())):
            color = f"C{i}"
            steps = [s for s, _ in points]
            mean = [100 * (o.get("mean@k") or 0) for _, o in points]
            err = [100 * (o.get("mean@k_stderr") or 0) for _, o in points]
            maj = [100 * (o.get("maj@k") or 0) for _, o in points]
            k = points[0][1].get("k")
            ax.errorbar(
                steps, mean, yerr=err, marker="o", color=color, capsize=3, label=f"{run} mean@{k}"
            )
            ax.plot(steps, maj, marker="s", linestyle="--", color=color, label=f"{run} maj@{k}")
        ax.set_title(dataset)
        ax.set_xlabel("training step")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Accuracy against training step")
    return save_figure(fig, path)


def plot_comparison(table: dict[str, dict[str, dict[str, Any]]], path: Path) -> Path:
    """``table[label][dataset] = overall`` → grouped bars: mean@k, maj@k, pass@n per dataset."""
    plt = pyplot()
    labels = list(table)
    datasets = sorted({d for per in table.values() for d in per})
    ks = sorted({o.get("k") for per in table.values() for o in per.values()} - {None})
    k = "/".join(str(v) for v in ks) or "k"
    metrics = [("mean@k", f"mean@{k} (= pass@1)"), ("maj@k", f"maj@{k}"), ("pass@n", f"pass@{k}")]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False, layout="constrained"
    )
    width = 0.8 / max(1, len(labels))
    for ax, (key, title) in zip(axes[0], metrics, strict=True):
        for i, label in enumerate(labels):
            xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(datasets))]
            values = [
                100 * (accuracy(table[label][d], key) or 0) if d in table[label] else 0
                for d in datasets
            ]
            bars = ax.bar(xs, values, width, label=label, color=f"C{i}")
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(datasets)), datasets)
        ax.set_title(title)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 110)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(" vs ".join(labels))
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Multi-checkpoint reports
# ---------------------------------------------------------------------------------------------


def write_progress_report(
    result_dirs: Sequence[Path],
    out_dir: Path,
    *,
    stage: str | None = None,
    experiment: str | None = None,
) -> list[Path]:
    """Accuracy against training step for every training checkpoint among ``result_dirs``
    (directories of eval results; those without a stage and step, e.g. base, are skipped). A
    step evaluated more than once (``--force``) counts once: the last of ``result_dirs``."""
    by_step: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for directory in result_dirs:
        if not Path(directory).is_dir() or not any(Path(directory).glob("eval_*.json")):
            continue
        for dataset, result in load_results(directory).items():
            ckpt = result.get("checkpoint") or {}
            if ckpt.get("step") is None or ckpt.get("stage") not in ("sft", "dapo"):
                continue
            if (stage and ckpt["stage"] != stage) or (
                experiment and ckpt["experiment"] != experiment
            ):
                continue
            run = f"{ckpt['stage']}/{ckpt['experiment']}"
            by_step.setdefault(dataset, {}).setdefault(run, {})[int(ckpt["step"])] = result[
                "overall"
            ]
    if not by_step:
        raise ReportError("no evaluated training checkpoints (stage + step) to plot")
    series = {
        dataset: {run: sorted(steps.items()) for run, steps in runs.items()}
        for dataset, runs in by_step.items()
    }
    out_dir = Path(out_dir)
    rows = [
        [dataset, run, str(step), *_overall_cells(overall)]
        for dataset, runs in sorted(series.items())
        for run, points in sorted(runs.items())
        for step, overall in points
    ]
    md = "\n".join(
        [
            "# Accuracy against training step",
            "",
            "![progress](progress.png)",
            "",
            markdown_table(["dataset", "run", "step", *_OVERALL_HEADER], rows),
            "",
        ]
    )
    data = {
        dataset: {
            run: [{"step": step, **overall} for step, overall in points]
            for run, points in runs.items()
        }
        for dataset, runs in series.items()
    }
    return [
        write_atomic(out_dir / "progress.md", md),
        write_json(out_dir / "progress.json", data),
        plot_progress(series, out_dir / "progress.png"),
    ]


def write_comparison_report(labelled_dirs: dict[str, Path], out_dir: Path) -> list[Path]:
    """Side by side (e.g. ``{"base": dir, "sft": dir, "dapo": dir}``, in that order)."""
    if not labelled_dirs:
        raise ReportError("nothing to compare")
    loaded = {label: load_results(directory) for label, directory in labelled_dirs.items()}
    table = {
        label: {name: r["overall"] for name, r in results.items()}
        for label, results in loaded.items()
    }
    datasets = sorted({d for per in table.values() for d in per})
    sections = ["# Comparison: " + " vs ".join(table), "", "![comparison](compare.png)"]
    for dataset in datasets:
        rows = [
            [
                label,
                f"`{loaded[label][dataset]['checkpoint']['label']}`",
                str(table[label][dataset].get("k")),
                *_overall_cells(table[label][dataset]),
            ]
            for label in table
            if dataset in table[label]
        ]
        sections += [
            "",
            f"## {dataset}",
            "",
            markdown_table(["", "checkpoint", "k", *_OVERALL_HEADER], rows),
        ]
    out_dir = Path(out_dir)
    data = {
        label: {
            "checkpoint": next(iter(loaded[label].values()))["checkpoint"],
            "datasets": per,
        }
        for label, per in table.items()
    }
    return [
        write_atomic(out_dir / "compare.md", "\n".join(sections) + "\n"),
        write_json(out_dir / "compare.json", data),
        plot_comparison(table, out_dir / "compare.png"),
    ]


def show_summary(
    summary: dict[str, Any], ref: CheckpointRef, layout: Layout, *, progress: bool = True
) -> list[Path]:
    """What the CLI and the Modal function print after an evaluation: the summary table, where
    the reports are, and, for a training checkpoint, the experiment's accuracy-against-step
    report (``progress.png``), brought up to date. Returns the plots written."""
    print(summarymarkdown_table(summary["datasets"]))
    print(f"reports: {summary['out_dir']}")
    if not (progress and ref.stage in ("sft", "dapo")):
        return []
    eval_root = layout.checkpoints / "eval"
    files = write_progress_report(
        sorted(eval_root.iterdir()),
        eval_root / f"progress-{ref.stage}-{ref.experiment}",
        stage=ref.stage,
        experiment=ref.experiment,
    )
    print(f"progress: {files[0].parent}")
    return [f for f in files if f.suffix == ".png"]
