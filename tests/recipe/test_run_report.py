"""A run's own report, drawn from a committed metrics file of a real GPU run."""

from __future__ import annotations

import shutil
from pathlib import Path

from recipe.retool.core.paths import Layout
from recipe.retool.core.request import LaunchRequest
from recipe.retool.core.topology import Topology
from recipe.retool.records import run_metrics, run_report
from recipe.retool.stages.sft import run_sft
from tests.recipe.test_stages import LoggingRunner, layout, sft_step  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
GPU_RUN = REPO / "docs" / "gpu-runs" / "dapo_probe_h100_from_sft750.metrics.jsonl"


def test_a_dapo_report_from_a_committed_gpu_run(tmp_path: Path) -> None:
    exp = tmp_path / "dapo-experiments" / "probe"
    run_metrics.metrics_dir(exp).mkdir(parents=True)
    shutil.copy(GPU_RUN, run_metrics.metrics_dir(exp) / "0.jsonl")
    md, png = run_report.write_run_report(exp, "dapo")
    assert (md.name, png.name) == ("report.md", "report.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    text = md.read_text()
    summary = run_metrics.summarize(run_metrics.read_run(exp))
    assert run_metrics.describe(summary) in text  # the run's own numbers
    rows = {
        tuple(c.strip() for c in line.split("|")[1:3]): line
        for line in text.splitlines()
        if line.startswith("| ")
    }
    for panel in ("reward (mean score)", "validation accuracy", "response length (tokens)",
                  "tool calls per trajectory"):  # fmt: skip
        assert any(key[0] == panel for key in rows), panel
    for phase in ("gen", "old_log_prob", "update_actor", "update_weights"):  # the time split
        assert ("step time split (s)", phase) in rows
    reward = rows[("reward (mean score)", "train")].split("|")
    assert reward[3].strip() == str(summary.steps)
    assert reward[5].strip() == f"{summary.reward_mean[-1]:.4g}"


def test_every_run_keeps_a_report_even_when_it_fails(layout: Layout, tiny_model_dir) -> None:  # noqa: F811
    runner = LoggingRunner(layout, "sft", [[(1, sft_step(2.0)), (2, sft_step(1.5))]],
                           returncodes=[1])  # fmt: skip
    run_sft(layout, Topology(gpus_per_node=2), LaunchRequest("sft", experiment="s"),
                   model_path=tiny_model_dir, runner=runner)  # fmt: skip
    exp = layout.experiment_dir("sft", "s")
    assert (exp / "report.png").exists()
    text = (exp / "report.md").read_text()
    assert "| loss | train | 2 | 2 | 1.5 | 1.75 |" in text
    assert not (exp / "checkpoint_info.json").exists()  # failed: not done, but reported


def test_a_run_that_logged_nothing_says_so(tmp_path: Path) -> None:
    exp = tmp_path / "e"
    run_metrics.metrics_dir(exp).mkdir(parents=True)
    (md,) = run_report.write_run_report(exp, "sft")
    assert "No metrics logged yet." in md.read_text()
