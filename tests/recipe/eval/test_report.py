"""Reports from synthetic results: JSON keys, markdown, valid PNGs, the compare/progress CLI."""

from __future__ import annotations

import json
from pathlib import Path

from recipe.retool.eval import report
from recipe.retool.eval.__main__ import main
from recipe.retool.eval.checkpoints import CheckpointRef
from recipe.retool.eval.config import EvalConfig
from recipe.retool.eval.metrics import SampleResult
from recipe.retool.eval.problems import Problem
from recipe.retool.eval.runner import score_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVAL_KEYS = {
    "schema_version",
    "dataset",
    "checkpoint",
    "backend",
    "config",
    "overall",
    "per_problem",
    "timing",
}
OVERALL_KEYS = {
    "num_problems",
    "num_samples",
    "k",
    "mean@k",
    "mean@k_stderr",
    "pass@k",
    "maj@k",
    "mean_tool_turns",
    "mean_tool_calls",
    "tool_use_rate",
    "tool_calls",
    "tool_errors",
    "tool_failures",
    "tool_failure_rate",
    "tool_error_rate",
    "mean_response_tokens",
    "mean_generated_tokens",
    "no_answer_rate",
    "truncated_rate",
    "mean_reward",
    "rollout_errors",
}
PROBLEMS = [
    Problem(i, f"id-{i}", "aime_2024", [{"role": "user", "content": "q"}], str(10 + i))
    for i in range(3)
]


def crashed(problem: int, sample: int) -> SampleResult:
    """A rollout that raised, as the evaluation records it."""
    return SampleResult(problem, sample, False, -1.0, None, 0, 0, 0, 0, 0, error="RuntimeError()")


def fake_eval(out: Path, ref: CheckpointRef, n_correct: int, n: int = 4, crashes: int = 0) -> Path:
    """An eval directory as evaluate_checkpoint writes it, with ``n_correct`` right per problem
    and the last ``crashes`` rollouts of problem 0 crashed."""
    cfg = EvalConfig(n=n)
    results, samples = {}, {}
    for dataset in ("aime_2024", "aime_2025"):
        rows = [
            crashed(p.index, s)
            if p.index == 0 and s >= n - crashes
            else SampleResult(
                p.index,
                s,
                s < n_correct,
                1.0,
                p.ground_truth if s < n_correct else "0",
                4,
                2,
                1,
                1,
                int(s == 0),
                response_tokens=100 + s,
            )
            for p in PROBLEMS
            for s in range(n)
        ]
        result = score_dataset(dataset, PROBLEMS, rows, cfg)
        result.update(checkpoint=ref.to_dict(), backend="hf", config=cfg.__dict__, timing={})
        results[dataset], samples[dataset] = result, rows
    report.write_checkpoint_report(out, results, samples)
    return out


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
        assert image.size[0] > 200 and image.size[1] > 100


def test_checkpoint_report_files_and_keys(tmp_path: Path):
    out = fake_eval(tmp_path / "base", CheckpointRef("base", Path("/m"), "base"), n_correct=1)
    assert sorted(p.name for p in out.iterdir()) == [
        "eval_aime_2024.json",
        "eval_aime_2025.json",
        "report.md",
        "samples_aime_2024.jsonl",
        "samples_aime_2025.jsonl",
    ]
    data = json.loads((out / "eval_aime_2024.json").read_text())
    assert set(data) == EVAL_KEYS
    assert set(data["overall"]) == OVERALL_KEYS
    assert data["overall"]["mean@k"] == 0.25 and data["overall"]["pass@k"]["4"] == 1.0
    assert len(data["per_problem"]) == 3 and data["per_problem"][0]["source_id"] == "id-0"
    lines = (out / "samples_aime_2024.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["problem"] == 0
    md = (out / "report.md").read_text()
    assert "# Evaluation: base" in md and "| aime_2025 | 4 | 25.0%" in md


def test_reports_count_crashed_rollouts_apart_from_wrong_answers(tmp_path: Path):
    ref = CheckpointRef("sft-e-step6", Path("/s"), "sft", "e", 6)
    out = fake_eval(tmp_path / "s", ref, n_correct=1, crashes=2)
    md = (out / "report.md").read_text()
    overall = md.split("## Overall")[1].splitlines()
    assert overall[2].endswith("| no answer | rollout errors |")
    assert overall[4].startswith("| aime_2024 |") and overall[4].endswith("| 2/12 |")  # of 3 × 4
    per_problem = md.split("## aime_2024: per problem")[1].splitlines()
    assert per_problem[2].endswith("| resp. tokens | rollout errors |")
    assert per_problem[4].endswith("| 2/4 |") and per_problem[5].endswith("| 0/4 |")
    assert "rollouts that crashed" in md
    report.write_comparison_report({"sft": out}, tmp_path / "cmp")
    assert "| sft | `sft-e-step6` | 4 | 25.0%" in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.md").read_text().count("| 2/12 |") == 2


def test_results_written_before_the_count_show_no_rollout_errors(tmp_path: Path):
    out = fake_eval(tmp_path / "old", CheckpointRef("base", Path("/m"), "base"), n_correct=1)
    for file in out.glob("eval_*.json"):
        data = json.loads(file.read_text())
        del data["overall"]["rollout_errors"]
        file.write_text(json.dumps(data))
    report.write_comparison_report({"base": out}, tmp_path / "cmp")
    rows = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| base | `base` | 4 |" in rows and rows.count("| – |") == 2


def test_comparison_report_base_sft_dapo(tmp_path: Path):
    dirs = {
        "base": fake_eval(tmp_path / "b", CheckpointRef("base", Path("/m"), "base"), 0),
        "sft": fake_eval(
            tmp_path / "s", CheckpointRef("sft-e-step6", Path("/s"), "sft", "e", 6), 1
        ),
        "dapo": fake_eval(
            tmp_path / "d", CheckpointRef("dapo-e-step9", Path("/d"), "dapo", "e", 9), 3
        ),
    }
    files = report.write_comparison_report(dirs, tmp_path / "cmp")
    assert [f.name for f in files] == ["compare.md", "compare.json", "compare.png"]
    assert_png(tmp_path / "cmp" / "compare.png")
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert list(data) == ["base", "sft", "dapo"]
    assert data["dapo"]["datasets"]["aime_2025"]["mean@k"] == 0.75
    assert data["sft"]["checkpoint"]["step"] == 6
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "# Comparison: base vs sft vs dapo" in md and "| dapo | `dapo-e-step9` | 4 | 75.0%" in md


def test_progress_report_across_steps(tmp_path: Path):
    root = tmp_path / "eval"
    fake_eval(root / "base", CheckpointRef("base", Path("/m"), "base"), 0)  # no step: skipped
    for step, right in ((20, 1), (40, 2), (10, 0)):
        label = f"dapo-e-step{step}"
        fake_eval(root / label, CheckpointRef(label, Path("/d"), "dapo", "e", step), right)
    fake_eval(root / "dapo-other-step5", CheckpointRef("x", Path("/o"), "dapo", "other", 5), 4)
    files = report.write_progress_report(sorted(root.iterdir()), tmp_path / "prog", experiment="e")
    assert [f.name for f in files] == ["progress.md", "progress.json", "progress.png"]
    assert_png(files[2])
    data = json.loads(files[1].read_text())
    points = data["aime_2024"]["dapo/e"]
    assert [p["step"] for p in points] == [10, 20, 40]
    assert [p["mean@k"] for p in points] == [0.0, 0.25, 0.5]
    assert "dapo/other" not in data["aime_2024"]


def test_compare_and_progress_cli(tmp_path: Path, capsys):
    root = tmp_path / "eval"
    a = fake_eval(root / "sft-e-step1", CheckpointRef("sft-e-step1", Path("/s"), "sft", "e", 1), 1)
    b = fake_eval(root / "sft-e-step2", CheckpointRef("sft-e-step2", Path("/s"), "sft", "e", 2), 2)
    assert (
        main(
            [
                "compare",
                "--result",
                f"one={a}",
                "--result",
                f"two={b}",
                "--out-dir",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    assert_png(tmp_path / "c" / "compare.png")
    assert main(["progress", "--eval-root", str(root), "--out-dir", str(tmp_path / "p")]) == 0
    assert_png(tmp_path / "p" / "progress.png")
