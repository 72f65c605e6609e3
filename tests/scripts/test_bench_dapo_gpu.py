"""The DAPO GPU benchmark's CPU-testable parts: the layout it launches, memory sampling, the row."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from recipe.retool.data.tiny_model import TinySpec
from recipe.retool.launch.commands import attention_implementation, load_stage_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_dapo_gpu.py"
spec = importlib.util.spec_from_file_location("bench_dapo_gpu", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
CURVE_METRICS = REPO / "docs" / "gpu-runs" / "dapo_curve_h100.metrics.jsonl"


@pytest.mark.parametrize(("gpus", "tp", "sp"), [(1, 1, 1), (2, 2, 2), (4, 4, 4)])
def test_the_layout_follows_the_gpu_count_and_keeps_the_yaml(tmp_path: Path, gpus, tp, sp):
    yaml = load_stage_config("dapo").overrides
    settings = bench.layout_settings(tmp_path, gpus, bench.bench_request(tmp_path, gpus, 3))
    assert (settings["tp"], settings["sp"]) == (tp, sp)
    assert settings["param_offload"] is yaml["actor_rollout_ref.actor.fsdp_config.param_offload"]
    assert settings["max_response_length"] == yaml["data.max_response_length"]
    assert settings["rollout_n"] == yaml["actor_rollout_ref.rollout.n"]
    assert settings["attention"] == attention_implementation()


def test_the_batch_scales_with_the_gpus_in_four_mini_batches(tmp_path: Path) -> None:
    args = bench.bench_request(tmp_path, 2, 3).overrides
    assert "data.train_batch_size=16" in args
    assert "actor_rollout_ref.actor.ppo_mini_batch_size=4" in args
    assert {"trainer.save_freq=-1", "trainer.resume_mode=disable"} <= set(args)


def test_async_mode_reaches_the_run_and_the_row_names_the_split(tmp_path: Path) -> None:
    args = bench.bench_request(tmp_path, 4, 3, "async")
    assert "--rollout-mode=async" in args.to_argv()
    settings = bench.layout_settings(tmp_path, 4, args)
    assert settings["rollout_mode"] == "async"
    assert (settings["rollout_gpus"], settings["trainer_gpus"]) == (2, 2)
    assert settings["sync_every_steps"] == 4  # the batch's four mini-batches, then a sync
    assert bench.layout_settings(tmp_path, 4, bench.bench_request(tmp_path, 4, 3))[
        "rollout_mode"
    ] == ("sync")


def fake_smi(tmp_path: Path, outputs: list[str]) -> list[str]:
    """A command that prints the next of ``outputs`` on each call (the last one repeats)."""
    state = tmp_path / "calls"
    state.write_text("0")
    script = tmp_path / "smi.py"
    script.write_text(
        "import json, pathlib, sys\n"
        f"outputs = {json.dumps(outputs)}\n"
        f"state = pathlib.Path({str(state)!r})\n"
        "n = int(state.read_text())\n"
        "state.write_text(str(n + 1))\n"
        "sys.stdout.write(outputs[min(n, len(outputs) - 1)])\n"
    )
    return [sys.executable, str(script)]


def test_memory_peak_keeps_each_gpus_highest_reading(tmp_path: Path) -> None:
    command = fake_smi(tmp_path, ["0, 1000\n1, 50\n", "0, 300\n1, 70000\nnot a line\n"])
    peak = bench.GpuMemoryPeak(command, interval_s=0.01)
    peak.sample()
    peak.sample()
    peak.sample()
    assert peak.peak_mib == {0: 1000, 1: 70000}
    assert peak.peak_gb() == {"0": 1.0, "1": 73.4}


@pytest.mark.parametrize(
    ("visible", "option"),
    [("0,1", ["--id=0,1"]), (" 2 ", ["--id=2"]), (None, []), ("", []), ("GPU-7b4b,GPU-a69e", [])],
)
def test_memory_is_read_for_the_visible_gpus_only(monkeypatch, visible, option) -> None:
    assert bench.visible_gpus_option(visible) == option
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert bench.GpuMemoryPeak(["smi"]).command == ["smi", *option]


def test_memory_peak_samples_while_the_block_runs_and_survives_no_nvidia_smi(tmp_path) -> None:
    with bench.GpuMemoryPeak(fake_smi(tmp_path, ["0, 2048\n"]), interval_s=0.01) as peak:
        pass
    assert peak.peak_mib == {0: 2048}
    with bench.GpuMemoryPeak([str(tmp_path / "no-such-program")], interval_s=0.01) as missing:
        pass
    assert missing.peak_gb() == {}


def test_step_row_from_a_real_verl_run() -> None:
    """The H100 learning curve's metrics as verl logged them: every timing key of the measured
    steps is in the split, and tool calls come from the turn count (~1 call a trajectory)."""
    rows = [(r["step"], r["data"]) for r in map(json.loads, CURVE_METRICS.read_text().splitlines())]
    row = bench.step_row(rows)
    train = [d for _, d in rows if "timing_s/step" in d]
    assert row["steps"] == len(train) and row["steps_measured"] == len(train) - 1
    assert {"gen", "old_log_prob", "update_actor", "update_weights", "step"} <= set(row["split_s"])
    assert row["first_step_s"] == round(train[0]["timing_s/step"], 2)
    assert 0.8 < row["tool_calls_per_traj"] <= 1.0
    assert row["tokens_per_s"] > 0 and row["actor_peak_reserved_gb"] > 0
    with pytest.raises(SystemExit, match="no training step"):
        bench.step_row([(0, {"val-core/x/acc/mean@8": 0.5})])


def test_prepare_writes_a_model_of_the_spec_and_rl_problems(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "MODEL_SPEC", TinySpec(dtype="bfloat16"))
    bench.prepare(tmp_path)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["hidden_size"] == TinySpec().hidden_size
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert (tmp_path / "synthetic" / "rl_train.parquet").is_file()
