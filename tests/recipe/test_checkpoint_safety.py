"""Nothing lost or mislabelled: merges that never overwrite in place, relaunches that refuse
another base, and SIGKILL during a merge or a save leaving the previous complete step chosen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from recipe.retool.core.paths import (
    Layout,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint_info,
    resolve_sft_checkpoint,
)
from recipe.retool.core.request import LaunchError, parse
from recipe.retool.stages.checkpoints import WeightsExist, describe_checkpoints, merge_checkpoint
from recipe.retool.stages.dapo import run_dapo
from recipe.retool.stages.sft import run_sft
from tests.recipe.test_paths import make_step, mark_tracked, write_weights
from tests.recipe.test_stages import CPU, FakeRunner
from tests.recipe.test_stages import layout as layout  # the fixture, re-exported

REPO_ROOT = Path(__file__).resolve().parents[2]


def fsdp_step(layout: Layout, step: int, *, weights: bool) -> Path:
    """An SFT step as verl saves it: shards (here only their config) and ``huggingface/``."""
    step_dir = make_step(layout, "sft", "run", step, weights=weights)
    (step_dir / "fsdp_config.json").write_text("{}")
    return step_dir


class Merger:
    """Stands in for ``verl.model_merger``: writes weights (whole, or cut short) into the
    ``--target_dir`` it is given, and returns ``returncode``."""

    def __init__(self, *, cut: int = 0, returncode: int = 0) -> None:
        self.cut, self.returncode = cut, returncode
        self.targets: list[Path] = []

    def __call__(self, command: Sequence[str], env: dict[str, str]) -> int:
        target = Path(command[command.index("--target_dir") + 1])
        self.targets.append(target)
        target.mkdir(parents=True)
        (target / "config.json").write_text('{"merged": true}')
        weights = write_weights(target)
        if self.cut:
            weights.write_bytes(weights.read_bytes()[: -self.cut])
        return self.returncode


def test_merge_writes_beside_and_renames_into_place(layout: Layout) -> None:
    step_dir = fsdp_step(layout, 2, weights=False)  # verl's default: config only
    merger = Merger()
    target = merge_checkpoint(layout, "sft", "run", 2, runner=merger)
    assert target == step_dir / "huggingface" and merger.targets[0] != target
    assert merger.targets[0].parent == step_dir  # same volume: the rename is atomic
    assert json.loads((target / "config.json").read_text()) == {"merged": True}
    assert sorted(p.name for p in step_dir.iterdir()) == ["fsdp_config.json", "huggingface"]


def test_merge_refuses_to_replace_weights_that_load_and_keeps_them_when_forced(
    layout: Layout,
) -> None:
    step_dir = fsdp_step(layout, 2, weights=True)
    weights = step_dir / "huggingface" / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(WeightsExist, match="pass --force"):
        merge_checkpoint(layout, "sft", "run", 2, runner=Merger())
    with pytest.raises(RuntimeError, match="model merger failed"):
        merge_checkpoint(layout, "sft", "run", 2, force=True, runner=Merger(returncode=1))
    with pytest.raises(RuntimeError, match=r"merged weights do not load: .*truncated"):
        merge_checkpoint(layout, "sft", "run", 2, force=True, runner=Merger(cut=4))
    assert weights.read_bytes() == before
    assert (step_dir / "huggingface" / "config.json").read_text() == "{}"
    assert sorted(p.name for p in step_dir.iterdir()) == ["fsdp_config.json", "huggingface"]
    merge_checkpoint(layout, "sft", "run", 2, force=True, runner=Merger())
    assert json.loads((step_dir / "huggingface" / "config.json").read_text()) == {"merged": True}
    assert sorted(p.name for p in step_dir.iterdir()) == ["fsdp_config.json", "huggingface"]


def test_relaunch_with_another_base_or_data_is_refused_unless_asked(
    layout: Layout, tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = ["--experiment-name=exp"]
    run_sft(
        layout, CPU, parse("sft", args), model_path=tiny_model_dir, runner=FakeRunner(layout, "sft")
    )
    info = read_checkpoint_info(layout, "sft", "exp")
    assert (info.base_model, info.data) == (str(tiny_model_dir), str(layout.sft_train_file()))

    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    ran: list[list[str]] = []

    def runner(command: Sequence[str], env: dict[str, str]) -> int:
        ran.append(list(command))
        return 0

    with pytest.raises(LaunchError) as refused:
        run_sft(layout, CPU, parse("sft", args), model_path=other, runner=runner)
    message = str(refused.value)
    assert "\n" not in message and str(tiny_model_dir) in message and str(other) in message
    assert "--allow-other-base" in message and ran == []

    data = tmp_path / "other.parquet"
    data.write_bytes(layout.sft_train_file().read_bytes())
    with pytest.raises(LaunchError, match=f"data {layout.sft_train_file()} \\(now {data}\\)"):
        run_sft(layout, CPU, parse("sft", [*args, f"data.train_files={data}"]),
                       model_path=tiny_model_dir, runner=runner)  # fmt: skip
    assert ran == []

    run_sft(
        layout, CPU, parse("sft", [*args, "--allow-other-base"]), model_path=other, runner=runner
    )
    assert len(ran) == 1 and read_checkpoint_info(layout, "sft", "exp").base_model == str(other)
    run_sft(layout, CPU, parse("sft", args), model_path=other, runner=runner)  # the new base sticks
    assert len(ran) == 2


def test_dapo_relaunch_from_another_sft_step_is_refused(layout: Layout) -> None:
    for step in (1, 2):
        make_step(layout, "sft", "s", step)
    mark_tracked(layout, "sft", "s", 1)
    run = ["--experiment-name=d"]
    run_dapo(layout, CPU, parse("dapo", run), sandbox_url="x", runner=FakeRunner(layout, "dapo"))
    mark_tracked(layout, "sft", "s", 2)  # a newer SFT step is now the latest
    with pytest.raises(LaunchError, match=r"global_step_1/huggingface \(now .*global_step_2"):
        run_dapo(layout, CPU, parse("dapo", run), sandbox_url="x", runner=lambda c, e: 0)


# ---------------------------------------------------------------------------------------------
# SIGKILL: the previous complete step stays the one chosen
# ---------------------------------------------------------------------------------------------

# A merge (or a save) that writes its weights slowly and says when it has begun, for the test
# to kill it -9 mid-write.
SLOW_WRITER = """
import sys, time
from pathlib import Path

def write_slowly(target: Path, whole: bytes, started: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text("{}")
    with (target / "model.safetensors").open("wb") as out:
        out.write(whole[:-16])  # the header and most tensor bytes
        out.flush()
        started.write_text("writing")
        time.sleep(600)
        out.write(whole[-16:])
"""

MERGE_SCRIPT = (
    SLOW_WRITER
    + """
from recipe.retool.stages.checkpoints import merge_checkpoint
from recipe.retool.core import paths
root, started, whole, force = sys.argv[1:]

def merger(command, env):
    target = Path(command[command.index("--target_dir") + 1])
    write_slowly(target, Path(whole).read_bytes(), Path(started))
    return 0

merge_checkpoint(paths.Layout.local(Path(root)), "sft", "run", 2, force=force == "1",
                        runner=merger)
"""
)

# verl writes the tracker after every shard; the worst order (tracker first) is checked too.
SAVE_SCRIPT = (
    SLOW_WRITER
    + """
root, started, whole, tracker_first = sys.argv[1:]
exp = Path(root) / "checkpoints" / "sft-experiments" / "run"
if tracker_first == "1":
    (exp / "latest_checkpointed_iteration.txt").write_text("3")
write_slowly(exp / "global_step_3" / "huggingface", Path(whole).read_bytes(), Path(started))
"""
)


def kill_mid_write(script: str, *args: str, started: Path) -> None:
    """Run ``script`` and SIGKILL it once it has begun writing weights."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=REPO_ROOT)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None, "the writer ended before it began writing"
        assert time.monotonic() < deadline, "the writer never began writing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def whole_weights(tmp_path: Path) -> Path:
    (tmp_path / "w").mkdir()
    return write_weights(tmp_path / "w")


@pytest.mark.parametrize("force", [False, True], ids=["merge", "forced-merge"])
def test_kill_9_during_a_merge_leaves_the_complete_steps_as_they_were(
    layout: Layout, tmp_path: Path, force: bool
) -> None:
    fsdp_step(layout, 1, weights=True)
    fsdp_step(layout, 2, weights=force)  # forced: step 2 has weights that load already
    mark_tracked(layout, "sft", "run", 2)
    expected = 2 if force else 1
    assert latest_checkpoint(layout, "sft").step == expected
    started = tmp_path / "started"
    weights = str(whole_weights(tmp_path))
    kill_mid_write(MERGE_SCRIPT, str(layout.data.parent), str(started), weights,
                   "1" if force else "0", started=started)  # fmt: skip
    assert latest_checkpoint(layout, "sft").step == expected
    assert [c.complete for c in list_checkpoints(layout, "sft")] == [True, force]
    # the next merge clears what the killed one left and completes
    target = merge_checkpoint(layout, "sft", "run", 2, force=force, runner=Merger())
    assert latest_checkpoint(layout, "sft").hf_dir == target
    assert sorted(p.name for p in target.parent.iterdir()) == ["fsdp_config.json", "huggingface"]


@pytest.mark.parametrize("tracker_first", [False, True], ids=["verl-order", "tracker-first"])
def test_kill_9_during_a_checkpoint_save_keeps_the_previous_step_chosen(
    layout: Layout, tmp_path: Path, tracker_first: bool
) -> None:
    make_step(layout, "sft", "run", 2)
    mark_tracked(layout, "sft", "run", 2)
    started = tmp_path / "started"
    kill_mid_write(SAVE_SCRIPT, str(layout.data.parent), str(started),
                   str(whole_weights(tmp_path)), "1" if tracker_first else "0",
                   started=started)  # fmt: skip
    step3 = layout.experiment_dir("sft", "run") / "global_step_3" / "huggingface"
    assert (step3 / "model.safetensors").is_file()  # half written
    assert latest_checkpoint(layout, "sft").step == 2
    assert resolve_sft_checkpoint(layout, None) == latest_checkpoint(layout, "sft").hf_dir
    (partial,) = [c for c in list_checkpoints(layout, "sft") if c.step == 3]
    why = "truncated" if tracker_first else "not saved to the end (verl's tracker is at step 2)"
    assert why in partial.problem
    (row,) = [line for line in describe_checkpoints(layout).splitlines() if " 3  " in line]
    assert "partial" in row and why in row  # what list_checkpoints prints
