"""How to follow a detached Modal run: the lines a launch prints, and where results land.

A day-long run must not depend on the laptop that started it: ``make sft|dapo|eval|pipeline``
run ``modal run --detach``, whose local entry point spawns the remote function, prints these
lines, and then streams its logs until Ctrl-C or a closed lid, neither of which stops it. Plain
functions (no Modal import), so the CPU tests check what is printed; what a launch prints needs
only the standard library at import, as the launch runs where `pip install modal` is all a user
may have.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from recipe.retool.core.constants import EVAL_PROJECT
from recipe.retool.core.paths import INFO_FILE, Layout
from recipe.retool.records import tracking


def follow_lines(
    app_id: str, call_id: str, *, what: str, wandb_url: str | None = None
) -> list[str]:
    """What to print once a run is spawned: what runs, how to read its logs later, its wandb."""
    lines = [
        f"launched {what} ({call_id}); it keeps running if this terminal closes (Ctrl-C detaches)",
        f"logs:    modal app logs {app_id} --function-call {call_id} --follow   (or: make logs)",
        "status:  make status",
    ]
    if wandb_url:
        lines.append(f"wandb:   {wandb_url}")
    return lines


def training_wandb_url(stage: str, experiment: str, project: str) -> str:
    """The wandb page of a training run: its stable id (``tracking.run_id``), entity from the
    environment or ``.env``."""
    entity = tracking.launch_env().get("WANDB_ENTITY")
    return tracking.run_url(project, tracking.run_id(stage, experiment), entity)


def launch_wandb_url(stage: str, check: dict, call_id: str) -> str | None:
    """The wandb page a launch of ``stage`` logs to, from what its check returned (``check_launch``:
    the experiment, when named, and the project): a training run's own page (named after the call
    when no ``--experiment-name`` was given, as the container names it), the evaluation's project,
    or ``None`` (the pipeline: one run a stage)."""
    if stage in ("sft", "dapo"):
        experiment = check["experiment"] or tracking.default_experiment(stage, call_id)
        return training_wandb_url(stage, experiment, check["project"])
    if stage == "eval":
        entity = tracking.launch_env().get("WANDB_ENTITY")
        return tracking.run_url(EVAL_PROJECT, "", entity).removesuffix("/runs/")
    return None


def failure_line(what: str, exc: BaseException, app_id: str) -> str:
    """One line for a spawned run that failed: its logs (streamed, and kept) say why."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"error: {what} failed: {first} (modal app logs {app_id})"


def project_override(overrides: Sequence[str], default: str) -> str:
    """``trainer.project_name`` as the user's overrides leave it."""
    for item in reversed(overrides):
        key, _, value = item.lstrip("+").partition("=")
        if key == "trainer.project_name" and value:
            return value
    return default


def result_files(layout: Layout, experiment: str) -> list[Path]:
    """What ``make results EXPERIMENT=x`` fetches: reports, never weights. Each stage's
    ``checkpoint_info.json``, ``report.md``/``report.png`` and metrics, and the experiment's
    evaluation reports (markdown, JSON, plots; per-sample files stay on the volume)."""
    # imported here: run_report plots, which the launch client never does
    from recipe.retool.records.run_report import REPORT_MD, REPORT_PNG

    found: list[Path] = []
    for stage in ("sft", "dapo"):
        root = layout.experiment_dir(stage, experiment)
        found += [root / name for name in (INFO_FILE, REPORT_MD, REPORT_PNG)]
        found += sorted((root / "metrics").glob("*.jsonl"))
    eval_root = layout.checkpoints / "eval"
    reports = [
        eval_root / experiment,
        *(eval_root / f"progress-{s}-{experiment}" for s in ("sft", "dapo")),
    ]
    for directory in reports:
        for pattern in ("*.md", "*.json", "*.png"):
            found += sorted(directory.rglob(pattern))
    return [path for path in found if path.is_file()]


def read_result_files(layout: Layout, experiment: str) -> dict[str, bytes]:
    """``{path relative to the checkpoints volume: bytes}`` of :func:`result_files`."""
    return {
        str(p.relative_to(layout.checkpoints)): p.read_bytes()
        for p in result_files(layout, experiment)
    }


def write_result_files(files: dict[str, bytes], target: Path) -> list[Path]:
    """:func:`read_result_files`'s answer under ``target``, in the volume's layout."""
    written = []
    for relative, body in sorted(files.items()):
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        written.append(path)
    return written
