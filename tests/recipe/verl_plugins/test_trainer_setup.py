"""The trainer plugins reach every process verl trains in: SFT's launcher and DAPO's Ray workers."""

from __future__ import annotations

from pathlib import Path

from recipe.retool import launch
from recipe.retool.paths import Layout

HOOK = "recipe.retool.verl_plugins.trainer_setup.install"


def test_sft_launches_through_it_and_dapo_workers_run_its_install() -> None:
    gpu = launch.Topology(gpus_per_node=1)
    sft = launch.sft_command(launch.sft_overrides(Layout.modal(), "e", Path("/m"), gpu), gpu)
    assert sft[sft.index("-m", 3) + 1] == "recipe.retool.verl_plugins.trainer_setup"
    cfg = launch.validate("dapo", launch.dapo_overrides(Layout.modal(), "e", Path("/m"), gpu), gpu)
    assert cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook == HOOK


def test_ray_workers_run_the_setup_hook_dapo_configures() -> None:
    """The hook string in dapo.yaml is what Ray imports and calls in each worker process: after it,
    verl's log-prob fallback is the fused one and transformers knows the varlen attention."""
    import ray

    repo = str(Path(__file__).resolve().parents[3])
    env = {"worker_process_setup_hook": HOOK, "env_vars": {"PYTHONPATH": repo}}
    ray.init(num_cpus=1, include_dashboard=False, runtime_env=env)
    try:

        @ray.remote
        def installed() -> tuple[str, bool]:
            from transformers import AttentionInterface
            from verl.utils import torch_functional as tf

            from recipe.retool.verl_plugins.varlen_attention import NAME

            return tf.logprobs_from_logits_v2.__qualname__, NAME in AttentionInterface()

        assert ray.get(installed.remote(), timeout=120) == ("chunked_logprobs", True)
    finally:
        ray.shutdown()
