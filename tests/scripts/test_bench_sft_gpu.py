"""The GPU benchmark's CPU-testable parts: data shape, log parsing, early stop, the table."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from recipe.retool.core.request import parse
from recipe.retool.data.tiny_model import build_tokenizer
from recipe.retool.stages.sft import run_sft

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_sft_gpu.py"
spec = importlib.util.spec_from_file_location("bench_sft_gpu", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_synthetic_traces_hit_their_token_targets_in_retool_shape() -> None:
    tokenizer = build_tokenizer(1024)
    rng = random.Random(0)
    for target in (4096, 9000, 16000):
        row = bench.synthetic_conversation(tokenizer, target, rng)
        assert 0.9 * target <= row["n_tokens"] <= target
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant" and "tool" in roles
        calls = [m for m in row["messages"] if m.get("tool_calls")]
        assert calls[0]["tool_calls"][0]["function"]["name"] == "code_interpreter"


def test_parse_metrics_reads_verl_console_lines() -> None:
    line = "step:3 - train/loss:9.64 - train/mfu:0.15 - train/global_tokens:344892 - x:nan-ish"
    match = bench.STEP_LINE.search(line)
    metrics = bench.parse_metrics(match.group(2))
    assert match.group(1) == "3"
    assert metrics == {"train/loss": 9.64, "train/mfu": 0.15, "train/global_tokens": 344892.0}


def test_step_collector_stops_the_trainer_after_n_steps(tmp_path: Path) -> None:
    script = (
        "import time\n"
        "for i in range(1, 100):\n"
        "    print(f'step:{i} - train/global_tokens:100 - train/mfu:0.1', flush=True)\n"
        "    time.sleep(0.05)\n"
    )
    collector = bench.StepCollector(3, tmp_path / "run.log")
    assert collector([sys.executable, "-c", script], {}) == 0
    assert len(collector.records) == 3
    assert "step:3" in (tmp_path / "run.log").read_text()


def test_step_collector_reports_a_trainer_that_dies_early(tmp_path: Path) -> None:
    collector = bench.StepCollector(3, tmp_path / "run.log")
    assert collector([sys.executable, "-c", "raise SystemExit(7)"], {}) == 7


@pytest.mark.parametrize(("peak", "h100"), [(57.4, "33%"), (138.2, "OOM")])
def test_table_estimates_h100_headroom(tmp_path: Path, peak: float, h100: str) -> None:
    row = {"gpu": "NVIDIA H200", "gpus": 4, "sp": 1, "tokens_per_gpu": 16384, "liger": True,
           "step_s": 27.1, "tokens_per_s_per_gpu": 3023, "mfu_verl": 0.161, "mfu_6n": 0.14,
           "peak_reserved_gb": peak, "headroom": 0.62}  # fmt: skip
    path = tmp_path / "r.json"
    path.write_text(json.dumps(row))
    last = bench.table([path]).splitlines()[-1]
    assert last.startswith("| 4× H200 | 1 | 16384 | on | on |")
    assert last.endswith(f"| {h100} | - |")


def bench_namespace(**kw) -> argparse.Namespace:
    defaults = {"sp": 1, "tokens_per_gpu": 16384, "batch": 32, "steps": 3, "liger": None,
                "no_compile": False, "override": [], "profile_step": 0}  # fmt: skip
    return argparse.Namespace(**(defaults | kw))


@pytest.mark.parametrize(
    ("flags", "liger_arg", "recorded"),
    [
        ({}, None, {"liger": True, "compile": True, "grad_ckpt": True}),  # sft.yaml: liger on
        ({"liger": False}, "model.use_liger=False", {"liger": False, "compile": True,
                                                     "grad_ckpt": True}),
        ({"liger": True, "no_compile": True,
          "override": ["model.enable_gradient_checkpointing=False"]},
         "model.use_liger=True", {"liger": True, "compile": False, "grad_ckpt": False}),
    ],
)  # fmt: skip
def test_rows_record_what_the_composed_config_runs(tmp_path: Path, flags, liger_arg, recorded):
    from recipe.retool.core.paths import Layout
    from recipe.retool.core.topology import Topology

    request = bench.bench_request(bench_namespace(**flags))
    args = request.overrides
    assert {"trainer.resume_mode=disable", "trainer.save_freq=-1"} <= set(args)
    liger_args = [a for a in args if a.startswith("model.use_liger=")]
    assert liger_args == ([liger_arg] if liger_arg else [])
    settings = bench.measured_settings(Layout.local(tmp_path), Topology(gpus_per_node=4), request,
                                       tmp_path / "model")  # fmt: skip
    assert settings == recorded


def test_liger_off_is_a_flag_and_the_matrix_passes_it(monkeypatch, tmp_path: Path) -> None:
    parser_args = []
    monkeypatch.setattr(bench, "run", lambda args: parser_args.append(args.liger))
    bench.main(["run", "--root", str(tmp_path), "--gpus", "4", "--no-liger", "--out", "r.json"])
    bench.main(["run", "--root", str(tmp_path), "--gpus", "4", "--out", "r.json"])
    assert parser_args == [False, None]
    monkeypatch.setattr(bench, "prepare", lambda *a: None)
    monkeypatch.setattr(bench, "table", lambda rows: "")
    bench.main(["matrix", "--root", str(tmp_path), "--gpus", "2"])
    assert parser_args[2:] == [False, True, False]  # SP 1 without and with liger, SP 2 without


@pytest.mark.slow
def test_profile_step_makes_verl_write_a_trace_of_that_step(tmp_path: Path, tiny_model_dir) -> None:
    """The overrides of ``--profile-step`` compose against verl's SFT config and, run (here on
    CPU, so the trace holds host ops only), make verl write the chrome trace the row reads."""
    from recipe.retool.core.paths import Layout
    from recipe.retool.core.topology import Topology
    from tests.recipe.test_stages import sft_rows

    layout = Layout.local(tmp_path)
    layout.sft_train_file().parent.mkdir(parents=True)
    sft_rows(4).to_parquet(layout.sft_train_file())
    save = tmp_path / "r.profile"
    args = [
        "--experiment-name=profiled",
        "data.max_length=512",
        "data.train_batch_size=1",
        "data.micro_batch_size_per_gpu=1",
        "trainer.total_training_steps=3",
        "trainer.save_freq=-1",
        "trainer.logger=[console]",
        *bench.profile_args(2, save),
    ]
    cpu = Topology(gpus_per_node=1, device="cpu")
    result = run_sft(layout, cpu, parse("sft", args), model_path=tiny_model_dir)
    assert result.returncode == 0
    (trace,) = save.glob("*.json*")
    events = bench.trace_summary.load_events(trace)
    assert any(e.get("cat") == "cpu_op" for e in events)
    with pytest.raises(SystemExit, match="no profiler trace"):
        bench.profile_summary(tmp_path / "elsewhere")


def test_measured_steps_leave_out_the_first_and_the_profiled_step() -> None:
    records = [(10.0, {"s": 1}), (13.0, {"s": 2}), (20.0, {"s": 3}), (22.5, {"s": 4})]
    assert bench.measured_steps(records, 0) == [(3.0, {"s": 2}), (7.0, {"s": 3}), (2.5, {"s": 4})]
    assert bench.measured_steps(records, 3) == [(3.0, {"s": 2}), (2.5, {"s": 4})]
    assert bench.measured_steps(records[:1], 0) == []
