"""Checkpoint discovery and checkpoint_info.json on fake volume trees."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from recipe.retool.core.paths import (
    SAFETENSORS_INDEX,
    CheckpointInfo,
    CheckpointNotFound,
    Layout,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint_info,
    resolve_model_dir,
    weights_problem,
    write_checkpoint_info,
)


def write_weights(hf_dir: Path, name: str = "model.safetensors") -> Path:
    """A small safetensors file that loads (two float32 tensors), as verl or its merger write."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {"w": np.ones((4, 4), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}
    save_file(tensors, str(hf_dir / name))
    return hf_dir / name


def make_step(layout: Layout, stage: str, exp: str, step: int, *, weights: bool = True) -> Path:
    """A step directory as verl writes it (SFT: huggingface/ at the top; PPO: under actor/)."""
    step_dir = layout.experiment_dir(stage, exp) / f"global_step_{step}"
    hf = step_dir / ("huggingface" if stage == "sft" else "actor/huggingface")
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    if weights:
        write_weights(hf)
    return step_dir


def mark_tracked(layout: Layout, stage: str, exp: str, step: int) -> None:
    (layout.experiment_dir(stage, exp) / "latest_checkpointed_iteration.txt").write_text(str(step))


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout.local(tmp_path)


def test_empty_tree_has_no_checkpoints_and_a_clear_error(layout: Layout) -> None:
    assert list_checkpoints(layout, "sft") == []
    with pytest.raises(CheckpointNotFound, match="run the sft stage first"):
        latest_checkpoint(layout, "sft")


def test_latest_is_highest_complete_step_of_newest_experiment(layout: Layout) -> None:
    for step in (10, 20):
        make_step(layout, "sft", "old", step)
    mark_tracked(layout, "sft", "old", 20)
    past = time.time() - 100
    for step_dir in layout.experiment_dir("sft", "old").glob("global_step_*"):
        os.utime(step_dir, (past, past))
    for step in (5, 62, 124):
        make_step(layout, "sft", "new", step)
    mark_tracked(layout, "sft", "new", 124)
    latest = latest_checkpoint(layout, "sft")
    assert (latest.experiment, latest.step) == ("new", 124)
    assert latest.hf_dir == latest.path / "huggingface"
    assert latest_checkpoint(layout, "sft", "old").step == 20


def test_partial_save_without_completion_marker_is_skipped(layout: Layout) -> None:
    make_step(layout, "sft", "run", 62)
    mark_tracked(layout, "sft", "run", 62)
    make_step(layout, "sft", "run", 124)  # interrupted: the tracker still says 62
    found = {c.step: c.complete for c in list_checkpoints(layout, "sft")}
    assert found == {62: True, 124: False}
    assert latest_checkpoint(layout, "sft").step == 62


def test_step_without_hf_weights_is_not_complete(layout: Layout) -> None:
    make_step(layout, "sft", "run", 3, weights=False)
    mark_tracked(layout, "sft", "run", 3)
    with pytest.raises(CheckpointNotFound):
        latest_checkpoint(layout, "sft")


def test_dapo_checkpoints_keep_weights_under_actor(layout: Layout) -> None:
    make_step(layout, "dapo", "rl", 20)
    mark_tracked(layout, "dapo", "rl", 20)
    ckpt = latest_checkpoint(layout, "dapo")
    assert ckpt.hf_dir == ckpt.path / "actor" / "huggingface"
    with pytest.raises(CheckpointNotFound):
        latest_checkpoint(layout, "sft")


def test_stray_files_and_dirs_are_ignored(layout: Layout) -> None:
    make_step(layout, "sft", "run", 1)
    mark_tracked(layout, "sft", "run", 1)
    exp = layout.experiment_dir("sft", "run")
    (exp / "global_step_x").mkdir()
    (exp / "global_step_9").write_text("not a dir")
    (layout.stage_root("sft") / "README").write_text("hi")
    assert [c.step for c in list_checkpoints(layout, "sft")] == [1]


def test_checkpoint_info_round_trip_is_atomic(layout: Layout) -> None:
    info = CheckpointInfo("run", "sft", 124, "/x/huggingface", "Qwen/Qwen2.5-7B-Instruct",
                          metrics={"train/loss": 0.5})  # fmt: skip
    path = write_checkpoint_info(layout, info)
    assert json.loads(path.read_text())["step"] == 124
    assert read_checkpoint_info(layout, "sft", "run") == info
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint_info.json"]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"experiment": "x"}', ""])
def test_corrupt_checkpoint_info_reads_as_none(layout: Layout, content: str) -> None:
    target = layout.experiment_dir("sft", "run") / "checkpoint_info.json"
    target.parent.mkdir(parents=True)
    target.write_text(content)
    assert read_checkpoint_info(layout, "sft", "run") is None


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden"])
def test_experiment_names_cannot_escape_the_layout(layout: Layout, name: str) -> None:
    with pytest.raises(ValueError, match="invalid experiment name"):
        layout.experiment_dir("sft", name)


def test_unknown_stage_is_rejected(layout: Layout) -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        layout.stage_root("ppo")  # type: ignore[arg-type]


def test_a_step_counts_only_when_its_weights_would_load(layout: Layout) -> None:
    """Tracked steps whose weights are truncated, headerless, or whose config does not parse are
    not complete, and neither the latest nor an explicit spec resolves to them."""
    good = make_step(layout, "sft", "run", 1)
    for step, damage in [
        (2, lambda hf: (hf / "model.safetensors").write_bytes(
            (hf / "model.safetensors").read_bytes()[:-1])),
        (3, lambda hf: (hf / "model.safetensors").write_bytes(  # the 100 bytes
            (hf / "model.safetensors").read_bytes()[:100])),
        (4, lambda hf: (hf / "config.json").write_text("{not json")),
        (5, lambda hf: (hf / "model.safetensors").unlink()),
    ]:  # fmt: skip
        damage(make_step(layout, "sft", "run", step) / "huggingface")
    mark_tracked(layout, "sft", "run", 5)
    found = {c.step: c for c in list_checkpoints(layout, "sft", "run")}
    assert found[1].complete and found[1].problem is None
    assert "model.safetensors: truncated" in found[2].problem
    assert "model.safetensors: header of 112 bytes in a 100-byte file" in found[3].problem
    assert "config.json does not parse" in found[4].problem
    assert "no *.safetensors weights" in found[5].problem
    assert latest_checkpoint(layout, "sft").step == 1
    assert resolve_model_dir(layout, "sft") == good / "huggingface"
    with pytest.raises(CheckpointNotFound, match="truncated"):
        resolve_model_dir(layout, str(layout.experiment_dir("sft", "run") / "global_step_2"))


def test_sharded_weights_are_checked_against_their_index(layout: Layout) -> None:
    hf = make_step(layout, "dapo", "rl", 1, weights=False) / "actor" / "huggingface"
    write_weights(hf, "model-00001-of-00002.safetensors")
    write_weights(hf, "model-00002-of-00002.safetensors")
    index = {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (hf / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": index}))
    assert weights_problem(hf) is None
    (hf / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {**index, "lm_head": "x"}}))
    assert "x: unreadable safetensors header" in weights_problem(hf)
    index["lm_head"] = "model-00002-of-00002.safetensors"
    (hf / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": index}))
    assert "1 tensor(s) of the index in no shard (first: lm_head)" in weights_problem(hf)


def test_a_header_that_lies_about_a_tensor_is_caught(tmp_path: Path) -> None:
    """A tensor whose byte range disagrees with its shape and dtype: the file would not load."""
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + b"\0" * 32
    )
    assert "w spans 32 bytes, not 16 × 4" in weights_problem(tmp_path)
