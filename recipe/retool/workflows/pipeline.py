"""download → prep → SFT → DAPO → evaluation, idempotently: done stages are skipped.

A stage is *done* when the artefact the next stage needs exists and was finished: the model's
download marker; the four parquet files, prepared with SFT traces over ``data.max_length`` tokens
filtered out (prep counts tokens with the downloaded model's tokenizer, which is why download
comes first; data prepared without it, or at another limit, is prepared again);
``checkpoint_info.json`` of the SFT / DAPO experiment (written only when training exits cleanly);
the evaluation report. Anything else is run again, and training resumes from its last complete
checkpoint (``trainer.resume_mode=auto``), so an interrupted pipeline continues where it stopped.
Where the stages run (Modal functions, or plain calls on a CPU) is the caller's business: it
passes one callable per stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from recipe.retool.core.paths import (
    BASE_MODEL_ID,
    EVAL_SETS,
    Layout,
    latest_checkpoint,
    read_checkpoint_info,
)
from recipe.retool.core.request import LaunchRequest
from recipe.retool.launch.commands import load_stage_config
from recipe.retool.stages.checkpoints import COMPLETE_MARKER

PIPELINE_STAGES = ("download", "prep", "sft", "dapo", "eval")
RL_FILES = ("train", "aime_2024", "aime_2025")


def training_requests(experiment: str) -> tuple[LaunchRequest, LaunchRequest]:
    """The pipeline's SFT and DAPO launches of ``experiment``: DAPO starts from that SFT."""
    return (
        LaunchRequest("sft", experiment=experiment),
        LaunchRequest("dapo", experiment=experiment, sft_checkpoint=experiment),
    )


def comparison_dir(layout: Layout, experiment: str) -> Path:
    """The pipeline's base-vs-SFT-vs-DAPO report: ``<checkpoints>/eval/<experiment>``."""
    from recipe.retool.eval.checkpoints import eval_dir

    return eval_dir(layout, experiment)


def stage_done(layout: Layout, experiment: str, model_id: str = BASE_MODEL_ID) -> dict[str, bool]:
    """Which stages of ``experiment`` have finished, from what is on the volumes."""
    from recipe.retool.data.prep import sft_length_checked

    max_length = load_stage_config("sft").overrides["data.max_length"]
    data_ready = (
        layout.sft_train_file().exists()
        and all(layout.rl_file(name).exists() for name in RL_FILES)
        and sft_length_checked(layout.data) == max_length
    )
    model_ready = (layout.model_dir(model_id) / COMPLETE_MARKER).exists()
    return {
        "download": model_ready,
        "prep": data_ready,
        "sft": read_checkpoint_info(layout, "sft", experiment) is not None,
        "dapo": read_checkpoint_info(layout, "dapo", experiment) is not None,
        "eval": (comparison_dir(layout, experiment) / "compare.json").exists(),
    }


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    action: str  # "skipped (done)" | "ran" | "failed: ..."


def run_pipeline(
    status: Callable[[], Mapping[str, bool]],
    runners: Mapping[str, Callable[[], None]],
    *,
    force: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
) -> list[StageOutcome]:
    """Run every stage that is not done (or is forced), in order; stop at the first failure.

    ``status`` is asked again before each stage, so a stage that finished elsewhere (another
    pipeline run, a manual ``modal run``) is not repeated.
    """
    unknown = set(force) - set(PIPELINE_STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {PIPELINE_STAGES}")
    outcomes: list[StageOutcome] = []
    for stage in PIPELINE_STAGES:
        if status().get(stage) and stage not in force:
            outcomes.append(StageOutcome(stage, "skipped (done)"))
            log(f"[pipeline] {stage}: done, skipped")
            continue
        log(f"[pipeline] {stage}: running")
        try:
            runners[stage]()
        except (Exception, SystemExit) as exc:
            outcomes.append(StageOutcome(stage, f"failed: {exc}"))
            log(f"[pipeline] {stage}: failed ({exc}); re-run the pipeline to resume")
            break
        if not status().get(stage):
            outcomes.append(StageOutcome(stage, "failed: finished without its done marker"))
            log(f"[pipeline] {stage}: ended but is not done; re-run the pipeline to resume")
            break
        outcomes.append(StageOutcome(stage, "ran"))
    return outcomes


def format_status(done: Mapping[str, bool]) -> str:
    """One line per stage, for ``list_checkpoints`` and the pipeline's log."""
    return "\n".join(
        f"{stage:<9} {'done' if done.get(stage) else 'pending'}" for stage in PIPELINE_STAGES
    )


def evaluate_experiment(
    layout: Layout,
    experiment: str,
    sandbox_url: str,
    cfg,
    backend: str = "hf",
    model_id: str = BASE_MODEL_ID,
) -> list[Path]:
    """Evaluate base, the experiment's final SFT and DAPO checkpoints; write the comparison.

    Each checkpoint's reports go to ``eval/<experiment>/<label>``; one that already has its
    ``summary.json`` (written last by a finished evaluation) is not evaluated again.
    """
    from recipe.retool.eval.checkpoints import CheckpointRef
    from recipe.retool.eval.report import write_comparison_report
    from recipe.retool.eval.runner import evaluate_checkpoint

    refs = {"base": CheckpointRef("base", layout.model_dir(model_id), "base")}
    for stage in ("sft", "dapo"):
        refs[stage] = CheckpointRef.from_path(latest_checkpoint(layout, stage, experiment).hf_dir)
    datasets = {name: layout.rl_file(name) for name in EVAL_SETS}
    out = comparison_dir(layout, experiment)
    dirs = {}
    for name, ref in refs.items():
        dirs[name] = out / name
        if not (dirs[name] / "summary.json").exists():
            evaluate_checkpoint(ref.path, datasets, dirs[name], cfg, sandbox_url, backend,
                                checkpoint=ref)  # fmt: skip
    return write_comparison_report(dirs, out)
