"""Where one profiled training step's GPU time went, from a torch profiler chrome trace.

verl's SFT trainer writes the trace (``profiler.tool=torch``, ``trainer.profile_interval``);
``bench_sft_gpu.py run --profile-step N`` asks for it and puts this summary in its row. The
question it answers (issue 13, part 0): is the step attention, matmuls, FSDP communication or
the host? Kernels are grouped by name, which is how the trace identifies them:

    python scripts/trace_summary.py TRACE.json.gz    # markdown
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

# First match wins: attention kernels are also matmul-like, NCCL kernels are also copies.
GROUPS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (group, re.compile(pattern, re.I))
    for group, pattern in (
        ("communication", r"nccl|all_?gather|reduce_?scatter|all_?reduce|all_?to_?all"),
        ("attention", r"flash|fmha|attention|varlen|sdpa|softmax_warp"),
        ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|matmul|wgmma|sm90_"),
        ("memory", r"memcpy|memset|copy_|cat_|fill"),
    )
)
OTHER = "elementwise/other"


def load_events(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def group_of(name: str) -> str:
    return next((group for group, pattern in GROUPS if pattern.search(name)), OTHER)


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end)`` intervals: GPU time with any kernel running."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize(events: list[dict[str, Any]], top: int = 8) -> dict[str, Any]:
    """GPU kernel time by group and by kernel, the busy share of the traced window (the rest is
    the GPU waiting on the host or on data) and the attention kernels seen."""
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    if not kernels:
        raise ValueError("no GPU kernels in the trace (a CPU run, or profiling was off)")
    by_group: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    spans = []
    for event in kernels:
        by_group[group_of(event["name"])] += event["dur"]
        by_name[event["name"]] += event["dur"]
        spans.append((event["ts"], event["ts"] + event["dur"]))
    window = max(end for _, end in spans) - min(start for start, _ in spans)
    kernel_total = sum(by_group.values())
    return {
        "window_ms": round(window / 1e3, 2),
        "gpu_busy_share": round(busy_us(spans) / window, 3) if window else 1.0,
        "kernel_ms": round(kernel_total / 1e3, 2),
        "share_by_group": {
            g: round(t / kernel_total, 3) for g, t in sorted(by_group.items(), key=lambda x: -x[1])
        },
        "top_kernels_ms": {
            n[:120]: round(t / 1e3, 2)
            for n, t in sorted(by_name.items(), key=lambda x: -x[1])[:top]
        },
        "attention_kernels": sorted(
            {e["name"][:120] for e in kernels if group_of(e["name"]) == "attention"}
        ),
    }


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"traced window {summary['window_ms']} ms, GPU busy {summary['gpu_busy_share']:.0%}, "
        f"kernels {summary['kernel_ms']} ms",
        "",
        "| group | share of kernel time |",
        "|---|---|",
        *(f"| {g} | {s:.1%} |" for g, s in summary["share_by_group"].items()),
        "",
        "| kernel | ms |",
        "|---|---|",
        *(f"| `{n}` | {t} |" for n, t in summary["top_kernels_ms"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python scripts/trace_summary.py TRACE.json[.gz]", file=sys.stderr)
        return 2
    try:
        print(markdown(summarize(load_events(Path(args[0])))))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {args[0]}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
