"""The proof's report: ``curve.md`` and ``curve.png`` derived from its rows, and its numbers
and plot as one wandb run."""

from __future__ import annotations

from pathlib import Path

from recipe.retool.core import paths


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
        "verdict": {k: v for k, v in result["verdict"].items() if not isinstance(v, bool)},
        "holds": float(result["verdict"].get("holds", False)),
        "arms": arms_numbers,
    }
    return tracking.log_results(
        paths.Layout.local(root),
        project=WANDB_PROJECT,
        run=f"curve-{result['proof']}",
        metrics=tracking.flat_numbers(numbers),
        images={"curve": root / "curve.png"},
    )


WANDB_PROJECT = "retool-curve"


def write_report(root: Path, result: dict) -> None:
    """``curve.md`` always; ``curve.png`` where matplotlib is installed."""
    rows = result["arms"]
    lines = [
        f"# Does DAPO learn? (proof {result['proof']}, {rows[0]['gpus']}× {rows[0]['gpu']})",
        "",
        "SFT held-out accuracy by step: "
        + ", ".join(f"{s}: {a:.2f}" for s, a in result["sft_acc_by_step"].items())
        + f". DAPO starts from step {result['start_step']} ({result['start_acc']:.3f}, the first "
        f"inside the band [{result['band'][0]:.0%}, {result['band'][1]:.0%}]).",
        "",
        "| arm | seed | reward | validation accuracy (first → last) | rise | 95 % CI | exit |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        curve_text = " → ".join(f"{a:.3f}" for a in row["val_acc"]) or "none"
        ci = row.get("rise_ci95")
        lines.append(
            f"| {row['arm']} | {row['seed']} | {'shuffled' if row['control'] else 'ReTool'} | "
            f"{curve_text} | {_signed(row.get('rise'))} | "
            f"{f'[{ci[0]:+.3f}, {ci[1]:+.3f}]' if ci else 'n/a'} | {row['dapo_exit']} |"
        )
    v = result["verdict"]
    lines.append("")
    lines.append(f"- mean rise over {v['seeds']} seeds: {_signed(v['mean_rise'])}")
    if "holds" in v:
        lines.append(
            f"- control rise {_signed(v['control_rise'])}: below every seed's: "
            f"{_yes(v['control_below_every_seed'])}; its interval includes 0: "
            f"{_yes(v['control_ci_includes_0'])}. The proof "
            + ("holds." if v["holds"] else "does NOT hold.")
        )
    lines.append(f"- time (s): {result['timing_s']}")
    (root / "curve.md").write_text("\n".join(lines) + "\n")
    _plot(root, result)


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _plot(root: Path, result: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [int(s) for s in result["sft_acc_by_step"]]
    left.plot(steps, list(result["sft_acc_by_step"].values()), marker="o")
    left.axhspan(*result["band"], alpha=0.15, label="band")
    left.axvline(result["start_step"], linestyle="--", color="gray", label="DAPO start")
    left.set(xlabel="SFT step", ylabel="held-out accuracy", title="calibration")
    left.legend()
    for row in result["arms"]:
        style = "--" if row["control"] else "-"
        right.plot(row["val_steps"], row["val_acc"], style, marker="o", label=row["arm"])
    right.set(xlabel="DAPO step", ylabel="validation accuracy", title="arms")
    right.legend()
    fig.tight_layout()
    fig.savefig(root / "curve.png", dpi=120)
    plt.close(fig)
