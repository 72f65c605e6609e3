"""`make local-smoke` end to end: every stage of the pipeline on CPU, through production code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from recipe.retool.core.paths import Layout, latest_checkpoint, read_checkpoint_info
from recipe.retool.launch.commands import dapo_overrides
from recipe.retool.launch.validation import validate
from recipe.retool.local import smoke
from recipe.retool.records import run_metrics
from recipe.retool.stages.record import StageResult


@pytest.mark.slow
def test_local_smoke_runs_every_stage(tmp_path: Path, local_endpoint, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", local_endpoint + "/run_code")
    assert smoke.main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.rindex("local smoke:") :]
    for stage in ("model", "prep", "sandbox", "sft", "dapo", "eval"):
        assert f"\n{stage:<8} ok" in table, table
    layout = Layout.local(tmp_path)
    sft = latest_checkpoint(layout, "sft", "smoke")
    assert read_checkpoint_info(layout, "sft", "smoke").step == sft.step
    assert (sft.hf_dir / "model.safetensors").exists()
    assert "scripted tool-call rollout: code ran in the sandbox, reward +1" in table
    assert read_checkpoint_info(layout, "dapo", "smoke").step == 2  # main_ppo ran, CPU or GPU
    logged = run_metrics.read_run(layout.experiment_dir("dapo", "smoke"))
    assert run_metrics.describe(run_metrics.summarize(logged)).startswith("2 main_ppo steps")
    assert run_metrics.describe(run_metrics.summarize(logged)) in table
    assert "tool calls/trajectory in validation" in table
    evals = list((layout.checkpoints / "eval").glob("dapo-smoke-step2/summary.json"))
    assert len(evals) == 1 and set(json.loads(evals[0].read_text())["datasets"]) == {
        "aime_2024",
        "aime_2025",
    }


def test_a_failing_stage_fails_the_run_and_is_reported(tmp_path: Path, monkeypatch, capsys) -> None:
    def broken_prep(self, report):
        raise RuntimeError("no data today")

    monkeypatch.setattr(smoke.Smoke, "prep", broken_prep)
    assert smoke.main(["--root", str(tmp_path)]) == 1
    table = capsys.readouterr().out
    assert "prep     FAILED" in table and "RuntimeError: no data today" in table
    assert "sft" not in table.split("local smoke:")[1]  # later stages did not run


def test_a_sandbox_that_did_not_start_says_which_and_why(monkeypatch) -> None:
    """The smoke's sandbox line names the server and its own last words."""
    monkeypatch.setenv("SANDBOX_PYTHON", "/nonexistent")
    with pytest.raises(RuntimeError) as caught, smoke.sandbox_server(allow_insecure=False):
        pass
    message = str(caught.value)
    assert message.startswith("the sandbox did not start: python"), message
    assert "-m sandbox serve exited with code 2; stderr: error: python='/nonexistent'" in message


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
def test_a_non_root_smoke_names_the_development_mode_and_its_sandbox_serves(monkeypatch) -> None:
    """`auto` never takes bwrap-userns (one /tmp shared between calls), the only mode a non-root
    user has: the smoke's --allow-insecure default names it. The server started with those
    arguments runs code (here as root: this machine's interpreter is unreadable to other uids)."""
    from sandbox import local

    started = []
    real = local.sandbox_service

    def record(*args, **kwargs):
        started.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(local, "sandbox_service", record)
    monkeypatch.setattr(smoke.os, "geteuid", lambda: 1000)
    with smoke.sandbox_server(allow_insecure=True) as url:
        answer = httpx.post(url, json={"code": "print(2+2)", "language": "python"}, timeout=60)
    assert started == [
        ("--log-level", "warning", "--allow-insecure", "--isolation", "bwrap-userns")
    ]
    assert answer.json()["run_result"]["stdout"] == "4\n"


def test_gpu_smoke_dapo_settings_compose_for_one_gpu() -> None:
    """What the smoke runs as real main_ppo steps where a GPU and vLLM exist."""
    from recipe.retool.core.topology import Topology

    topo = Topology(gpus_per_node=1)
    parsed = smoke.SMOKE_DAPO
    overrides = dapo_overrides(Layout.modal(), "smoke", Path("/m"), topo, parsed.overrides)
    cfg = validate("dapo", overrides, topo)
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 1
    assert cfg.trainer.total_training_steps == 2
    assert cfg.reward.reward_kwargs.max_resp_len == cfg.data.max_response_length


@pytest.mark.parametrize("gpu", [True, False])
def test_dapo_row_reports_what_main_ppo_logged(tmp_path: Path, monkeypatch, gpu: bool) -> None:
    """The dapo row is read from verl's metrics file, not written by hand; main_ppo runs on
    the GPU where vLLM can, else on the CPU."""
    from recipe.retool.core import paths

    runs = []

    def fake_run_dapo(layout, topo, args, *, sandbox_url):
        runs.append(topo)
        log = run_metrics.metrics_dir(layout.experiment_dir("dapo", "smoke"))
        log.mkdir(parents=True)
        rows = [{"step": s, "data": {"critic/score/mean": r}} for s, r in ((1, -1.0), (2, 0.0))]
        (log / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return StageResult("dapo", "smoke", 0, None, 1.0)

    async def scripted(self, model_dir):
        return 1.0

    monkeypatch.setattr(smoke, "_gpu_rollout_available", lambda: gpu)
    monkeypatch.setattr(smoke, "run_dapo", fake_run_dapo)
    monkeypatch.setattr(smoke, "resolve_sft_checkpoint", lambda layout, req: tmp_path)
    monkeypatch.setattr(smoke.Smoke, "_scripted_tool_rollout", scripted)
    run = smoke.Smoke(tmp_path, allow_insecure=True)
    report = smoke.StageReport("dapo")
    run.dapo(report)
    assert [(t.gpus_per_node, t.device) for t in runs] == [(1, "cuda" if gpu else "cpu")]
    assert report.notes[-2] == "2 main_ppo steps, mean reward -0.50"
    assert paths.Layout.local(tmp_path).experiment_dir("dapo", "smoke").exists()
