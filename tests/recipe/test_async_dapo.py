"""``--rollout-mode=async``: verl's fully-async trainer composed from the same arguments as sync
DAPO, validated against verl's own ``fully_async_ppo_trainer`` config."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recipe.retool.core.paths import Layout
from recipe.retool.core.request import LaunchError, parse
from recipe.retool.core.topology import Topology
from recipe.retool.launch import async_plan as async_dapo
from recipe.retool.launch.check import main
from recipe.retool.local import checkpoint_engine_cpu
from recipe.retool.stages.dapo import run_dapo
from tests.cli import assert_one_line_error, run_module

LAYOUT = Layout.modal()
MODEL = Path("/models/sft/global_step_372/huggingface")
ASYNC = "--rollout-mode=async"


def plan(gpus: int, *args: str, nnodes: int = 1, device: str = "cuda") -> async_dapo.DapoPlan:
    topo = Topology(gpus_per_node=gpus, nnodes=nnodes, device=device)
    return async_dapo.plan_dapo(LAYOUT, "rl", MODEL, topo, parse("dapo", args))


def test_async_runs_verls_fully_async_entry_with_the_sync_plugins() -> None:
    """The same tool, reward, reward manager, fused log-probs and varlen attention as sync DAPO;
    only the entry module and what async needs differ."""
    sync, run = plan(8), plan(8, ASYNC)
    assert run.command[run.command.index("-m") + 1] == (
        "verl.experimental.fully_async_policy.fully_async_main"
    )
    cfg = run.composed
    for key in (
        "actor_rollout_ref.rollout.multi_turn.tool_config_path",
        "reward.custom_reward_function.path",
        "reward.reward_manager.module.path",
        "reward.reward_manager.name",
        "actor_rollout_ref.model.external_lib",
        "actor_rollout_ref.model.override_config.attn_implementation",
        "actor_rollout_ref.rollout.n",
        "actor_rollout_ref.actor.clip_ratio_high",
        "reward.reward_kwargs.overlong_buffer_cfg.len",
    ):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(sync.composed, key)
    assert cfg.actor_rollout_ref.hybrid_engine is False
    assert cfg.data.train_batch_size == 0 and cfg.data.gen_batch_size == 1
    assert not any(o.startswith(async_dapo.SYNC_ONLY_PREFIX) for o in run.overrides)


@pytest.mark.parametrize(
    ("gpus", "args", "rollout", "trainer", "tp", "sp"),
    [
        (8, (), 4, 4, 4, 4),
        (2, (), 1, 1, 1, 1),
        (8, ("--rollout-gpus=6",), 6, 2, 2, 2),
        (6, ("--rollout-gpus", "4"), 4, 2, 4, 2),
    ],
)
def test_gpu_split_follows_gpus_and_can_be_overridden(gpus, args, rollout, trainer, tp, sp) -> None:
    cfg = plan(gpus, ASYNC, *args).composed
    assert (cfg.rollout.n_gpus_per_node, cfg.trainer.n_gpus_per_node) == (rollout, trainer)
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == tp
    assert cfg.actor_rollout_ref.actor.ulysses_sequence_parallel_size == sp


def test_sync_batch_and_steps_become_the_sync_interval_and_rollout_budget() -> None:
    """Batch 64 of mini-batches 16 = 4 optimizer steps between weight syncs, as in one sync step;
    50 steps = 50 x 64 prompts for the rollouter."""
    cfg = plan(8, ASYNC, "trainer.total_training_steps=50").composed
    assert cfg.async_training.trigger_parameter_sync_step == 4
    assert cfg.async_training.require_batches == 1
    assert cfg.rollout.total_rollout_steps == 50 * 64
    assert plan(8, ASYNC).composed.rollout.total_rollout_steps is None  # the epochs decide
    small = plan(
        4, ASYNC, "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=4"
    )
    assert small.composed.async_training.trigger_parameter_sync_step == 2
    explicit = plan(8, ASYNC, "async_training.trigger_parameter_sync_step=1")
    assert explicit.composed.async_training.trigger_parameter_sync_step == 1  # the user's wins


def test_staleness_partial_rollouts_and_is_correction_by_verls_names() -> None:
    cfg = plan(8, ASYNC, "async_training.staleness_threshold=0.25").composed
    assert cfg.async_training.staleness_threshold == 0.25
    assert cfg.async_training.partial_rollout is True
    correction = cfg.algorithm.rollout_correction
    assert (correction.rollout_is, correction.rollout_is_threshold) == ("token", 2.0)
    assert correction.bypass_mode is False  # decoupled: the weights enter the loss
    assert cfg.actor_rollout_ref.rollout.checkpoint_engine.backend == "nccl"
    assert cfg.ray_kwargs.ray_init.num_cpus == async_dapo.ASYNC_RAY_CPUS
    assert cfg.algorithm.filter_groups.enable is False


def test_launch_output_says_what_async_changes(capsys) -> None:
    assert main(["check", "dapo", "--gpus", "8", ASYNC]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert "4 rollout + 4 trainer GPUs per node" in notes[0]
    assert "every 4 trainer steps of 16 prompts (nccl)" in notes[0]
    assert "staleness_threshold=0.5" in notes[1] and "partial_rollout=true" in notes[1]
    assert "truncated IS per token, threshold 2.0" in notes[2]
    assert notes[3].startswith("note: dynamic sampling: off")
    assert "fully_async_main" in out and "ok: " in out


def test_sync_is_the_default_and_unchanged() -> None:
    sync = plan(8)
    assert (
        sync.notes == [] and sync.command[sync.command.index("-m") + 1] == "verl.trainer.main_ppo"
    )
    assert sync.composed.algorithm.filter_groups.enable is True


def test_cpu_async_swaps_nccl_and_partial_rollouts_for_cpu_counterparts() -> None:
    run = plan(2, ASYNC, device="cpu")
    assert run.command[run.command.index("-m") + 1] == async_dapo.CPU_ENTRY_MODULE
    engine = run.composed.actor_rollout_ref.rollout.checkpoint_engine
    assert engine.backend == checkpoint_engine_cpu.BACKEND
    assert engine.custom_backend_module == checkpoint_engine_cpu.__name__
    assert run.composed.async_training.partial_rollout is False
    assert run.composed.actor_rollout_ref.rollout.name == "hf_cpu"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "1", ASYNC], "--rollout-mode=async needs at least 2 GPUs per node"),
        (["--gpus", "4", ASYNC, "--rollout-gpus=4"], "--rollout-gpus=4: choose 1 to 3"),
        (["--gpus", "4", ASYNC, "--rollout-gpus=two"], "--rollout-gpus=two: expected a GPU count"),
        (["--gpus", "4", "--rollout-mode=fast"], "--rollout-mode=fast: choose sync or async"),
        (["--gpus", "8", ASYNC, "data.train_batch_size=24"],
         "data.train_batch_size=24 must be a positive multiple of ppo_mini_batch_size=16"),
        (["--gpus", "8", ASYNC, "async_training.staleness_thresold=1"],
         "did you mean async_training.staleness_threshold"),
    ],
)  # fmt: skip
def test_async_mistakes_are_one_line(args: list[str], message: str) -> None:
    assert_one_line_error(run_module("recipe.retool.launch", "check", "dapo", *args), message)


def test_explicit_tp_that_does_not_fit_the_rollout_side_is_refused() -> None:
    with pytest.raises(LaunchError, match="rollout TP 8 does not divide the 4 rollout GPUs"):
        plan(8, ASYNC, "actor_rollout_ref.rollout.tensor_model_parallel_size=8")


def test_train_dapo_launches_the_async_trainer_with_the_sandbox(tmp_path: Path, capsys) -> None:
    """``make dapo ARGS="--rollout-mode=async"``: run_dapo, as train_dapo calls it, prints what
    async changes and runs verl's fully-async entry with the tool pointed at the sandbox."""
    from tests.recipe.test_paths import make_step, mark_tracked
    from tests.recipe.test_stages import FakeRunner

    layout = Layout.local(tmp_path)
    make_step(layout, "sft", "s1", 62)
    mark_tracked(layout, "sft", "s1", 62)
    runner = FakeRunner(layout, "dapo")
    args = ["--experiment-name=d", ASYNC, "--rollout-gpus=2"]
    result = run_dapo(layout, Topology(gpus_per_node=4), parse("dapo", args), sandbox_url="http://sb",
                             runner=runner)  # fmt: skip
    command = runner.commands[0]
    assert command[command.index("-m") + 1].endswith("fully_async_policy.fully_async_main")
    assert {"rollout.n_gpus_per_node=2", "trainer.n_gpus_per_node=2"} <= set(command)
    assert runner.envs[0]["SANDBOX_FUSION_ENDPOINT"] == "http://sb"
    assert "dynamic sampling: off" in capsys.readouterr().out
    assert result.returncode == 0
