"""verl's real DAPO trainer loop on CPU (``local/cpu_ppo.py`` + ``local/rollout_replica_cpu.py``).

Every run starts from one SFT of the tiny model on synthetic tool traces (:func:`tool_sft`), so
its rollouts write tool calls that the sandbox executes inside main_ppo.

One experiment serves every test here, run the way a preempted Modal job runs: ``main_ppo`` is
SIGKILLed (its whole process tree, Ray included) right after step 1's checkpoint, then launched
again with the same experiment name and runs steps 2 and 3. Each step is the production DAPO
config with sizes scaled down: multi-turn tool rollouts through the hf_cpu replica with the
sandbox serving the tool, the ReTool reward manager, bounded dynamic sampling, GRPO, an FSDP2
actor update, the weight sync into the rollout, and a checkpoint with HF weights. A second
experiment runs one step on a two-node Ray cluster on localhost, started by ``join_ray_cluster``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from recipe.retool import stages
from recipe.retool.core.constants import RAY_TOKEN_ENV
from recipe.retool.core.paths import Layout, read_checkpoint_info
from recipe.retool.core.request import parse
from recipe.retool.core.topology import Topology
from recipe.retool.data.synthetic import SyntheticSizes, write_dataset
from recipe.retool.launch.commands import ray_address
from recipe.retool.records import run_metrics
from recipe.retool.stages.dapo import dapo_env, run_dapo
from recipe.retool.stages.ray_cluster import RAY_CLUSTER_ENV, join_ray_cluster
from recipe.retool.stages.record import StageResult
from recipe.retool.stages.sft import run_sft
from tests.recipe.test_stages import KillAfterCheckpoint

# The first test's setup is an SFT and two main_ppo launches (~2.5 min on 2 idle cores; more
# than the suite's 300 s default when other jobs share the cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
CPU = Topology(gpus_per_node=1, device="cpu")
EXPERIMENT = "cpu-dapo"


@dataclass(frozen=True)
class PreemptedRun:
    layout: Layout
    rows: pd.DataFrame  # the RL training rows, in dataloader order (no shuffle)
    first: StageResult
    info_after_kill: object
    second: StageResult
    logs: list[str]
    sft_weights: Path

    @property
    def exp_dir(self) -> Path:
        return self.layout.experiment_dir("dapo", EXPERIMENT)

    def metrics(self) -> dict[int, dict]:
        return dict(run_metrics.read_run(self.exp_dir))


@dataclass(frozen=True)
class ToolSft:
    """The synthetic data and the SFT checkpoint every DAPO run here starts from."""

    files: dict[str, Path]
    weights: Path  # the SFT checkpoint's HF directory


@pytest.fixture(scope="module")
def tool_sft(tmp_path_factory, tiny_model_dir: Path) -> ToolSft:
    """The tiny model learns the ReTool turn shape from one short family of synthetic traces:
    128 steps of 16 at a high learning rate (measured, first turns sampled at T=1 that are a
    valid code_interpreter call: none after 32 steps, ~60 % after 96, ~85-95 % after 128 to 256;
    docs/benchmarks.md, "DAPO on CPU with tool calls"). It rarely gets the digits right,
    so rollouts that call the tool, answer, or run long score differently and GRPO gets
    advantages; the tool calls are what the sandbox must execute inside main_ppo."""
    root = tmp_path_factory.mktemp("tool-sft")
    files = write_dataset(
        root / "synthetic", SyntheticSizes(sft=512, rl_train=8, rl_val=2), families=("product",)
    )
    sft = run_sft(Layout.local(root), CPU, parse("sft", [
        "--experiment-name=warm", f"data.train_files={files['sft']}", "data.max_length=512",
        "data.train_batch_size=16", "data.micro_batch_size_per_gpu=16", "trainer.total_epochs=4",
        "optim.lr=1e-2", "trainer.save_freq=-1", "trainer.logger=[console]",
    ]), model_path=tiny_model_dir)  # fmt: skip
    assert sft.returncode == 0
    return ToolSft(files, sft.checkpoint.hf_dir)


def dapo_args(sft: ToolSft, experiment: str, steps: int, rollouts: Path) -> list[str]:
    """The production DAPO config with sizes for a CPU (2 prompts x 4 rollouts a step) and
    overlong shaping over the whole response, too weak to outweigh the reward for a call."""
    return [
        f"--experiment-name={experiment}",
        f"--sft-checkpoint={sft.weights}",
        f"data.train_files={sft.files['rl_train']}",
        f"data.val_files=[{sft.files['rl_val']}]",
        "data.shuffle=false",  # which rows a step trains on shows the dataloader's position
        "data.train_batch_size=2",
        "data.max_prompt_length=512",
        "data.max_response_length=96",  # a call, its output and a boxed answer: ~80 tokens
        # 4 a group: rollouts with the same turns often have the same length, and with 2 a
        # group every group of a step sometimes scores alike (no advantage, no gradient).
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.optim.lr=1e-3",  # updates large enough to see in log-probs
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=3",
        "reward.reward_kwargs.max_resp_len=96",
        # The whole response is the overlong buffer: every token costs a little, so rollouts of
        # different lengths score differently and every group has advantages, even when all of
        # them call the tool and all answers are wrong. At most 0.05 in all, less than the 0.1
        # ReTool adds to a wrong answer for a call: a call's tool response makes it longer, and
        # at the production factor of 1.0 the ~30 tokens of it outweighed that bonus, so GRPO
        # taught the policy to stop calling the tool within these 3 steps (validation logged 0.0
        # calls per trajectory for 2 of 4 rollout seeds; 1.0 for all 4 at 0.05).
        "reward.reward_kwargs.overlong_buffer_cfg.len=96",
        "reward.reward_kwargs.overlong_buffer_cfg.penalty_factor=0.05",
        "algorithm.filter_groups.max_num_gen_batches=1",  # one batch a step, no refills
        f"trainer.total_training_steps={steps}",
        "trainer.total_epochs=100",
        "trainer.save_freq=1",
        f"trainer.test_freq={steps}",  # the last step validates: verl's tool-call metrics
        "trainer.val_before_train=false",
        # 2 problems x 8: validation's tool calls per trajectory, measured on 16 trajectories
        "actor_rollout_ref.rollout.val_kwargs.n=8",
        "trainer.logger=[console,file]",
        f"trainer.rollout_data_dir={rollouts}",
    ]


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory, tool_sft: ToolSft, local_endpoint: str) -> PreemptedRun:
    root = tmp_path_factory.mktemp("cpu-ppo")
    layout = Layout.local(root)
    args = dapo_args(tool_sft, EXPERIMENT, 3, root / "rollouts")
    exp_dir = layout.experiment_dir("dapo", EXPERIMENT)
    killer = KillAfterCheckpoint(exp_dir / "latest_checkpointed_iteration.txt", 1, timeout_s=900,
                                 metrics_dir=run_metrics.metrics_dir(exp_dir))  # fmt: skip
    url = local_endpoint + "/run_code"
    first = run_dapo(layout, CPU, parse("dapo", args), sandbox_url=url, runner=killer)
    info_after_kill = read_checkpoint_info(layout, "dapo", EXPERIMENT)
    second = run_dapo(layout, CPU, parse("dapo", args), sandbox_url=url, runner=killer)
    return PreemptedRun(
        layout, pd.read_parquet(tool_sft.files["rl_train"]), first, info_after_kill, second,
        killer.outputs, tool_sft.weights,
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


# A call whose code prints a sum of products (the family the SFT taught, digits as the model
# wrote them) and the tool response main_ppo put after it.
_ARITHMETIC_CALL = re.compile(
    r'<tool_call>\n\{"name": "code_interpreter", "arguments": \{"code": "print\(([\d *+]+)\)"\}\}'
    r"\n</tool_call>(?:(?!<tool_call>).)*?<tool_response>\n(.*?)\n</tool_response>",
    re.DOTALL,
)


def _value(expression: str) -> int:
    """The value of a sum of products of integers, e.g. ``49 *  3 + 17``."""
    return sum(math.prod(int(f) for f in term.split("*")) for term in expression.split("+"))


def test_rollouts_call_the_tool_and_the_sandbox_runs_the_code(preempted_run: PreemptedRun) -> None:
    """main_ppo's rollouts write tool calls, verl's agent loop hands them to the sandbox, and the
    sandbox's output is what comes back: each response holds the value of the expression the
    model wrote (no model writes the value of its own random digits). verl counts the calls too:
    turns beyond prompt + answer in training, ``tool_calls`` in the last step's validation."""
    run = preempted_run
    dumps = sorted((run.layout.data.parent / "rollouts").glob("*.jsonl"))
    outputs = [json.loads(line)["output"] for d in dumps for line in d.read_text().splitlines()]
    calls = [m for text in outputs for m in _ARITHMETIC_CALL.findall(text)]
    assert len(calls) >= len(outputs) // 4, (len(calls), len(outputs), outputs[:3])
    for expression, response in calls:
        assert response == str(_value(expression)), (expression, response)
    metrics = run.metrics()
    assert all(metrics[step]["training/num_turns/max"] >= 4 for step in metrics)
    summary = run_metrics.summarize(run_metrics.read_run(run.exp_dir))
    assert summary.val_steps == [3] and summary.val_tool_calls[0] > 0, summary


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


# ---- Two Ray nodes on one machine ------------------------------------------------------------


class CapturingRunner:
    """``run_subprocess`` that keeps what every command printed, in one log."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def __call__(self, command: Sequence[str], env: dict[str, str]) -> int:
        merged = {**os.environ, **env, "PYTHONPATH": str(Path(stages.__file__).parents[3])}
        with self.log.open("a") as out:
            return subprocess.run(
                list(command), env=merged, stdout=out, stderr=subprocess.STDOUT, check=False
            ).returncode


_NODES_PROBE = (
    "import json, ray; ray.init(); "
    "print(json.dumps([[n['Alive'], n['Resources'].get('GPU', 0)] for n in ray.nodes()]))"
)


def _driver(probe: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A Ray driver connecting to the cluster at ``RAY_ADDRESS`` with ``env``'s token."""
    return subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


@dataclass(frozen=True)
class TwoNodeRun:
    layout: Layout
    result: StageResult
    nodes: list[list]  # [alive, logical GPUs] of each Ray node, from the head
    wrong_token: subprocess.CompletedProcess  # a driver that sent another token
    printed: str  # everything `ray start` and main_ppo printed
    token: str
    home: Path
    ray_files_with_token: list[Path]


def _stop_cluster(ray_tmp: Path) -> None:
    """Kill this test's Ray processes only: those whose command line names its temp dir."""
    for proc in psutil.process_iter(["cmdline"]):
        if str(ray_tmp) in " ".join(proc.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, tool_sft: ToolSft, local_endpoint: str) -> TwoNodeRun:
    """A Ray head and one worker started by ``join_ray_cluster`` on localhost, each declaring one
    logical GPU, then one DAPO step of main_ppo on that cluster (world size 2: one actor rank on
    each node). HOME is empty, so no ``~/.ray/auth_token`` exists to share: the nodes and the
    driver authenticate only with the ``RAY_AUTH_TOKEN`` every node is given, as on Modal."""
    root = tmp_path_factory.mktemp("two-nodes")
    layout = Layout.local(root)
    home = root / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # Ray's socket paths must be short
    token = secrets.token_hex(32)
    env = dapo_env(local_endpoint + "/run_code")
    runner = CapturingRunner(root / "printed.log")

    def node(rank: int) -> Topology:
        return Topology(gpus_per_node=1, nnodes=2, node_rank=rank, device="cpu")

    address = {"RAY_ADDRESS": ray_address(node(0)), **RAY_CLUSTER_ENV}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        patch.setenv("RAY_TMPDIR", str(ray_tmp))
        patch.setenv(RAY_TOKEN_ENV, token)
        worker = threading.Thread(
            target=join_ray_cluster, args=(node(1), env),
            kwargs={"runner": runner, "poll_s": 1, "timeout_s": 300}, daemon=True,
        )  # fmt: skip
        try:
            worker.start()  # retries until the head is up, then serves until the cluster ends
            join_ray_cluster(node(0), env, runner=runner, poll_s=1, timeout_s=300)
            nodes = json.loads(_driver(_NODES_PROBE, address).stdout.splitlines()[-1])
            wrong = _driver("import ray; ray.init()", {**address, "RAY_AUTH_TOKEN": "0" * 64})
            args = dapo_args(tool_sft, "two-nodes", 1, root / "rollouts")
            result = run_dapo(
                layout,
                node(0),
                parse("dapo", args),
                sandbox_url=env["SANDBOX_FUSION_ENDPOINT"],
                runner=runner,
            )
            leaked = [
                p for p in ray_tmp.rglob("*")
                if p.is_file() and token.encode() in p.read_bytes()
            ]  # fmt: skip
        finally:
            _stop_cluster(ray_tmp)
            worker.join(timeout=60)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    printed = runner.log.read_text()
    return TwoNodeRun(layout, result, nodes, wrong, printed, token, home, leaked)


def test_dapo_runs_on_a_two_node_ray_cluster(two_node_run: TwoNodeRun) -> None:
    """Both nodes joined, each with one logical GPU; main_ppo trained with one actor rank per
    node (the checkpoint has both ranks' shards) and its rollouts called the tool."""
    run = two_node_run
    assert run.nodes == [[True, 1.0], [True, 1.0]]
    assert run.result.returncode == 0, run.printed[-3000:]
    assert run.result.checkpoint is not None and run.result.checkpoint.step == 1
    actor = run.result.checkpoint.path / "actor"
    assert {p.name for p in actor.glob("model_world_size_2_rank_*.pt")} == {
        "model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt",
    }  # fmt: skip
    summary = run_metrics.summarize(
        run_metrics.read_run(run.layout.experiment_dir("dapo", "two-nodes"))
    )
    assert summary.train_steps == [1] and summary.val_tool_calls[0] > 0, summary


def test_the_nodes_share_a_token_that_is_never_written_or_printed(two_node_run) -> None:
    """The head refuses a driver with another token, so the worker and main_ppo got in with the
    shared one; Ray wrote no token file for it and nothing printed or logged it."""
    run = two_node_run
    assert run.wrong_token.returncode != 0
    assert "auth" in (run.wrong_token.stderr + run.wrong_token.stdout).lower()
    assert not (run.home / ".ray" / "auth_token").exists()
    assert run.token not in run.printed
    assert run.ray_files_with_token == []
