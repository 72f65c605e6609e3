"""verl's real DAPO trainer loop on CPU (``local/cpu_ppo.py`` + ``local/rollout_replica_cpu.py``).

One experiment serves every test here, run the way a preempted Modal job runs: ``main_ppo`` is
SIGKILLed (its whole process tree, Ray included) right after step 1's checkpoint, then launched
again with the same experiment name and runs steps 2 and 3. Each step is the production DAPO
config with sizes scaled down: multi-turn tool rollouts through the hf_cpu replica with the
sandbox serving the tool, the ReTool reward manager, bounded dynamic sampling, GRPO, an FSDP2
actor update, the weight sync into the rollout, and a checkpoint with HF weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from recipe.retool import run_metrics, stages
from recipe.retool.data.synthetic import SyntheticSizes, write_dataset
from recipe.retool.launch import Topology
from recipe.retool.paths import Layout, read_checkpoint_info
from tests.recipe.test_stages import KillAfterCheckpoint

pytestmark = pytest.mark.slow
CPU = Topology(gpus_per_node=1, device="cpu")
EXPERIMENT = "cpu-dapo"


@dataclass(frozen=True)
class PreemptedRun:
    layout: Layout
    rows: pd.DataFrame  # the RL training rows, in dataloader order (no shuffle)
    first: stages.StageResult
    info_after_kill: object
    second: stages.StageResult
    logs: list[str]
    sft_weights: Path

    @property
    def exp_dir(self) -> Path:
        return self.layout.experiment_dir("dapo", EXPERIMENT)

    def metrics(self) -> dict[int, dict]:
        return dict(run_metrics.read_run(self.exp_dir))


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory, tiny_model_dir: Path, local_endpoint: str) -> PreemptedRun:
    root = tmp_path_factory.mktemp("cpu-ppo")
    layout = Layout.local(root)
    files = write_dataset(root / "synthetic", SyntheticSizes(sft=16, rl_train=8, rl_val=2))
    # A short SFT with a high learning rate: the random model learns to end its turns, so
    # rollouts differ in length, the overlong shaping makes their rewards differ and GRPO has
    # advantages to train on (a model that never stops scores every rollout alike).
    sft = stages.run_sft(layout, CPU, [
        "--experiment-name=warm", f"data.train_files={files['sft']}", "data.max_length=512",
        "data.train_batch_size=4", "data.micro_batch_size_per_gpu=2", "trainer.total_epochs=3",
        "optim.lr=3e-3", "trainer.logger=[console]",
    ], model_path=tiny_model_dir)  # fmt: skip
    assert sft.returncode == 0
    args = [
        f"--experiment-name={EXPERIMENT}",
        "--sft-checkpoint=warm",
        f"data.train_files={files['rl_train']}",
        f"data.val_files=[{files['rl_val']}]",
        "data.shuffle=false",  # which rows a step trains on shows the dataloader's position
        "data.train_batch_size=2",
        "data.max_prompt_length=512",
        "data.max_response_length=48",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.optim.lr=1e-3",  # updates large enough to see in log-probs
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=3",
        "reward.reward_kwargs.max_resp_len=48",
        "reward.reward_kwargs.overlong_buffer_cfg.len=48",
        "algorithm.filter_groups.max_num_gen_batches=1",  # one batch a step, no refills
        "trainer.total_training_steps=3",
        "trainer.total_epochs=100",
        "trainer.save_freq=1",
        "trainer.test_freq=-1",
        "trainer.val_before_train=false",
        "trainer.logger=[console,file]",
        f"trainer.rollout_data_dir={root / 'rollouts'}",
    ]
    exp_dir = layout.experiment_dir("dapo", EXPERIMENT)
    killer = KillAfterCheckpoint(exp_dir / "latest_checkpointed_iteration.txt", 1, timeout_s=900,
                                 metrics_dir=run_metrics.metrics_dir(exp_dir))  # fmt: skip
    url = local_endpoint + "/run_code"
    first = stages.run_dapo(layout, CPU, args, sandbox_url=url, runner=killer)
    info_after_kill = read_checkpoint_info(layout, "dapo", EXPERIMENT)
    second = stages.run_dapo(layout, CPU, args, sandbox_url=url, runner=killer)
    return PreemptedRun(
        layout, pd.read_parquet(files["rl_train"]), first, info_after_kill, second,
        killer.outputs, sft.checkpoint.hf_dir,
    )  # fmt: skip


def test_main_ppo_runs_dapo_steps_and_saves_hf_weights(preempted_run: PreemptedRun) -> None:
    run = preempted_run
    assert run.second.returncode == 0, run.logs[-1][-3000:]
    assert run.second.checkpoint is not None and run.second.checkpoint.step == 3
    model = AutoModelForCausalLM.from_pretrained(run.second.checkpoint.hf_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    metrics = run.metrics()
    assert sorted(metrics) == [1, 2, 3]
    for step, data in metrics.items():
        assert data["training/num_turns/min"] >= 2, step  # prompt + at least one model turn
    # ReTool's reward (-1 + overlong shaping for these answers) and GRPO advantages that differ
    # from zero: the actor had something to learn from and its gradient was not zero.
    scores = [data["critic/score/mean"] for data in metrics.values()]
    assert all(-2.0 <= s <= 1.0 for s in scores), scores
    assert any(data["critic/advantages/max"] > 0 for data in metrics.values())
    assert any(data["actor/grad_norm"] > 0 for data in metrics.values())
    info = read_checkpoint_info(run.layout, "dapo", EXPERIMENT)
    assert info.step == 3 and info.metrics["steps"] == 3
    assert info.metrics["reward_mean"] == pytest.approx(metrics[3]["critic/rewards/mean"])


def _max_logprob_gap(a: Path, b: Path, token_ids: list[int]) -> float:
    """The largest difference between two checkpoints' log-probs of the same tokens."""
    ids = torch.tensor([token_ids])
    out = []
    for path in (a, b):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            out.append(
                torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])
            )
    return float((out[0] - out[1]).abs().max())


def test_actor_updates_reach_the_rollout(preempted_run: PreemptedRun) -> None:
    """verl compares the log-probs the rollout sampled with against the actor's for the same
    tokens (``training/rollout_probs_diff_max``). Step 3's rollout ran after step 2's update in
    the same process: were the update not synced, the gap would be as large as the update's own
    effect on log-probs, which the checkpoints before and after it show."""
    run = preempted_run
    metrics = run.metrics()
    steps = run.exp_dir
    tokens = list(range(3, 200))
    update_effect = _max_logprob_gap(
        steps / "global_step_1/actor/huggingface", steps / "global_step_2/actor/huggingface",
        tokens,
    )  # fmt: skip
    assert update_effect > 1e-3, "step 2's update barely changed the model"
    for step in (1, 2, 3):
        assert metrics[step]["training/rollout_probs_diff_valid"] == 1
        assert metrics[step]["training/rollout_probs_diff_max"] < update_effect / 20, step
    assert _max_logprob_gap(run.sft_weights, steps / "global_step_1/actor/huggingface",
                            tokens) > 1e-3  # fmt: skip


def test_killed_run_resumes_from_its_checkpoint(preempted_run: PreemptedRun) -> None:
    """SIGKILL right after step 1's save; the relaunch goes on at step 2 with the dataloader
    where it was, redoes nothing, and only the clean finish writes checkpoint_info.json."""
    run = preempted_run
    assert run.first.returncode == -9 and run.first.checkpoint.step == 1
    assert run.info_after_kill is None
    attempts = sorted(run_metrics.metrics_dir(run.exp_dir).glob("*.jsonl"))
    assert len(attempts) == 2
    logged = [[json.loads(line)["step"] for line in a.read_text().splitlines()] for a in attempts]
    assert logged == [[1], [2, 3]]  # step 1 kept, not redone
    assert (run.exp_dir / "global_step_1/actor/huggingface/model.safetensors").is_file()
    # The dataloader picks up where step 1's checkpoint left it (rows are not shuffled): step 2
    # trains on rows the killed run had not drawn yet, where a fresh dataloader starts at row 0.
    state = torch.load(run.exp_dir / "global_step_1/data.pt", weights_only=False)
    drawn = state["_sampler_iter_state"]["samples_yielded"]
    assert 0 < drawn < len(run.rows)
    questions = list(run.rows["prompt"].map(lambda p: p[-1]["content"]))
    dumped = (run.layout.data.parent / "rollouts" / "2.jsonl").read_text().splitlines()
    inputs = [json.loads(line)["input"] for line in dumped]
    trained = {i for i, q in enumerate(questions) if any(q in text for text in inputs)}
    assert trained and min(trained) >= drawn, (trained, drawn)
