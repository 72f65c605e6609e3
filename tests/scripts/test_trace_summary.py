"""scripts/trace_summary.py: where a traced step's GPU time went, from a chrome trace."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
spec = importlib.util.spec_from_file_location("trace_summary", SCRIPTS / "trace_summary.py")
trace_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_summary)


def kernel(name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}


EVENTS = [
    {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},  # host: not counted
    kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 0, 400),
    kernel("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", 400, 200),
    kernel("ncclDevKernel_AllGather_RING_LL", 300, 200),  # overlaps both: busy time counts once
    kernel("void at::native::vectorized_elementwise_kernel<4>", 900, 100),  # after a 200 µs gap
]


def test_kernel_time_by_group_busy_share_and_attention_kernels() -> None:
    summary = trace_summary.summarize(EVENTS)
    assert summary["window_ms"] == 1.0 and summary["kernel_ms"] == 0.9
    assert summary["gpu_busy_share"] == 0.7  # [0, 600) and [900, 1000) of [0, 1000)
    assert summary["share_by_group"] == {
        "matmul": round(400 / 900, 3),
        "attention": round(200 / 900, 3),
        "communication": round(200 / 900, 3),
        "elementwise/other": round(100 / 900, 3),
    }
    assert summary["attention_kernels"] == [EVENTS[2]["name"]]
    assert next(iter(summary["top_kernels_ms"])) == EVENTS[1]["name"]


def test_reads_gzipped_traces_and_prints_markdown(tmp_path: Path, capsys) -> None:
    path = tmp_path / "rank0.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": EVENTS}, handle)
    assert trace_summary.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "GPU busy 70%" in out and "| matmul | 44.4% |" in out


def test_a_trace_without_kernels_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"traceEvents": EVENTS[:1]}))
    assert trace_summary.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: no GPU kernels") and err.count("\n") == 1


def test_busy_time_is_the_union_of_intervals() -> None:
    assert trace_summary.busy_us([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("ncclKernel_ReduceScatter_RING", "communication"),
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("Memcpy DtoD (Device -> Device)", "memory"),
        ("triton_poi_fused_add_mul_0", "elementwise/other"),
    ],
)
def test_kernel_groups(name: str, group: str) -> None:
    assert trace_summary.group_of(name) == group
