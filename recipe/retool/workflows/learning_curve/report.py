"""The learning curve's report: ``curve.md`` and ``curve.png`` from ``curve.json``'s content.

Every line is derived from the result: the verdict line is the one ``curve_stats.judge``
computed, each arm's interval band is its paired bootstrap interval at each validation, the
calibration is the start's record, and the time per phase is what the run measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recipe.retool.core import paths


def write_report(root: Path, result: dict[str, Any]) -> None:
    """``curve.md`` always; ``curve.png`` where matplotlib is installed."""
    (root / "curve.md").write_text(markdown(result))
    plot(root / "curve.png", result)


def markdown(result: dict[str, Any]) -> str:
    rows = result["arms"]
    verdict = result["verdict"]
    check = result["start"]["check"]
    made = result["start"]["made"]
    lines = [
        f"# Does DAPO learn? (proof {result['proof']}, {result['gpus']}× {result['gpu']})",
        "",
        f"**{verdict['line']}**",
        "",
        "## The start",
        "",
        f"The kept SFT checkpoint `curve_start/` (SFT step {result['start_step']}, made "
        f"{made['date']} on {made['machine']}, {made['device']}) scored "
        f"**{check['acc']:.3f}** held-out here ({check['problems']} problems × "
        f"{check['samples_per_problem']} samples; {result['start_acc_when_made']:.3f} when "
        f"made), inside the band [{check['band'][0]:.0%}, {check['band'][1]:.0%}]: "
        f"{_yes(check['in_band'])}.",
        "",
        "Held-out accuracy of the saved SFT steps when the start was made: "
        + ", ".join(f"{s}: {a:.2f}" for s, a in result["sft_acc_by_step"].items())
        + ".",
        "",
        "## Arms",
        "",
    ]
    steps = _val_steps(rows)
    later = [s for s in steps if s != steps[0]] if steps else []
    head = " / ".join(map(str, steps)) or "none"
    lines += [
        f"| arm | seed | reward | validation accuracy at steps {head} | "
        + " | ".join(f"rise at {s} (95 % CI)" for s in later)
        + " | rise − control | exit |",
        "|---|---|---|---|" + "---|" * len(later) + "---|---|",
    ]
    control = next((r for r in rows if r["control"] and r.get("rise") is not None), None)
    for row in rows:
        acc = " → ".join(f"{a:.3f}" for a in row.get("val_acc") or []) or "none"
        by_step = row.get("rise_by_step") or {}
        rises = [_rise_cell(by_step.get(str(s))) for s in later]
        gap = (
            _signed(row["rise"] - control["rise"])
            if control is not None and not row["control"] and row.get("rise") is not None
            else ""
        )
        exit_ = f"{row['dapo_exit']}" + (" (failed)" if row.get("failed") else "")
        lines.append(
            f"| {row['arm']} | {row['seed']} | {'shuffled' if row['control'] else 'ReTool'} | "
            f"{acc} | " + "".join(f"{c} | " for c in rises) + f"{gap} | {exit_} |"
        )
    lines += ["", f"- mean rise over {verdict['seeds']} seeds: {_signed(verdict['mean_rise'])}"]
    if "control_rise" in verdict:
        lo, hi = verdict["control_ci95"]
        lines.append(
            f"- the control's drift (reported, not tested): {_signed(verdict['control_rise'])} "
            f"[{lo:+.3f}, {hi:+.3f}]"
        )
    crit = verdict["criterion"]
    lines += [
        f"- criterion: >= {crit['min_seeds']} seeds plus the control; every seed's rise has a "
        f"95 % CI above 0 ({_yes(verdict['every_seed_ci_above_0'])}) and beats the control's "
        f"rise by >= {crit['min_gap']:.2f} "
        f"({_yes(verdict.get('every_seed_beats_control', False))}); holds: "
        f"{_yes(bool(verdict['holds']))}",
        "",
        "## Time",
        "",
        "| phase | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k.removesuffix('_s')} | {v} |" for k, v in result["timing_s"].items()]
    lines += [f"| arm {r['arm']} (DAPO, side by side) | {r['dapo_s']} |" for r in rows]
    return "\n".join(lines) + "\n"


def _val_steps(rows: list[dict[str, Any]]) -> list[int]:
    return max((list(r.get("val_steps") or []) for r in rows), key=len, default=[])


def _rise_cell(rise: dict[str, Any] | None) -> str:
    if rise is None:
        return "n/a"
    lo, hi = rise["ci95"]
    return f"{rise['rise']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def plot(path: Path, result: dict[str, Any]) -> None:
    """Left: the start's calibration (SFT held-out accuracy by step, the band, the start and its
    check here). Right: each arm's rise since the start at each validation, with its 95 % band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [int(s) for s in result["sft_acc_by_step"]]
    left.plot(steps, list(result["sft_acc_by_step"].values()), marker="o", label="when made")
    left.axhspan(*result["band"], alpha=0.15, label="band")
    left.axvline(result["start_step"], linestyle="--", color="gray", label="the start")
    left.plot([result["start_step"]], [result["start_acc"]], "r*", ms=12, label="checked here")
    left.set(xlabel="SFT step", ylabel="held-out accuracy", title="the start (calibration)")
    left.legend()
    for row in result["arms"]:
        by_step = row.get("rise_by_step") or {}
        if not by_step:
            continue
        xs = [row["rise_steps"][0], *map(int, by_step)]
        ys = [0.0, *(r["rise"] for r in by_step.values())]
        lo = [0.0, *(r["ci95"][0] for r in by_step.values())]
        hi = [0.0, *(r["ci95"][1] for r in by_step.values())]
        style = "--" if row["control"] else "-"
        (line,) = right.plot(xs, ys, style, marker="o", label=row["arm"])
        right.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set(
        xlabel="DAPO step",
        ylabel="held-out accuracy − start (95 % CI)",
        title={True: "arms: the proof holds", False: "arms: the proof does not hold"}.get(
            result["verdict"].get("holds"), "arms"
        ),
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_wandb(root: Path, result: dict) -> str | None:
    """The proof's verdict, each arm's rise and the plot as wandb run ``curve-<proof>`` (project
    ``retool-curve``); the URL, or ``None`` where wandb is not configured."""
    from recipe.retool.records import tracking

    arms_numbers = {
        row["arm"]: {"rise": row.get("rise"), "last_val_acc": (row["val_acc"] or [None])[-1]}
        for row in result["arms"]
    }
    numbers = {
        "start_step": result["start_step"],
        "start_acc": result["start_acc"],
        "verdict": {
            k: v for k, v in result["verdict"].items() if isinstance(v, int | float | dict)
        },
        "holds": float(bool(result["verdict"].get("holds"))),
        "arms": arms_numbers,
        "timing_s": result.get("timing_s", {}),
    }
    return tracking.log_results(
        paths.Layout.local(root),
        project=WANDB_PROJECT,
        run=f"curve-{result['proof']}",
        metrics=tracking.flat_numbers(numbers),
        images={"curve": root / "curve.png"},
    )


WANDB_PROJECT = "retool-curve"
