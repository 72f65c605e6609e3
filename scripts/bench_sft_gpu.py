"""Benchmark the production SFT launcher on GPUs at Qwen2.5-7B-Instruct's exact shape (or
Qwen2.5-1.5B's, ``--shape``).

No weights are downloaded: the model is random-init from the architecture (``qwen_shapes.py``;
speed and memory do not depend on the values), the data is synthetic multi-turn tool-calling
conversations at the real lengths. Training runs through ``recipe.retool.stages.sft.run_sft`` — the
same code path and ``config/sft.yaml`` as ``modal run ...::train`` — with only the GPU count and
the parallel/batch knobs under test changed. Each run is stopped after ``--steps`` steps (no
checkpoint is written).

    python scripts/bench_sft_gpu.py prepare --root /tmp/bench
    python scripts/bench_sft_gpu.py run --root /tmp/bench --gpus 4 --sp 1 --out r.json
    python scripts/bench_sft_gpu.py run ... --profile-step 3   # + where step 3's GPU time went
    python scripts/bench_sft_gpu.py table r1.json r2.json ...   # markdown for docs/benchmarks.md
    python scripts/bench_sft_gpu.py matrix --root /tmp/bench --gpus 4   # all of the above
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trace_summary
from qwen_shapes import SHAPES, model_params

from recipe.retool.core.constants import TOOL_NAME, TOOL_SCHEMA
from recipe.retool.core.paths import Layout
from recipe.retool.core.request import LaunchRequest
from recipe.retool.core.topology import Topology
from recipe.retool.launch.commands import sft_overrides
from recipe.retool.launch.validation import validate
from recipe.retool.stages.sft import run_sft

H100_BF16_DENSE_FLOPS = 989e12
H100_MEMORY_GB = 81559 * 2**20 / 1e9  # what nvidia-smi reports for an H100 80GB HBM3
STEP_LINE = re.compile(r"step:(\d+) - (.*)")
WORDS = ["the", "of", "and", "to", "in", "is", "we", "compute", "sum", "value", "answer"]


def prepare(
    root: Path, samples: int, min_tokens: int, max_tokens: int, seed: int, shape: str = "qwen2.5-7b"
) -> None:
    """Write the random-init model of ``shape`` (bf16 safetensors) and the synthetic SFT parquet."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from recipe.retool.data.tiny_model import build_tokenizer

    model_dir = root / "model"
    if not (model_dir / "model.safetensors.index.json").exists():
        config = Qwen2Config(**SHAPES[shape], torch_dtype="bfloat16")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
        model.save_pretrained(model_dir, max_shard_size="5GB")
        del model
    tokenizer = build_tokenizer(1024)
    tokenizer.save_pretrained(model_dir)

    rng = random.Random(seed)
    rows = [
        synthetic_conversation(tokenizer, rng.randint(min_tokens, max_tokens), rng)
        for _ in range(samples)
    ]
    layout = Layout.local(root)
    layout.sft_train_file().parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(layout.sft_train_file())
    lengths = [r["n_tokens"] for r in rows]
    print(f"prepared {samples} samples, tokens min/median/max {min(lengths)}/"
          f"{int(statistics.median(lengths))}/{max(lengths)}; model at {model_dir}")  # fmt: skip


def synthetic_conversation(tokenizer, target_tokens: int, rng: random.Random) -> dict:
    """A ReTool-shaped trace (question, code calls with outputs, boxed answer) of ~target tokens."""
    tools = [TOOL_SCHEMA]
    turns = rng.randint(3, 8)

    def text(n_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n_words))

    def build(words: int) -> list[dict]:
        messages = [{"role": "user", "content": text(60)}]
        for _ in range(turns):
            code = f"print({text(words // 4)!r})"
            call = {
                "type": "function",
                "function": {"name": TOOL_NAME, "arguments": {"code": code}},
            }
            messages.append({"role": "assistant", "content": text(words), "tool_calls": [call]})
            messages.append({"role": "tool", "content": text(words // 4)})
        messages.append({"role": "assistant", "content": text(words // 2) + " \\boxed{42}"})
        return messages

    def count(messages: list[dict]) -> int:
        ids = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    words = 100
    for _ in range(3):  # proportional refinement: token count is ~linear in words
        words = max(10, int(words * target_tokens / count(build(words))))
    messages = build(words)
    while (n := count(messages)) > target_tokens and words > 10:
        words = int(words * 0.95)
        messages = build(words)
    return {"messages": messages, "tools": tools, "n_tokens": n}


class StepCollector:
    """Runs the trainer, timestamps verl's per-step log lines, stops it after ``steps`` steps."""

    def __init__(self, steps: int, log_path: Path) -> None:
        self.steps = steps
        self.log_path = log_path
        self.records: list[tuple[float, dict[str, float]]] = []

    def __call__(self, command: Sequence[str], env: dict[str, str]) -> int:
        repo = str(Path(__file__).resolve().parents[1])
        merged = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        merged["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, merged.get("PYTHONPATH")]))
        with self.log_path.open("w") as log:
            proc = subprocess.Popen(
                list(command), env=merged, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, start_new_session=True,
            )  # fmt: skip
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                for match in STEP_LINE.finditer(line):
                    self.records.append((time.time(), parse_metrics(match.group(2))))
                if len(self.records) >= self.steps:
                    os.killpg(proc.pid, signal.SIGTERM)
                    break
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        return 0 if len(self.records) >= self.steps else (proc.returncode or 1)


def parse_metrics(text: str) -> dict[str, float]:
    metrics = {}
    for part in text.split(" - "):
        key, _, value = part.partition(":")
        try:
            metrics[key.strip()] = float(value)
        except ValueError:
            continue
    return metrics


def bench_request(args: argparse.Namespace) -> LaunchRequest:
    """``run_sft``'s request: sft.yaml's settings but for the knobs under test. ``liger`` is
    passed only when asked for (``--liger`` / ``--no-liger``), else sft.yaml's value holds."""
    step = args.profile_step
    profiled = profile_args(step, args.out.with_suffix(".profile")) if step else []
    return LaunchRequest("sft", experiment="bench", overrides=(
        f"engine.ulysses_sequence_parallel_size={args.sp}",
        f"data.max_token_len_per_gpu={args.tokens_per_gpu}",
        f"data.train_batch_size={args.batch}",
        "trainer.logger=[console]",
        # A fresh run that writes nothing: a bench that resumed an earlier one's checkpoint ran one
        # step of four, and a 7B checkpoint save (optimizer included) lands inside a step's time.
        "trainer.resume_mode=disable",
        "trainer.save_freq=-1",
        f"trainer.total_training_steps={args.steps + 1}",
        *([] if args.liger is None else [f"model.use_liger={args.liger}"]),
        *(["engine.use_torch_compile=False"] if args.no_compile else []),
        *profiled,
        *args.override,
    ))  # fmt: skip


def profile_args(step: int, save_path: Path) -> list[str]:
    """verl's torch profiler around SFT step ``step`` on rank 0; the chrome trace lands in
    ``save_path`` and ``trace_summary.py`` reads it."""
    return [
        "profiler.enable=true",
        "profiler.tool=torch",
        "profiler.ranks=[0]",
        f"profiler.save_path={save_path}",
        f"trainer.profile_interval=[{step},{step}]",
    ]


def profile_summary(save_path: Path) -> dict:
    """The summary of the trace verl wrote (the newest, if several)."""
    traces = sorted(save_path.glob("*.json*"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise SystemExit(f"no profiler trace in {save_path}: did the run reach the profiled step?")
    newest = traces[-1]
    return {"trace": str(newest), **trace_summary.summarize(trace_summary.load_events(newest))}


def measured_settings(layout: Layout, topo: Topology, request: LaunchRequest, model: Path) -> dict:
    """liger, torch.compile and gradient checkpointing as the composed config that ``run_sft``
    launches has them (sft.yaml, then the request's overrides), not as the flags asked."""
    overrides = sft_overrides(layout, request.experiment, model, topo, request.overrides)
    composed = validate("sft", overrides, topo)
    return {
        "liger": bool(composed.model.use_liger),
        "compile": bool(composed.engine.use_torch_compile),
        "grad_ckpt": bool(composed.model.enable_gradient_checkpointing),
    }


def measured_steps(
    records: Sequence[tuple[float, dict[str, float]]], profile_step: int
) -> list[tuple[float, dict[str, float]]]:
    """``(seconds, metrics)`` of each step but the first (compilation, allocator warm-up) and the
    profiled one (the profiler slows it); a step's seconds run from the previous step's line."""
    return [
        (now - before, metrics)
        for number, ((before, _), (now, metrics)) in enumerate(itertools.pairwise(records), start=2)
        if number != profile_step
    ]


def run(args: argparse.Namespace) -> dict:
    import torch

    layout = Layout.local(args.root)
    world = args.gpus
    topo = Topology(gpus_per_node=world)
    request = bench_request(args)
    settings = measured_settings(layout, topo, request, args.root / "model")
    collector = StepCollector(args.steps, args.out.with_suffix(".log"))
    start = time.time()
    result = run_sft(layout, topo, request, model_path=args.root / "model", runner=collector)
    measured = measured_steps(collector.records, args.profile_step)
    if result.returncode != 0 or len(measured) < 1:
        tail = args.out.with_suffix(".log").read_text()[-3000:]
        raise SystemExit(f"run failed (rc {result.returncode}); log tail:\n{tail}")
    step_s = statistics.median(seconds for seconds, _ in measured)
    tokens_per_step = statistics.median(m.get("train/global_tokens", 0.0) for _, m in measured)
    peak = max(m.get("perf/max_memory_reserved_gb", 0.0) for _, m in collector.records)
    peak_alloc = max(m.get("perf/max_memory_allocated_gb", 0.0) for _, m in collector.records)
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    params = model_params(args.root / "model")
    row = {
        "gpu": torch.cuda.get_device_name(0),
        "params_b": round(params / 1e9, 2),
        "gpus": world,
        "sp": args.sp,
        "tokens_per_gpu": args.tokens_per_gpu,
        **settings,
        "overrides": args.override,
        "batch": args.batch,
        "step_s": round(step_s, 2),
        "tokens_per_step": int(tokens_per_step),
        "tokens_per_s_per_gpu": round(tokens_per_step / step_s / world),
        "mfu_verl": round(statistics.mean(m.get("train/mfu", 0.0) for _, m in measured), 3),
        "mfu_6n": round(6 * params * tokens_per_step / step_s / world / H100_BF16_DENSE_FLOPS, 3),
        "peak_reserved_gb": round(peak, 1),
        "peak_allocated_gb": round(peak_alloc, 1),
        "headroom": round(1 - peak / total_gb, 3),
        "wall_s": round(time.time() - start),
        "steps_measured": len(measured),
    }
    if args.profile_step:
        row["profile"] = profile_summary(args.out.with_suffix(".profile"))
    args.out.write_text(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row


def matrix(args: argparse.Namespace) -> None:
    """The benchmark matrix of docs/benchmarks.md for one machine; prints the table last."""
    prepare(args.root, 192, 4096, 16000, 0, args.shape)
    rows = []
    for sp in (s for s in (1, 2, 4, 8) if args.gpus % s == 0):
        for liger in (False, True) if sp == 1 else (False,):
            out = args.root / f"g{args.gpus}_sp{sp}{'_liger' if liger else ''}.json"
            run(argparse.Namespace(
                root=args.root, gpus=args.gpus, sp=sp, tokens_per_gpu=16384, batch=32,
                steps=args.steps, liger=liger, no_compile=False, override=args.override, out=out,
                profile_step=0,
            ))  # fmt: skip
            rows.append(out)
    print(table(rows))


def table(files: Sequence[Path]) -> str:
    """Markdown rows; headroom is also given against an 80 GB H100, the card Modal runs."""
    rows = [json.loads(Path(f).read_text()) for f in files]
    head = ("| GPUs | SP | tokens/GPU | liger | grad ckpt | s/step | tokens/s/GPU | MFU (verl) "
            "| MFU (6N) | peak reserved GB | headroom | est. headroom on 80 GB H100 "
            "| params (B) |")  # fmt: skip
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        h100 = 1 - r["peak_reserved_gb"] / H100_MEMORY_GB
        lines.append(
            f"| {r['gpus']}× {r['gpu'].replace('NVIDIA ', '')} | {r['sp']} | {r['tokens_per_gpu']} "
            f"| {'on' if r['liger'] else 'off'} | {'on' if r.get('grad_ckpt', True) else 'off'} "
            f"| {r['step_s']} | {r['tokens_per_s_per_gpu']} | {r['mfu_verl']} | {r['mfu_6n']} "
            f"| {r['peak_reserved_gb']} | {r['headroom']:.0%} "
            f"| {f'{h100:.0%}' if h100 > 0 else 'OOM'} | {r.get('params_b', '-')} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the random-init model and synthetic data")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--min-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=16000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    r = sub.add_parser("run", help="train a few steps and write one JSON row")
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("--gpus", type=int, required=True)
    r.add_argument("--sp", type=int, default=1)
    r.add_argument("--tokens-per-gpu", type=int, default=16384)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--steps", type=int, default=4)
    r.add_argument(
        "--liger",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="model.use_liger on/off (default: as sft.yaml sets it)",
    )
    r.add_argument("--no-compile", action="store_true")
    r.add_argument(
        "--profile-step", type=int, default=0,
        help="trace this step with torch's profiler; the row gets where its GPU time went",
    )  # fmt: skip
    r.add_argument("--override", action="append", default=[])
    r.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("matrix", help="prepare, then every SP that divides --gpus, ± liger")
    m.add_argument("--root", type=Path, required=True)
    m.add_argument("--gpus", type=int, required=True)
    m.add_argument("--steps", type=int, default=4)
    m.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    m.add_argument("--override", action="append", default=[])
    t = sub.add_parser("table", help="markdown table from JSON rows")
    t.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.root, args.samples, args.min_tokens, args.max_tokens, args.seed, args.shape)
    elif args.cmd == "run":
        run(args)
    elif args.cmd == "matrix":
        matrix(args)
    else:
        print(table(args.files))


if __name__ == "__main__":
    main()
