"""What a finished, failed or interrupted stage leaves: its metrics file, its report, its checkpoint
info (the pipeline's "stage done" marker) and the origin an experiment may only resume from."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.retool.core.paths import (
    Checkpoint,
    CheckpointInfo,
    CheckpointNotFound,
    Layout,
    Origin,
    Stage,
    latest_checkpoint,
    read_origin,
    write_checkpoint_info,
    write_origin,
)
from recipe.retool.core.request import LaunchError
from recipe.retool.records import run_metrics


@dataclass(frozen=True)
class StageResult:
    stage: Stage
    experiment: str
    returncode: int
    checkpoint: Checkpoint | None
    seconds: float

    def summary(self) -> str:
        """One line: the run, its exit status, its time and its newest complete checkpoint."""
        where = self.checkpoint.path if self.checkpoint else "no complete checkpoint"
        return (
            f"{self.stage} {self.experiment}: exit {self.returncode}, "
            f"{self.seconds / 60:.1f} min, {where}"
        )


def metrics_file_env(layout: Layout, stage: Stage, experiment: str) -> dict[str, str]:
    """``VERL_FILE_LOGGER_PATH`` for verl's ``file`` logger (on in sft.yaml and dapo.yaml): one
    file per attempt under ``<experiment>/metrics/`` (the logger truncates on open), all of which
    :func:`run_summary` reads."""
    log_dir = run_metrics.metrics_dir(layout.experiment_dir(stage, experiment))
    log_dir.mkdir(parents=True, exist_ok=True)
    return {"VERL_FILE_LOGGER_PATH": str(log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.jsonl")}


def run_summary(layout: Layout, stage: Stage, experiment: str) -> dict[str, Any]:
    """What ``checkpoint_info.json`` records of a run, from the metrics verl logged over every
    attempt (a step logged again after a resume counts once, its last value kept):

    * both stages: ``steps``, the last step logged;
    * SFT: ``train_loss`` of that step, ``tokens`` trained on, and ``val_loss`` when validated;
    * DAPO: ``reward_mean`` of the last step, ``val_steps`` and ``val_acc`` (mean@k accuracy) in
      the order validation ran.

    ``{}`` when verl logged nothing (a ``trainer.logger`` override without ``file``);
    ``{"unreadable": reason}`` when a metrics file cannot be parsed.
    """
    try:
        rows = run_metrics.read_run(layout.experiment_dir(stage, experiment))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}
    if stage == "dapo":
        summary = run_metrics.summarize(rows)
        if not summary.steps:
            return {}
        return {
            "steps": summary.train_steps[-1],
            "reward_mean": summary.reward_mean[-1],
            "val_steps": summary.val_steps,
            "val_acc": summary.val_acc,
        }
    train = [(step, data) for step, data in rows if "train/loss" in data]
    if not train:
        return {}
    metrics: dict[str, Any] = {
        "steps": train[-1][0],
        "train_loss": float(train[-1][1]["train/loss"]),
        "tokens": int(sum(data.get("train/global_tokens", 0) for _, data in train)),
    }
    val = [data["val/loss"] for _, data in rows if "val/loss" in data]
    if val:
        metrics["val_loss"] = float(val[-1])
    return metrics


def check_origin(
    layout: Layout, stage: Stage, experiment: str, origin: Origin, *, allow_other: bool, write: bool
) -> None:
    """Refuse to resume ``experiment`` from another base model or dataset than it was started
    with (its weights would continue under a record that names the new ones), unless
    ``allow_other`` (``--allow-other-base``). ``write``: record ``origin`` (the node that runs
    the trainer; every node checks)."""
    recorded = read_origin(layout, stage, experiment)
    if recorded is not None and recorded != origin:
        changed = [
            f"{what} {old} (now {new})"
            for what, old, new in (
                ("base model", recorded.base_model, origin.base_model),
                ("data", recorded.data, origin.data),
            )
            if old and old != new
        ]
        if changed and not allow_other:
            raise LaunchError(
                f"experiment {experiment!r} was started from {' and '.join(changed)}: pick "
                "another --experiment-name, or pass --allow-other-base to resume it anyway"
            )
        if changed:
            print(f"note: {experiment} resumes with {'; '.join(changed)}", flush=True)
    if write and recorded != origin:
        write_origin(layout, stage, experiment, origin)


def record_run(
    layout: Layout, stage: Stage, experiment: str, origin: Origin, returncode: int
) -> Checkpoint | None:
    """The run's newest complete checkpoint; ``checkpoint_info.json`` only when the run finished,
    with the run's numbers (:func:`run_summary`).

    The info file is the pipeline's "stage done" marker, so an interrupted run (whose partial
    progress verl resumes from) never writes it.
    """
    make_checkpoints_portable(layout.experiment_dir(stage, experiment))
    try:
        ckpt = latest_checkpoint(layout, stage, experiment)
    except CheckpointNotFound:
        return None
    if returncode != 0:
        return ckpt
    metrics = run_summary(layout, stage, experiment)
    write_checkpoint_info(
        layout,
        CheckpointInfo(experiment, stage, ckpt.step, str(ckpt.hf_dir), origin.base_model,
                       metrics=metrics, data=origin.data),
    )  # fmt: skip
    return ckpt


def write_report(layout: Layout, stage: Stage, experiment: str) -> None:
    """The run's ``report.md``/``report.png`` from its metrics, brought up to date whenever the
    trainer returns (finished, failed or interrupted); a report never fails the run it describes."""
    from recipe.retool.records.run_report import write_run_report

    try:
        write_run_report(layout.experiment_dir(stage, experiment), stage)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"note: no run report ({type(exc).__name__}: {exc})", flush=True)


def make_checkpoints_portable(experiment_dir: Path) -> None:
    """Every checkpoint's Hugging Face config loads with plain transformers, whatever attention
    the run trained with (``varlen_attention.make_portable``)."""
    from recipe.retool.verl_plugins.varlen_attention import make_portable

    for config in experiment_dir.glob("global_step_*/**/huggingface/config.json"):
        make_portable(config.parent)
