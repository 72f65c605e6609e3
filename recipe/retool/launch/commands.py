"""The SFT / DAPO command lines: ``config/<stage>.yaml`` (verl overrides as data), then the paths
and topology filled in here, then the device's overlay, then the user's overrides, last wins;
the trainer and Ray commands that run them. Knows verl's keys, nothing about Modal."""

from __future__ import annotations

import functools
import math
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from recipe.retool.core.paths import EVAL_SETS, Layout, Stage
from recipe.retool.core.topology import Topology

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


RETOOL_DIR = Path(__file__).resolve().parents[1]


REWARD_FILE = RETOOL_DIR / "verl_plugins" / "reward.py"


REWARD_MANAGER_FILE = RETOOL_DIR / "verl_plugins" / "reward_manager.py"


TOOL_CONFIG_FILE = RETOOL_DIR / "sandbox_fusion_modal_config.yaml"


SAMPLER_FILE = RETOOL_DIR / "verl_plugins" / "dapo_sampler.py"


@dataclass(frozen=True)
class StageConfig:
    verl_config: str
    estimate_hours: float
    overrides: dict[str, Any]


@functools.cache
def load_stage_config(stage: Stage) -> StageConfig:
    raw = yaml.safe_load((CONFIG_DIR / f"{stage}.yaml").read_text())
    return StageConfig(raw["verl_config"], float(raw["estimate_hours"]), dict(raw["overrides"]))


@dataclass(frozen=True)
class CpuOverlay:
    """What a stage changes to run on CPU (``make local-smoke``, CI): device, kernels, workers."""

    overrides: dict[str, Any]
    ray_cpus: int | None = None  # logical CPUs of the stage's Ray (DAPO)


@functools.cache
def load_cpu_overlay(name: str) -> CpuOverlay:
    """``config/<name>_cpu.yaml`` for ``sft``, ``dapo`` or ``dapo_async``: data beside the GPU
    configs, so the launcher needs nothing of the CPU runtime (``local/``) to build a command."""
    raw = yaml.safe_load((CONFIG_DIR / f"{name}_cpu.yaml").read_text())
    return CpuOverlay(dict(raw["overrides"]), raw.get("ray_cpus"))


def format_value(value: Any) -> str:
    """Render a Python value in Hydra's override grammar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./:\-+@~]+", text) and text not in {"true", "false", "null"}:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def to_overrides(mapping: dict[str, Any]) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in mapping.items()]


def attention_implementation() -> str:
    """The attention verl's trainers load on a GPU: torch's varlen flash attention
    (``verl_plugins/varlen_attention.py``), registered in each trainer process by
    ``verl_plugins/trainer_setup.py``.

    verl's FSDP actor asks transformers for ``flash_attention_2`` unless told otherwise, which
    needs the ``flash-attn`` package (no binary wheel for the image's torch); ``sdpa`` has no
    varlen kernel, so verl's packed micro-batches would attend through one quadratic mask.
    """
    from recipe.retool.verl_plugins.varlen_attention import NAME

    return NAME


def scaled_parallelism(configured: int, gpus: int) -> int:
    """The largest size that divides both the configured size (the 8-GPU layout) and ``gpus``:
    TP/SP 4 becomes 2 on 2 GPUs and 1 on one, so ``--gpus N`` needs no hand-written overrides."""
    return math.gcd(int(configured), max(int(gpus), 1))


def sft_overrides(
    layout: Layout,
    experiment: str,
    model_path: Path,
    topo: Topology,
    user_overrides: Iterable[str] = (),
    *,
    train_file: Path | None = None,
) -> list[str]:
    """The full SFT override list: YAML base, then paths and topology, then device, then user."""
    stage = load_stage_config("sft")
    filled = {
        "data.train_files": str(train_file or layout.sft_train_file()),
        "model.path": str(model_path),
        "trainer.experiment_name": experiment,
        "trainer.default_local_dir": str(layout.experiment_dir("sft", experiment)),
        "trainer.n_gpus_per_node": topo.gpus_per_node,
        "trainer.nnodes": topo.nnodes,
        "engine.ulysses_sequence_parallel_size": scaled_parallelism(
            stage.overrides["engine.ulysses_sequence_parallel_size"], topo.world_size
        ),
    }
    if topo.device == "cpu":
        device = to_overrides(load_cpu_overlay("sft").overrides)
    else:
        device = [f"+model.override_config.attn_implementation={attention_implementation()}"]
    return [*to_overrides(stage.overrides), *to_overrides(filled), *device, *user_overrides]


def sft_command(overrides: Sequence[str], topo: Topology) -> list[str]:
    """``torchrun`` for one node of the SFT job (multi-node: static rendezvous on node 0)."""
    # Both run verl's sft_trainer after the trainer plugins (trainer_setup.py); the CPU one first
    # installs its CPU shims.
    module = (
        "recipe.retool.local.cpu_compat"
        if topo.device == "cpu"
        else "recipe.retool.verl_plugins.trainer_setup"
    )
    if topo.nnodes == 1:
        rdzv = ["--standalone"]
    else:
        rdzv = [
            f"--nnodes={topo.nnodes}",
            f"--node_rank={topo.node_rank}",
            f"--master_addr={topo.master_addr}",
            f"--master_port={topo.master_port}",
        ]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    return [*torchrun, *rdzv, f"--nproc_per_node={topo.gpus_per_node}", "-m", module, *overrides]


def dapo_overrides(
    layout: Layout,
    experiment: str,
    model_path: Path,
    topo: Topology,
    user_overrides: Iterable[str] = (),
) -> list[str]:
    """The full DAPO override list: YAML base, then paths and topology, then device, then user.
    The tool reads the sandbox URL from SANDBOX_FUSION_ENDPOINT."""
    stage = load_stage_config("dapo")
    tp_key = "actor_rollout_ref.rollout.tensor_model_parallel_size"
    sp_key = "actor_rollout_ref.actor.ulysses_sequence_parallel_size"
    filled = {
        "data.train_files": str(layout.rl_file("train")),
        "data.val_files": [str(layout.rl_file(name)) for name in EVAL_SETS],
        "actor_rollout_ref.model.path": str(model_path),
        "actor_rollout_ref.rollout.multi_turn.tool_config_path": str(TOOL_CONFIG_FILE),
        "reward.custom_reward_function.path": str(REWARD_FILE),
        "reward.reward_manager.module.path": str(REWARD_MANAGER_FILE),
        "trainer.v1.sampler.custom_sampler.path": str(SAMPLER_FILE),
        "trainer.experiment_name": experiment,
        "trainer.default_local_dir": str(layout.experiment_dir("dapo", experiment)),
        "trainer.n_gpus_per_node": topo.gpus_per_node,
        "trainer.nnodes": topo.nnodes,
        tp_key: scaled_parallelism(stage.overrides[tp_key], topo.gpus_per_node),
        sp_key: scaled_parallelism(stage.overrides[sp_key], topo.world_size),
    }
    if topo.device == "cpu":
        device = _cpu_dapo_overrides(topo)
    else:
        device = [
            f"++actor_rollout_ref.model.override_config.attn_implementation="
            f"{attention_implementation()}"
        ]
    return [*to_overrides(stage.overrides), *to_overrides(filled), *device, *user_overrides]


def _cpu_dapo_overrides(topo: Topology) -> list[str]:
    """``config/dapo_cpu.yaml``, plus on one node the Ray resources main_ppo's own ``ray.init``
    declares: a logical "GPU" per training rank (see ``local/cpu_compat.py``) and the overlay's
    ``ray_cpus``. A multi-node run joins a cluster whose nodes declared theirs
    (:func:`ray_node_command`)."""
    overlay = load_cpu_overlay("dapo")
    overrides = to_overrides(overlay.overrides)
    if topo.nnodes > 1:
        return overrides
    ray_init = [
        f"++ray_kwargs.ray_init.num_gpus={topo.gpus_per_node}",
        f"ray_kwargs.ray_init.num_cpus={overlay.ray_cpus}",
    ]
    return [*overrides, *ray_init]


def dapo_command(overrides: Sequence[str], topo: Topology) -> list[str]:
    """verl's ``main_ppo``; on CPU behind the shims of ``local/cpu_ppo.py``."""
    module = "recipe.retool.local.cpu_ppo" if topo.device == "cpu" else "verl.trainer.main_ppo"
    return [sys.executable, "-m", module, *overrides]


RAY_PORT = 6379


def ray_node_command(topo: Topology) -> list[str]:
    """``ray start`` for one node of a multi-node DAPO job: node 0 is the head, others join it.

    ``main_ppo`` then runs on node 0 only, with ``RAY_ADDRESS`` pointing at the head, and verl
    places its workers across every GPU the cluster reports. On CPU the GPUs are logical (one per
    training rank, ``local/cpu_compat.py``) and each node declares the logical CPUs main_ppo's
    actors reserve (``ray_cpus`` of ``config/dapo_cpu.yaml``), however few cores it has.
    """
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--num-gpus={topo.gpus_per_node}"]
    if topo.device == "cpu":
        ray.append(f"--num-cpus={load_cpu_overlay('dapo').ray_cpus}")
    if topo.node_rank == 0:
        return [*ray, "--head", f"--node-ip-address={topo.master_addr}", f"--port={RAY_PORT}"]
    return [*ray, f"--address={ray_address(topo)}", "--block"]


def ray_address(topo: Topology) -> str:
    """The Ray head's GCS address: node 0's, on :data:`RAY_PORT`."""
    return f"{topo.master_addr}:{RAY_PORT}"


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def override_value(overrides: Sequence[str], key: str) -> str | None:
    """The value the last override of ``key`` sets (the one verl sees), as written."""
    values = [o.split("=", 1)[1] for o in overrides if "=" in o and override_key(o) == key]
    return values[-1] if values else None


def render(command: Sequence[str]) -> str:
    """A copy-pasteable shell line (for logs and dry runs)."""
    return shlex.join(command)
