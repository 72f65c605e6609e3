"""DAPO at the production layout scaled to the GPUs at hand, with a model of Qwen2.5-1.5B's shape.

``run_dapo`` → verl ``main_ppo`` with ``config/dapo.yaml`` as Modal runs it: vLLM rollouts
with tensor parallelism and the actor's Ulysses SP scaled from ``--gpus`` by
``launch/commands.py`` (2 GPUs: TP 2, SP 2), FSDP parameter and optimizer offload as configured,
the response length, group size and tool settings of the YAML. Only the batch scales with the
GPUs (8 prompts a GPU, 64 on 8) and three things a random model forces are changed (see
:func:`bench_request`). No weights are needed:
the model is random-init from Qwen2.5-1.5B's transformer body (``qwen_shapes.py``), with the
vocabulary of the offline tokenizer (``data/tiny_model.py``) so every sampled id decodes.

    python scripts/bench_dapo_gpu.py prepare --root /tmp/dapo-bench
    python scripts/bench_dapo_gpu.py run --root /tmp/dapo-bench --gpus 2 --steps 3 --out row.json

The row (``docs/gpu-runs/``) gives where a step's time went (verl's ``timing_s/*``), tokens/s,
and peak memory: per GPU as nvidia-smi saw it (vLLM's KV cache and the actor are different
processes) and the actor's own peak from verl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qwen_shapes import QWEN25_1_5B, model_params

from recipe.retool.core.paths import Layout
from recipe.retool.core.request import ROLLOUT_MODES, LaunchRequest
from recipe.retool.core.topology import Topology
from recipe.retool.data.synthetic import SyntheticSizes, write_dataset
from recipe.retool.data.tiny_model import TinySpec, build
from recipe.retool.launch.async_plan import plan_dapo
from recipe.retool.records import run_metrics
from recipe.retool.stages.dapo import run_dapo
from sandbox.local import run_code_url

EXPERIMENT = "bench"
PROMPTS_PER_GPU = 8  # dapo.yaml's batch of 64 prompts on 8 GPUs
MODEL_SPEC = TinySpec(
    hidden_size=QWEN25_1_5B["hidden_size"],
    intermediate_size=QWEN25_1_5B["intermediate_size"],
    num_hidden_layers=QWEN25_1_5B["num_hidden_layers"],
    num_attention_heads=QWEN25_1_5B["num_attention_heads"],
    num_key_value_heads=QWEN25_1_5B["num_key_value_heads"],
    dtype="bfloat16",
)
NVIDIA_SMI = ("nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits")


def prepare(root: Path) -> None:
    """The random-init model and synthetic problems (prompts in the RL schema)."""
    build(root / "model", MODEL_SPEC)
    write_dataset(root / "synthetic", SyntheticSizes(sft=1, rl_train=512, rl_val=8))
    print(f"prepared {model_params(root / 'model') / 1e9:.2f} B-parameter model under {root}")


def bench_request(root: Path, gpus: int, steps: int, mode: str = "sync") -> LaunchRequest:
    """``run_dapo``'s request: dapo.yaml but for the batch and what a random model forces;
    ``mode`` is the rollout mode (async: verl's fully-async trainer, 2 GPUs or more)."""
    batch = PROMPTS_PER_GPU * gpus
    data = root / "synthetic"
    overrides = (
        f"data.train_files={data / 'rl_train.parquet'}",
        f"data.val_files=[{data / 'rl_val.parquet'}]",
        f"data.train_batch_size={batch}",
        # Four actor updates a step, as dapo.yaml's 64 prompts in mini-batches of 16.
        f"actor_rollout_ref.actor.ppo_mini_batch_size={batch // 4}",
        # A random model's groups all score the same: dynamic sampling would regenerate every
        # batch up to its bound, timing generation ten times instead of the trainer's step.
        "algorithm.filter_groups.enable=false",
        "trainer.val_before_train=false",
        "trainer.save_freq=-1",  # no checkpoint of a random model
        "trainer.resume_mode=disable",
        f"trainer.total_training_steps={steps}",
        "trainer.total_epochs=100",
        "trainer.logger=[console,file]",
    )
    return LaunchRequest("dapo", experiment=EXPERIMENT, rollout_mode=mode,
                         sft_checkpoint=str(root / "model"), overrides=overrides)  # fmt: skip


def layout_settings(root: Path, gpus: int, request: LaunchRequest) -> dict:
    """TP, SP, offload and the rollout mode as the composed config ``run_dapo`` launches has
    them (async: also the GPU split and the weight-sync interval)."""
    topo = Topology(gpus_per_node=gpus)
    composed = plan_dapo(Layout.local(root), EXPERIMENT, root / "model", topo, request).composed
    actor, rollout = composed.actor_rollout_ref.actor, composed.actor_rollout_ref.rollout
    mode = {"rollout_mode": request.rollout_mode}
    if request.rollout_mode == "async":
        mode |= {
            "rollout_gpus": int(composed.rollout.n_gpus_per_node),
            "trainer_gpus": int(composed.trainer.n_gpus_per_node),
            "sync_every_steps": int(composed.async_training.trigger_parameter_sync_step),
            "staleness_threshold": float(composed.async_training.staleness_threshold),
        }
    return {
        **mode,
        "tp": int(rollout.tensor_model_parallel_size),
        "sp": int(actor.ulysses_sequence_parallel_size),
        "param_offload": bool(actor.fsdp_config.param_offload),
        "optimizer_offload": bool(actor.fsdp_config.optimizer_offload),
        "rollout_n": int(rollout.n),
        "gpu_memory_utilization": float(rollout.gpu_memory_utilization),
        "max_response_length": int(composed.data.max_response_length),
        "attention": str(composed.actor_rollout_ref.model.override_config.attn_implementation),
    }


def visible_gpus_option(visible: str | None) -> list[str]:
    """nvidia-smi's ``--id`` for the GPUs this run may use: other jobs on the machine's other GPUs
    are not this run's memory (the first 2-GPU run's row counted two GPUs another job used)."""
    ids = [part.strip() for part in (visible or "").split(",") if part.strip()]
    return [f"--id={','.join(ids)}"] if ids and all(i.isdigit() for i in ids) else []


class GpuMemoryPeak:
    """The highest ``memory.used`` nvidia-smi reports per GPU while the block runs, sampled every
    ``interval_s``: the rollout engine and the FSDP actor are separate processes, so no single
    process's allocator sees the whole card."""

    def __init__(self, command: Sequence[str] = NVIDIA_SMI, interval_s: float = 1.0) -> None:
        self.command = [*command, *visible_gpus_option(os.environ.get("CUDA_VISIBLE_DEVICES"))]
        self.interval_s = interval_s
        self.peak_mib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> GpuMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample_until_stopped(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return

    def sample(self) -> None:
        try:
            out = subprocess.run(self.command, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return
        for line in out.splitlines():
            index, _, used = line.partition(",")
            if index.strip().isdigit() and used.strip().isdigit():
                gpu, mib = int(index), int(used)
                self.peak_mib[gpu] = max(mib, self.peak_mib.get(gpu, 0))

    def peak_gb(self) -> dict[str, float]:
        return {str(gpu): round(mib * 2**20 / 1e9, 1) for gpu, mib in sorted(self.peak_mib.items())}


def step_row(rows: list[tuple[int, dict]]) -> dict:
    """Medians over the training steps after the first (which includes warm-up), from verl's
    metrics: the time split, tokens/s and lengths."""
    train = [data for _, data in rows if "timing_s/step" in data]
    if not train:
        raise SystemExit("main_ppo logged no training step")
    measured = train[1:] or train

    def median(key: str) -> float:
        return statistics.median(float(d[key]) for d in measured if key in d)

    split = sorted({k for d in measured for k in d if k.startswith(run_metrics.TIMING_PREFIX)})
    turns = median("num_turns/mean")
    return {
        "steps": len(train),
        "steps_measured": len(measured),
        "step_s": round(median("timing_s/step"), 2),
        "first_step_s": round(float(train[0]["timing_s/step"]), 2),
        "split_s": {k.removeprefix(run_metrics.TIMING_PREFIX): round(median(k), 2) for k in split},
        "tokens_per_step": int(median("perf/total_num_tokens")),
        "tokens_per_s": round(median("perf/total_num_tokens") / median("timing_s/step")),
        "tokens_per_s_per_gpu": round(median("perf/throughput")),
        "response_length_mean": round(median("response_length/mean"), 1),
        "num_turns_mean": round(turns, 2),
        # One user turn and one answer, plus an assistant turn and a tool turn per call.
        "tool_calls_per_traj": round((turns - 2) / 2, 3),
        "actor_peak_allocated_gb": round(
            max(float(d.get("actor/perf/max_memory_allocated_gb", 0)) for d in train), 1
        ),
        "actor_peak_reserved_gb": round(
            max(float(d.get("actor/perf/max_memory_reserved_gb", 0)) for d in train), 1
        ),
    }


def run(root: Path, gpus: int, steps: int, out: Path, mode: str = "sync") -> dict:
    import torch

    layout = Layout.local(root)
    request = bench_request(root, gpus, steps, mode)
    settings = layout_settings(root, gpus, request)
    topo = Topology(gpus_per_node=gpus)
    start = time.time()
    with GpuMemoryPeak() as memory, run_code_url(None) as url:
        result = run_dapo(layout, topo, request, sandbox_url=url)
    rows = run_metrics.read_run(layout.experiment_dir("dapo", EXPERIMENT))
    row = {
        "kind": "dapo",
        "what": "production layout scaled: random-init Qwen2.5-1.5B body, the offline vocab",
        "gpus": gpus,
        "gpu": torch.cuda.get_device_name(0),
        "params_b": round(model_params(root / "model") / 1e9, 2),
        "batch_prompts": PROMPTS_PER_GPU * gpus,
        **settings,
        "exit": result.returncode,
        "wall_s": round(time.time() - start),
        **step_row(rows),
        "val_acc": run_metrics.summarize(rows).val_acc,
        "peak_gpu_memory_gb": memory.peak_gb(),
    }
    out.write_text(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the random-init model and the RL problems")
    p.add_argument("--root", type=Path, required=True)
    r = sub.add_parser("run", help="a few main_ppo steps; writes one JSON row")
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("--gpus", type=int, required=True)
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--rollout-mode", choices=ROLLOUT_MODES, default="sync")
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.root.resolve())
        return 0
    row = run(args.root.resolve(), args.gpus, args.steps, args.out, args.rollout_mode)
    return 0 if row["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
