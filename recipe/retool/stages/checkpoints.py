"""The base model's download and the checkpoints' upkeep: list them, merge FSDP shards into
Hugging Face weights."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from recipe.retool.core.paths import (
    BASE_MODEL_ID,
    BASE_MODEL_REVISION,
    CheckpointNotFound,
    Layout,
    Stage,
    list_checkpoints,
    read_checkpoint_info,
    weights_problem,
)
from recipe.retool.stages.process import Runner, run_subprocess

COMPLETE_MARKER = ".download-complete"


def download_model(
    layout: Layout,
    model_id: str = BASE_MODEL_ID,
    revision: str = BASE_MODEL_REVISION,
    *,
    force: bool = False,
    downloader: Callable[..., str] | None = None,
) -> Path:
    """Snapshot a model into the models volume; resumable, and skipped once complete."""
    target = layout.model_dir(model_id)
    marker = target / COMPLETE_MARKER
    if marker.exists() and marker.read_text().strip() == revision and not force:
        print(f"{model_id}@{revision[:12]} already complete at {target}")
        return target
    if downloader is None:
        from huggingface_hub import snapshot_download as downloader
    target.mkdir(parents=True, exist_ok=True)
    downloader(
        repo_id=model_id,
        revision=revision,
        local_dir=str(target),
        token=os.environ.get("HF_TOKEN") or None,
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
    )
    if not (target / "config.json").exists():
        raise RuntimeError(f"download of {model_id} finished without config.json in {target}")
    marker.write_text(revision + "\n")
    return target


def describe_checkpoints(layout: Layout) -> str:
    """A table of every checkpoint per stage and experiment, marking partial saves."""
    lines = [f"{'stage':<5} {'experiment':<32} {'step':>6}  {'status':<8} path"]
    for stage in ("sft", "dapo"):
        ckpts = list_checkpoints(layout, stage)
        for ckpt in sorted(ckpts, key=lambda c: (c.experiment, c.step)):
            status = "complete" if ckpt.complete else "partial"
            why = f"  ({ckpt.problem})" if ckpt.problem else ""
            lines.append(
                f"{stage:<5} {ckpt.experiment:<32} {ckpt.step:>6}  {status:<8} {ckpt.path}{why}"
            )
        for exp in sorted({c.experiment for c in ckpts}):
            if read_checkpoint_info(layout, stage, exp) is None:
                lines.append(f"{stage:<5} {exp:<32} {'':>6}  note     checkpoint_info.json missing")
    if len(lines) == 1:
        lines.append("(no checkpoints yet: run `make sft`)")
    return "\n".join(lines)


class WeightsExist(ValueError):
    """A merge would replace loadable Hugging Face weights and was not forced."""


MERGE_STAGING = ".huggingface.merging"  # the merger's output until it is checked and renamed


MERGE_REPLACED = ".huggingface.replaced"  # forced: the old weights until the new are in place


def merge_checkpoint(
    layout: Layout,
    stage: Stage,
    experiment: str,
    step: int,
    *,
    force: bool = False,
    runner: Runner = run_subprocess,
) -> Path:
    """FSDP shards → HF safetensors with verl's model merger (for steps saved without them).

    Never in place: the merger writes to a staging directory next to ``huggingface/``, the result
    must load (:func:`~recipe.retool.core.paths.weights_problem`), and only then is it renamed into
    place, so a merge killed at any moment leaves the step as it was. Loadable weights already
    there are replaced only with ``force``, and are kept until the new ones are in place."""
    step_dir = layout.experiment_dir(stage, experiment) / f"global_step_{step}"
    shards = step_dir if stage == "sft" else step_dir / "actor"
    if not (shards / "fsdp_config.json").exists():
        raise CheckpointNotFound(f"no FSDP checkpoint at {shards} (missing fsdp_config.json)")
    target, staging, replaced = (shards / n for n in ("huggingface", MERGE_STAGING, MERGE_REPLACED))
    if replaced.is_dir() and not target.exists():  # a forced merge killed between its renames
        replaced.rename(target)
    shutil.rmtree(replaced, ignore_errors=True)
    if weights_problem(target) is None and not force:
        raise WeightsExist(
            f"{target} already holds weights that load; pass --force to merge again (they are "
            "kept until the new ones load)"
        )
    shutil.rmtree(staging, ignore_errors=True)  # what a killed merge left
    command = [
        sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
        "--local_dir", str(shards), "--target_dir", str(staging),
    ]  # fmt: skip
    if runner(command, {}) != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"model merger failed for {shards}")
    if problem := weights_problem(staging):
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"the merged weights do not load: {problem}")
    from recipe.retool.verl_plugins.varlen_attention import make_portable

    make_portable(
        staging
    )  # loads with plain transformers, like every saved step (record.record_run)
    if target.exists():
        target.rename(replaced)
    staging.rename(target)
    shutil.rmtree(replaced, ignore_errors=True)
    return target
