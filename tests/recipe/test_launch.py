"""Command lines are built by code and composed against verl's real Hydra config."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipe.retool.core.paths import Layout
from recipe.retool.core.request import LaunchError
from recipe.retool.core.topology import Topology
from recipe.retool.launch.check import main
from recipe.retool.launch.commands import (
    dapo_command,
    dapo_overrides,
    format_value,
    load_cpu_overlay,
    load_stage_config,
    ray_node_command,
    sft_command,
    sft_overrides,
)
from recipe.retool.launch.cost import estimate_cost
from recipe.retool.launch.validation import validate
from recipe.retool.verl_plugins import varlen_attention

RAY_CPUS = load_cpu_overlay("dapo").ray_cpus

LAYOUT = Layout.modal()
MODEL = Path("/models/Qwen/Qwen2.5-7B-Instruct")
TOPOLOGIES = {
    "1gpu": Topology(gpus_per_node=1),
    "2gpu": Topology(gpus_per_node=2),
    "8gpu": Topology(gpus_per_node=8),
    "2node": Topology(gpus_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.1"),
}
# The production DAPO layout is TP 4 / SP 4; smaller machines scale both down.
SMALL_DAPO = {
    "1gpu": ["actor_rollout_ref.rollout.tensor_model_parallel_size=1",
             "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1"],
    "2gpu": ["actor_rollout_ref.rollout.tensor_model_parallel_size=2",
             "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"],
}  # fmt: skip


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_sft_command_composes_for_every_topology(name: str) -> None:
    topo = TOPOLOGIES[name]
    overrides = sft_overrides(LAYOUT, "exp", MODEL, topo, ["trainer.total_epochs=5"])
    cfg = validate("sft", overrides, topo)
    assert cfg.trainer.total_epochs == 5  # user override wins over the YAML's 2
    assert cfg.trainer.n_gpus_per_node == topo.gpus_per_node
    assert cfg.trainer.nnodes == topo.nnodes
    assert cfg.data.train_files == "/data/sft/train.parquet"
    assert cfg.trainer.default_local_dir == "/checkpoints/sft-experiments/exp"
    assert "hf_model" in cfg.checkpoint.save_contents
    assert cfg.optim.lr == pytest.approx(1e-5)
    command = sft_command(overrides, topo)
    assert command[command.index("-m", 3) + 1] == "recipe.retool.verl_plugins.trainer_setup"
    assert f"--nproc_per_node={topo.gpus_per_node}" in command
    if topo.nnodes == 1:
        assert "--standalone" in command
    else:
        assert {"--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1"} <= set(command)


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_dapo_command_composes_for_every_topology(name: str) -> None:
    topo = TOPOLOGIES[name]
    extra = SMALL_DAPO.get(name, [])
    overrides = dapo_overrides(LAYOUT, "rl", MODEL, topo, extra)
    cfg = validate("dapo", overrides, topo)
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.actor_rollout_ref.actor.clip_ratio_high == pytest.approx(0.28)
    assert cfg.actor_rollout_ref.rollout.multi_turn.max_assistant_turns == 16
    assert cfg.actor_rollout_ref.rollout.n == 16
    assert cfg.algorithm.filter_groups.enable is True
    assert cfg.reward.reward_kwargs.overlong_buffer_cfg.enable is True
    assert cfg.reward.custom_reward_function.path.endswith("recipe/retool/verl_plugins/reward.py")
    assert list(cfg.data.val_files) == ["/data/rl/aime_2024.parquet", "/data/rl/aime_2025.parquet"]
    assert dapo_command(overrides, topo)[1:3] == ["-m", "verl.trainer.main_ppo"]


@pytest.mark.parametrize("nnodes", [1, 2])
def test_cpu_dapo_runs_main_ppo_behind_the_cpu_shims(nnodes: int) -> None:
    """On CPU: the hf_cpu rollout, the CPU hook in every Ray worker, and Ray resources declared
    by main_ppo itself only where it starts Ray (one node)."""
    topo = Topology(gpus_per_node=1, nnodes=nnodes, device="cpu")
    overrides = dapo_overrides(LAYOUT, "rl", MODEL, topo, ["data.train_batch_size=16"])
    cfg = validate("dapo", overrides, topo)
    assert cfg.actor_rollout_ref.rollout.name == "hf_cpu"
    hook = cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook
    assert hook == "recipe.retool.local.cpu_ppo.install_worker"
    assert (cfg.ray_kwargs.ray_init.get("num_gpus") == 1) == (nnodes == 1)
    assert dapo_command(overrides, topo)[1:3] == ["-m", "recipe.retool.local.cpu_ppo"]


@pytest.mark.parametrize(("gpus", "tp", "sp"), [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 4, 4)])
def test_dapo_layout_follows_the_gpu_count(gpus: int, tp: int, sp: int) -> None:
    topo = Topology(gpus_per_node=gpus)
    cfg = validate("dapo", dapo_overrides(LAYOUT, "rl", MODEL, topo), topo)
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == tp
    assert cfg.actor_rollout_ref.actor.ulysses_sequence_parallel_size == sp


def test_explicit_layout_overrides_win_and_are_still_checked() -> None:
    topo = Topology(gpus_per_node=4)
    tp1 = ["actor_rollout_ref.rollout.tensor_model_parallel_size=1"]
    cfg = validate("dapo", dapo_overrides(LAYOUT, "rl", MODEL, topo, tp1), topo)
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 1
    tp8 = ["actor_rollout_ref.rollout.tensor_model_parallel_size=8"]
    with pytest.raises(LaunchError, match="rollout TP 8 does not divide 4 GPUs"):
        validate("dapo", dapo_overrides(LAYOUT, "rl", MODEL, topo, tp8), topo)


def test_gpu_runs_ask_for_the_varlen_attention_the_trainer_plugins_register() -> None:
    topo = Topology(gpus_per_node=1)
    cfg = validate("dapo", dapo_overrides(LAYOUT, "rl", MODEL, topo), topo)
    assert cfg.actor_rollout_ref.model.override_config.attn_implementation == varlen_attention.NAME
    assert cfg.actor_rollout_ref.model.use_remove_padding  # the packed path the kernel is for
    sft = validate("sft", sft_overrides(LAYOUT, "e", MODEL, topo), topo)
    assert sft.model.override_config.attn_implementation == varlen_attention.NAME
    assert sft.model.use_remove_padding
    cpu = Topology(gpus_per_node=1, device="cpu")  # plain SDPA: no varlen kernel on CPU
    cfg = validate("dapo", dapo_overrides(LAYOUT, "rl", MODEL, cpu), cpu)
    assert cfg.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"


def test_cpu_overlays_are_data_beside_the_stage_configs() -> None:
    """config/<stage>_cpu.yaml: what CPU runs change, composed on top of the stage's config."""
    cpu = Topology(gpus_per_node=1, device="cpu")
    sft = validate("sft", sft_overrides(LAYOUT, "e", MODEL, cpu), cpu)
    assert sft.trainer.device == "cpu" and sft.engine.dtype == "float32"
    assert sft.model.override_config.attn_implementation == "sdpa" and not sft.model.use_liger
    command = sft_command([], cpu)
    assert command[command.index("-m", 3) + 1] == "recipe.retool.local.cpu_compat"
    for name in ("sft", "dapo", "dapo_async"):
        overlay = load_cpu_overlay(name)
        assert overlay.overrides and all(isinstance(k, str) for k in overlay.overrides)
    assert isinstance(RAY_CPUS, int) and RAY_CPUS > 1
    assert load_cpu_overlay("sft").ray_cpus is None


def test_dapo_sampler_is_bounded_by_the_filter_settings() -> None:
    """verl's V1 buffer ignores max_num_gen_batches; ours reads it (one source: algorithm.*)."""
    topo = Topology(gpus_per_node=1)
    extra = ["algorithm.filter_groups.max_num_gen_batches=3"]
    cfg = validate("dapo", dapo_overrides(LAYOUT, "rl", MODEL, topo, extra), topo)
    sampler = cfg.trainer.v1.sampler
    assert sampler.custom_sampler.path.endswith("verl_plugins/dapo_sampler.py")
    assert sampler.custom_sampler.name == "BoundedDAPOReplayBuffer"
    assert dict(sampler.sampler_kwargs) == {
        "enable": True,
        "metric": "acc",
        "max_num_gen_batches": 3,
    }


def test_misspelt_key_names_close_matches() -> None:
    topo = TOPOLOGIES["8gpu"]
    overrides = sft_overrides(LAYOUT, "e", MODEL, topo, ["trainer.total_epoch=5"])
    with pytest.raises(
        LaunchError, match=r"unknown key 'trainer.total_epoch'.*trainer.total_epochs"
    ):
        validate("sft", overrides, topo)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.total_epochs=two", "expected a number"),
        ("model.enable_gradient_checkpointing=maybe", "expected true or false"),
        ("data.train_batch_size=3.5", "expected an integer"),
        ("engine.ulysses_sequence_parallel_size=3", "SP 3 does not divide 8"),
        ("data.train_batch_size=36", "not divisible by the data-parallel size 8"),
    ],
)
def test_bad_values_fail_fast(override: str, message: str) -> None:
    topo = TOPOLOGIES["8gpu"]
    with pytest.raises(LaunchError, match=message):
        validate("sft", sft_overrides(LAYOUT, "e", MODEL, topo, [override]), topo)


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        (True, "true"),
        (None, "null"),
        (1e-5, "1e-05"),
        (16384, "16384"),
        (["model", "hf_model"], "[model,hf_model]"),
        ("/data/x.parquet", "/data/x.parquet"),
        ("a b,c", "'a b,c'"),
        ("true", "'true'"),
        ("it's", "'it\\'s'"),
    ],
)
def test_format_value_speaks_hydra(value, rendered: str) -> None:
    assert format_value(value) == rendered


def test_cost_estimate_names_gpus_price_and_source() -> None:
    line = estimate_cost("sft", TOPOLOGIES["8gpu"])
    assert "8×H100" in line and "$3.95/GPU-h" in line and "May 2026" in line
    assert "12 GPU-h" in line  # 1.5 h × 8 GPUs


def test_every_stage_config_loads_and_names_a_verl_config() -> None:
    for stage in ("sft", "dapo"):
        cfg = load_stage_config(stage)
        assert cfg.verl_config in {"sft_trainer_engine", "ppo_trainer"}
        assert cfg.overrides and cfg.estimate_hours > 0


def test_ray_head_and_workers_for_multinode_dapo() -> None:
    head = ray_node_command(Topology(nnodes=2, node_rank=0, master_addr="10.0.0.5"))
    worker = ray_node_command(Topology(nnodes=2, node_rank=1, master_addr="10.0.0.5"))
    assert "--head" in head and "--node-ip-address=10.0.0.5" in head and "--num-gpus=8" in head
    assert "--address=10.0.0.5:6379" in worker and "--block" in worker
    assert head[1:4] == ["-m", "ray.scripts.scripts", "start"]
    assert not any(arg.startswith("--num-cpus") for arg in head + worker)  # Ray counts the cores
    # On CPU every node declares the logical CPUs main_ppo's actors reserve, beyond its cores.
    cpu_node = ray_node_command(Topology(gpus_per_node=1, nnodes=2, device="cpu"))
    assert "--num-gpus=1" in cpu_node and f"--num-cpus={RAY_CPUS}" in cpu_node


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("actor_rollout_ref.actor.use_dynamic_bsz=False", "ppo_micro_batch_size"),
        ("actor_rollout_ref.actor.loss_agg_mode=bogus", "Invalid loss_agg_mode: bogus"),
    ],
)
def test_dapo_runs_verls_own_config_checks_before_launch(override: str, message: str) -> None:
    topo = TOPOLOGIES["8gpu"]
    overrides = dapo_overrides(LAYOUT, "rl", MODEL, topo, [override])
    with pytest.raises(LaunchError, match=f"verl rejects it: .*{message}"):
        validate("dapo", overrides, topo)


def test_dapo_checkpoints_carry_hf_weights_and_are_bounded() -> None:
    """Without hf_model verl writes actor/huggingface with config only: never 'complete'."""
    topo = TOPOLOGIES["8gpu"]
    cfg = validate("dapo", dapo_overrides(LAYOUT, "rl", MODEL, topo), topo)
    assert "hf_model" in cfg.actor_rollout_ref.actor.checkpoint.save_contents
    assert cfg.trainer.max_actor_ckpt_to_keep == 3
    tool_cap = 4096  # output_cap_chars in sandbox_fusion_modal_config.yaml
    assert cfg.actor_rollout_ref.rollout.multi_turn.max_tool_response_length > tool_cap


def test_words_verl_accepts_for_numbers_pass_and_typos_in_numbers_do_not_crash() -> None:
    topo = TOPOLOGIES["8gpu"]
    cfg = validate("sft", sft_overrides(LAYOUT, "e", MODEL, topo), topo)
    assert cfg.trainer.save_freq == "after_each_epoch"
    bad = sft_overrides(LAYOUT, "e", MODEL, topo, ["data.train_batch_size=two"])
    with pytest.raises(LaunchError, match=r"data\.train_batch_size='two': expected a number"):
        validate("sft", bad, topo)


def test_cost_line_without_a_price_says_so() -> None:
    line = estimate_cost("sft", Topology(gpus_per_node=8, gpu_type="A100"))
    assert line.endswith("(no price on file for A100)") and "$None" not in line


def test_check_cli_is_the_dry_run_make_runs_before_modal(capsys) -> None:
    assert (
        main(["check", "sft", "--gpus", "2", "--", "--experiment-name=x", "trainer.total_epochs=3"])
        == 0
    )
    out = capsys.readouterr().out
    assert "recipe.retool.verl_plugins.trainer_setup" in out and "trainer.total_epochs=3" in out
    assert "on 2×H100" in out
    assert main(["check", "dapo", "--gpus", "4", "--", "trainer.totl=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'trainer.totl'") and "Traceback" not in err


@pytest.mark.parametrize(
    ("stage", "overrides", "warned"),
    [
        ("sft", ["data.micro_batch_size_per_gpu=2"], ["data.micro_batch_size_per_gpu"]),
        ("sft", ["data.use_dynamic_bsz=false", "data.micro_batch_size_per_gpu=2"], []),
        ("sft", ["data.use_dynamic_bsz=false", "data.max_token_len_per_gpu=99"],
         ["data.max_token_len_per_gpu"]),
        ("dapo", ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"],
         ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"]),
        ("dapo", ["trainer.total_epochs=2"], []),
    ],
)  # fmt: skip
def test_check_warns_about_overrides_verl_does_not_read(stage, overrides, warned, capsys) -> None:
    assert main(["check", stage, "--gpus", "8", *overrides]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert [line.split()[1] for line in lines] == warned
    assert all("has no effect while" in line for line in lines)


def test_check_dapo_says_its_start_is_checked_at_launch_where_the_volume_is_not_mounted(
    capsys, tmp_path, monkeypatch
) -> None:
    assert main(["check", "dapo", "--", "--sft-checkpoint=/nonexistent/path"]) == 0
    out = capsys.readouterr().out
    assert "ok: " not in out.splitlines()[-1]  # the cost line stays last
    assert (
        "note: DAPO's start (--sft-checkpoint=/nonexistent/path) is checked at launch: "
        "/checkpoints (the checkpoints volume) is not mounted here"
    ) in out
    # where the volume is mounted (in a container), check checks it
    monkeypatch.setattr(Layout, "modal", classmethod(lambda cls: cls.local(tmp_path)))
    (tmp_path / "checkpoints").mkdir()
    assert main(["check", "dapo", "--", "--sft-checkpoint=/nonexistent/path"]) == 2
    assert capsys.readouterr().err == "error: no checkpoint directory at /nonexistent/path\n"
