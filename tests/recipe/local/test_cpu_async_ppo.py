"""verl's fully-async DAPO trainer on CPU (``--rollout-mode=async``, ``local/cpu_async_ppo.py``).

One experiment, preempted like a Modal job: the fully-async entry is SIGKILLed (its whole process
tree) right after the checkpoint of weight version 1, then launched again with the same name and
runs to version 3. The rollouter streams prompts through the ``hf_cpu`` replica and the tool
agent loop (the sandbox executes the calls) into verl's message queue; the trainer takes two
prompts x 4 rollouts a step from it, corrects for staleness with truncated importance weights,
and syncs weights to the rollout after every step through the CPU checkpoint engine.

Switched off here and named: partial rollouts (vLLM's abort and resume; ``hf_cpu`` cannot stop
a ``generate`` midway, so a sync waits for the request in flight). NCCL weight sync has a CPU
counterpart (``local/checkpoint_engine_cpu.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from recipe.retool.core.paths import Layout, read_checkpoint_info
from recipe.retool.core.request import parse
from recipe.retool.core.topology import Topology
from recipe.retool.records import run_metrics
from recipe.retool.stages.dapo import run_dapo
from recipe.retool.stages.record import StageResult
from tests.recipe.local import test_cpu_ppo as sync_ppo
from tests.recipe.test_stages import KillAfterCheckpoint

# The sync test's SFT on synthetic tool traces, so the rollouts write calls the sandbox runs.
tool_sft = sync_ppo.tool_sft
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
# One rollout GPU and one trainer GPU, both logical (cpu_compat).
CPU = Topology(gpus_per_node=2, device="cpu")
EXPERIMENT = "cpu-async-dapo"
STALENESS = 0.5
IS_THRESHOLD = 2.0


@dataclass(frozen=True)
class PreemptedAsyncRun:
    layout: Layout
    rows: pd.DataFrame  # the RL training rows, in dataloader order (no shuffle)
    first: StageResult
    second: StageResult
    logs: list[str]
    relaunched_at: float  # wall clock between the killed attempt and the relaunch

    @property
    def exp_dir(self) -> Path:
        return self.layout.experiment_dir("dapo", EXPERIMENT)

    def metrics(self) -> dict[int, dict]:
        return dict(run_metrics.read_run(self.exp_dir))

    def dump_steps(self, relaunched: bool | None = None) -> list[int]:
        """The steps verl dumped rollouts for, in order: all, or those of the killed attempt
        (``relaunched=False``) or of the relaunch (``True``), told apart by when they were
        written (how far the killed attempt got before the kill varies with the machine's load)."""
        files = (self.layout.data.parent / "rollouts").glob("*.jsonl")
        return sorted(
            int(p.stem)
            for p in files
            if relaunched is None or (p.stat().st_mtime > self.relaunched_at) == relaunched
        )

    def dumped(self, step: int) -> list[dict]:
        path = self.layout.data.parent / "rollouts" / f"{step}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def async_run(
    tmp_path_factory, tool_sft: sync_ppo.ToolSft, local_endpoint: str
) -> PreemptedAsyncRun:
    root = tmp_path_factory.mktemp("cpu-async")
    layout = Layout.local(root)
    args = [
        *sync_ppo.dapo_args(tool_sft, EXPERIMENT, 3, root / "rollouts"),
        "--rollout-mode=async",
        f"async_training.staleness_threshold={STALENESS}",
        f"algorithm.rollout_correction.rollout_is_threshold={IS_THRESHOLD}",
        "trainer.test_freq=-1",  # no validation: its 16 trajectories cost more than a step
    ]
    exp_dir = layout.experiment_dir("dapo", EXPERIMENT)
    killer = KillAfterCheckpoint(exp_dir / "latest_checkpointed_iteration.txt", 1, timeout_s=1200,
                                 metrics_dir=run_metrics.metrics_dir(exp_dir))  # fmt: skip
    url = local_endpoint + "/run_code"
    first = run_dapo(layout, CPU, parse("dapo", args), sandbox_url=url, runner=killer)
    relaunched_at = time.time()
    second = run_dapo(layout, CPU, parse("dapo", args), sandbox_url=url, runner=killer)
    rows = pd.read_parquet(tool_sft.files["rl_train"])
    return PreemptedAsyncRun(layout, rows, first, second, killer.outputs, relaunched_at)


def test_async_trainer_steps_sync_weights_and_finishes(async_run: PreemptedAsyncRun) -> None:
    """verl's fully-async trainer logs one row per weight version (the rollouter's timings at each
    sync) and its aggregated training metrics when a sync cycle ends."""
    run = async_run
    assert run.second.returncode == 0, run.logs[-1][-3000:]
    assert run.second.checkpoint is not None and run.second.checkpoint.step == 3
    assert all((run.exp_dir / f"global_step_{v}").is_dir() for v in (1, 2, 3))
    metrics = run.metrics()
    assert sorted(metrics) == [0, 1, 2, 3]  # weight versions 0 (start) to 3
    trained = [data for data in metrics.values() if "actor/grad_norm" in data]
    assert trained, sorted(metrics[3])
    assert all(data["actor/grad_norm"] >= 0 for data in trained)
    assert any(data["actor/grad_norm"] > 0 for data in trained)
    assert any(data["critic/advantages/max"] > 0 for data in trained)
    assert read_checkpoint_info(run.layout, "dapo", EXPERIMENT).step == 3


def rows_with(metrics: dict[int, dict], key: str) -> list[dict]:
    found = [data for data in metrics.values() if key in data]
    assert found, f"no row logged {key}"
    return found


def test_staleness_stays_within_the_bound(async_run: PreemptedAsyncRun) -> None:
    """The rollouter pauses once it has produced (1 + threshold) x a version's samples: its own
    count never passes that, and with partial rollouts off no trajectory spans two versions."""
    for data in rows_with(async_run.metrics(), "fully_async/count/staleness_samples"):
        assert data["fully_async/static/staleness_threshold"] == STALENESS
        assert (
            data["fully_async/count/staleness_samples"]
            <= data["fully_async/static/max_required_samples"]
        )
        assert data["fully_async/partial/max_partial_span"] == 0


def test_importance_weights_are_logged_and_truncated(async_run: PreemptedAsyncRun) -> None:
    for data in rows_with(async_run.metrics(), "rollout_corr/rollout_is_mean"):
        assert 0 < data["rollout_corr/rollout_is_mean"] <= IS_THRESHOLD
        assert data["rollout_corr/rollout_is_max"] <= IS_THRESHOLD
        assert data["rollout_corr/rollout_is_min"] >= 0


def test_rollouts_execute_tool_calls(async_run: PreemptedAsyncRun) -> None:
    """The async rollouter runs verl's tool agent loop: the model's calls reach the sandbox and
    each tool response is the value of the expression the model wrote."""
    outputs = [row["output"] for step in async_run.dump_steps() for row in async_run.dumped(step)]
    calls = [m for text in outputs for m in sync_ppo._ARITHMETIC_CALL.findall(text)]
    assert len(calls) >= len(outputs) // 4, (len(calls), len(outputs), outputs[:3])
    for expression, response in calls:
        assert response == str(sync_ppo._value(expression)), (expression, response)


def test_kill_and_resume_loses_the_queued_samples_and_nothing_else(
    async_run: PreemptedAsyncRun,
) -> None:
    """verl saves the rollouter's dataloader position, which runs ahead of training by what is
    queued or in flight (verl PR #4199): after a relaunch those prompts are never trained. What
    survives: the weights and version (the relaunch goes on from version 1, not 0), the logged
    metrics, and the position (the relaunch trains from there; no prompt of the epoch trains
    twice)."""
    run = async_run
    assert run.first.returncode == -9 and run.first.checkpoint.step == 1
    attempts = sorted(run_metrics.metrics_dir(run.exp_dir).glob("*.jsonl"))
    logged = [[json.loads(line)["step"] for line in a.read_text().splitlines()] for a in attempts]
    assert len(logged) == 2 and max(logged[0]) == 1
    assert min(logged[1]) >= 1 and max(logged[1]) == 3
    questions = list(run.rows["prompt"].map(lambda p: p[-1]["content"]))

    def trained(step: int) -> set[int]:
        inputs = [row["input"] for row in run.dumped(step)]
        return {i for i, q in enumerate(questions) if any(q in text for text in inputs)}

    state = torch.load(run.exp_dir / "global_step_1/data.pt", weights_only=False)
    drawn = state["_sampler_iter_state"]["samples_yielded"]
    killed, relaunched = run.dump_steps(relaunched=False), run.dump_steps(relaunched=True)
    assert killed and relaunched, run.dump_steps()
    # the step checkpoint 1 holds (steps the killed attempt trained after it died with it)
    before = trained(killed[0])
    after = trained(relaunched[0])  # the relaunch's first step, still in the first epoch
    lost = set(range(drawn)) - before
    assert lost, (drawn, before)  # drawn before the checkpoint, queued, never trained
    assert after and min(after) >= drawn  # the relaunch goes on from the saved position
    assert not lost & after and not before & after
