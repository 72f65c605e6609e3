"""The trainer plugins reach every process verl trains in: SFT's launcher and DAPO's workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from recipe.retool.core.paths import Layout
from recipe.retool.core.topology import Topology
from recipe.retool.launch.commands import dapo_overrides, sft_command, sft_overrides
from recipe.retool.launch.validation import validate

MODULE = "recipe.retool.verl_plugins.install_on_import"
REPO = Path(__file__).resolve().parents[3]


def test_sft_launches_through_it_and_dapo_workers_import_its_installer() -> None:
    """On a GPU, DAPO installs the plugins through verl's model ``external_lib``, never through a
    Ray worker_process_setup_hook: that runs before Ray sets the actor's CUDA_VISIBLE_DEVICES and
    its imports initialise CUDA, so every actor trained on GPU 0 (seen on 2 H200s)."""
    gpu = Topology(gpus_per_node=2)
    sft = sft_command(sft_overrides(Layout.modal(), "e", Path("/m"), gpu), gpu)
    assert sft[sft.index("-m", 3) + 1] == "recipe.retool.verl_plugins.trainer_setup"
    cfg = validate("dapo", dapo_overrides(Layout.modal(), "e", Path("/m"), gpu), gpu)
    assert cfg.actor_rollout_ref.model.external_lib == MODULE
    assert "worker_process_setup_hook" not in cfg.ray_kwargs.ray_init.get("runtime_env", {})


def test_building_verls_model_config_installs_the_plugins(tiny_model_dir: Path) -> None:
    """What a DAPO worker does with dapo.yaml's ``external_lib``: verl's HFModelConfig imports
    it, and after that verl's log-prob fallback is the fused one and transformers knows the varlen
    attention (a fresh interpreter, so nothing was installed before)."""
    code = f"""
import json
from transformers import AttentionInterface
from verl.utils import torch_functional as tf
from verl.workers.config import HFModelConfig
from recipe.retool.verl_plugins.varlen_attention import NAME
before = (tf.logprobs_from_logits_v2.__qualname__, NAME in AttentionInterface())
HFModelConfig(path={str(tiny_model_dir)!r}, external_lib={MODULE!r})
print(json.dumps([before, (tf.logprobs_from_logits_v2.__qualname__, NAME in AttentionInterface())]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (fused_before, varlen_before), after = json.loads(out.stdout.strip().splitlines()[-1])
    assert fused_before != "chunked_logprobs" and varlen_before is False
    assert after == ["chunked_logprobs", True]
