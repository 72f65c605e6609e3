"""Evaluation end to end on CPU: verl's ToolAgentLoop, a real local sandbox, the real reward.

Data: the AIME fixtures in the hub schemas (2 problems per year) through ``prep``. Generation:
the tiny random model via HF ``generate`` (it is never right; the pipeline still runs), and
``ScriptedServer`` with known turns so exact metric values can be asserted.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from recipe.retool.core.constants import TOOL_NAME
from recipe.retool.core.paths import Layout
from recipe.retool.data import prep
from recipe.retool.eval.__main__ import main
from recipe.retool.eval.agent_loop import build_tools
from recipe.retool.eval.checkpoints import CheckpointRef, resolve_checkpoint
from recipe.retool.eval.config import CONFIG_FILE, EvalConfig, EvalError
from recipe.retool.eval.problems import load_problems
from recipe.retool.eval.runner import evaluate_checkpoint
from recipe.retool.local.samples import write_sources
from recipe.retool.local.scripted_server import ScriptedServer
from sandbox.client import TOKEN_ENV
from sandbox.local import sandbox_service
from tests.recipe.test_paths import write_weights

SUMMARY_KEYS = {"checkpoint", "backend", "config", "out_dir", "files", "wall_s", "datasets"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """``<data>/rl/aime_{2024,2025}.parquet`` from the hub-schema fixtures (2 problems each)."""
    root = tmp_path_factory.mktemp("eval-data")
    prep.prepare(root / "data", only=["val"], source_dir=write_sources(root / "src"), show=False)
    return root / "data"


def datasets(data_dir: Path, *names: str) -> dict[str, Path]:
    return {name: data_dir / "rl" / f"{name}.parquet" for name in names}


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def test_eval_yaml_holds_the_paper_defaults():
    assert CONFIG_FILE.read_text().startswith("# ")
    assert "python -m recipe.retool.eval " in CONFIG_FILE.read_text().split("\n\n")[0]
    assert EvalConfig.from_yaml() == EvalConfig()
    assert set(yaml.safe_load(CONFIG_FILE.read_text())) == set(EvalConfig.__dataclass_fields__)
    cfg = EvalConfig()
    paper = (cfg.n, cfg.temperature, cfg.top_p, cfg.max_response_tokens, cfg.max_assistant_turns)
    assert paper == (32, 1.0, 0.7, 16384, 16)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"n": 0}, "n must be"), ({"top_p": 0}, "top_p"), ({"bogus": 1}, "unknown eval config")],
)
def test_bad_settings_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig.from_dict(change)


# ---------------------------------------------------------------------------------------------
# What gets evaluated
# ---------------------------------------------------------------------------------------------


def fake_model(path: Path, weights: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if weights:
        write_weights(path)
    return path


def fake_step(layout: Layout, stage: str, exp: str, step: int) -> Path:
    hf = layout.experiment_dir(stage, exp) / f"global_step_{step}"
    hf = hf / ("huggingface" if stage == "sft" else "actor/huggingface")
    fake_model(hf)
    (layout.experiment_dir(stage, exp) / "latest_checkpointed_iteration.txt").write_text(str(step))
    return hf


def test_resolve_checkpoint(tmp_path: Path):
    layout = Layout.local(tmp_path)
    with pytest.raises(EvalError, match="no complete DAPO or SFT checkpoint"):
        resolve_checkpoint("latest", layout)
    fake_model(layout.model_dir())
    assert resolve_checkpoint("base", layout) == CheckpointRef("base", layout.model_dir(), "base")

    sft = fake_step(layout, "sft", "cold", 62)
    assert resolve_checkpoint("latest", layout) == CheckpointRef(
        "sft-cold-step62", sft, "sft", "cold", 62
    )
    dapo = fake_step(layout, "dapo", "rl", 20)
    latest = resolve_checkpoint("latest", layout)
    assert (latest.label, latest.path, latest.step) == ("dapo-rl-step20", dapo, 20)
    assert resolve_checkpoint("sft", layout).path == sft
    # a step directory resolves to its HF weights and keeps stage, experiment and step
    by_path = resolve_checkpoint(str(dapo.parents[1]), layout)
    assert by_path == CheckpointRef("dapo-rl-step20", dapo, "dapo", "rl", 20)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "no checkpoint directory"),
        (lambda p: p.mkdir() or p, "has no Hugging Face weights"),
        (lambda p: fake_model(p, weights=False), "merge the checkpoint first"),
    ],
)
def test_bad_checkpoint_paths_are_one_line_errors(tmp_path: Path, make, message):
    path = make(tmp_path / "ckpt")
    with pytest.raises(EvalError, match=message):
        resolve_checkpoint(str(path), Layout.local(tmp_path))


def test_load_problems(data_dir: Path, tmp_path: Path):
    problems = load_problems(data_dir / "rl" / "aime_2024.parquet")
    assert [(p.source_id, p.ground_truth) for p in problems] == [
        ("2024-I-1", "25"),
        ("2024-II-4", "32"),
    ]
    assert problems[0].messages[0]["role"] == "user" and TOOL_NAME in problems[0].tools_kwargs
    assert len(load_problems(data_dir / "rl" / "aime_2024.parquet", max_problems=1)) == 1
    with pytest.raises(EvalError, match="not found; run prep"):
        load_problems(tmp_path / "nope.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(EvalError, match="missing columns"):
        load_problems(tmp_path / "bad.parquet")


def test_tools_are_the_training_tool_pointed_at_the_sandbox():
    from recipe.retool.verl_plugins.tools import CodeInterpreterTool

    (tool,) = build_tools(EvalConfig(tool_timeout_s=10), "http://sandbox.test:1234")
    assert isinstance(tool, CodeInterpreterTool) and tool.name == TOOL_NAME
    assert (tool.settings.default_timeout, tool.client.url) == (
        10,
        "http://sandbox.test:1234/run_code",
    )
    (default,) = build_tools(EvalConfig(), "http://sandbox.test:1234")
    assert default.settings.default_timeout == 30  # the training yaml's


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def call(code: str) -> str:
    return (
        f"<tool_call>\n{json.dumps({'name': TOOL_NAME, 'arguments': {'code': code}})}\n</tool_call>"
    )


def test_scripted_rollouts_give_exact_metrics(
    data_dir: Path, tmp_path: Path, local_endpoint: str, tiny_model_dir: Path, tiny_tokenizer
):
    # One worker: rollouts run dataset-major, problem-major, sample-minor, so the script lines up.
    script = [
        # aime_2024 (25, 32): sample 0 uses the tool, sample 1's code raises, then both answer.
        call("5 * 5"),
        "The tool says 25, so \\boxed{25}.",
        call("1 / 0"),
        "Despite the error: \\boxed{25}",
        "No tool needed: \\boxed{32}",
        "A slip: \\boxed{31}",
        # aime_2025 (70, 42): every sample right, one tool call each.
        *[
            turn
            for answer in ("70", "70", "42", "42")
            for turn in (call(f"print({answer})"), f"\\boxed{{{answer}}}")
        ],
    ]
    server = ScriptedServer(script, tiny_tokenizer)
    cfg = EvalConfig(n=2, max_response_tokens=512, max_concurrency=1)
    out = tmp_path / "out"
    summary = evaluate_checkpoint(
        tiny_model_dir,
        datasets(data_dir, "aime_2024", "aime_2025"),
        out,
        cfg,
        local_endpoint,
        backend=server,
    )
    assert len(server.calls) == len(script)
    assert set(summary) == SUMMARY_KEYS and summary["backend"] == "ScriptedServer"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert sorted(Path(f).name for f in summary["files"]) == sorted(p.name for p in out.iterdir())

    easy = summary["datasets"]["aime_2025"]
    assert (easy["mean@k"], easy["maj@k"], easy["pass@k"]) == (1.0, 1.0, {"1": 1.0, "2": 1.0})
    assert (easy["mean_tool_turns"], easy["tool_calls"], easy["tool_error_rate"]) == (1.0, 4, 0.0)

    mixed = summary["datasets"]["aime_2024"]
    assert mixed["mean@k"] == 0.75  # problem 0: 2/2, problem 1: 1/2
    assert mixed["pass@k"] == {"1": 0.75, "2": 1.0}
    assert mixed["maj@k"] == 0.75  # problem 1 is a 32-vs-31 tie: 0.5
    assert (mixed["tool_calls"], mixed["tool_errors"], mixed["tool_error_rate"]) == (2, 1, 0.5)
    assert mixed["tool_failure_rate"] == 0.0  # the model's code raised; the tool worked
    assert mixed["mean_tool_turns"] == 0.5 and mixed["no_answer_rate"] == 0.0

    data = json.loads((out / "eval_aime_2024.json").read_text())
    first = data["per_problem"][0]
    assert (first["num_correct"], first["majority_answer"], first["tool_error_rate"]) == (
        2,
        "25",
        0.5,
    )
    samples = [
        json.loads(line) for line in (out / "samples_aime_2024.jsonl").read_text().splitlines()
    ]
    assert [s["tool_statuses"] for s in samples] == [["Success"], ["Failed"], [], []]
    assert "ZeroDivisionError" in samples[1]["response"]  # the sandbox's real traceback
    assert "| aime_2025 | 2 | 100.0%" in (out / "report.md").read_text()


def test_cli_with_the_tiny_model_and_hf_generation(
    data_dir: Path, tmp_path: Path, local_endpoint: str, tiny_model_dir: Path, capsys
):
    out = tmp_path / "out"
    argv = [
        "--checkpoint",
        str(tiny_model_dir),
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(out),
        "--n",
        "2",
        "--max-new-tokens",
        "24",
        "--backend",
        "hf",
        "--sandbox-url",
        local_endpoint,
    ]
    assert main(argv) == 0
    assert "| aime_2024 | 2 |" in capsys.readouterr().out
    for name in ("aime_2024", "aime_2025"):
        data = json.loads((out / f"eval_{name}.json").read_text())
        overall = data["overall"]
        assert (overall["num_problems"], overall["num_samples"], overall["k"]) == (2, 4, 2)
        assert 0.0 <= overall["mean@k"] <= 1.0 and overall["rollout_errors"] == 0
        assert 0 < overall["mean_response_tokens"] <= 24
        assert data["config"]["max_response_tokens"] == 24 and data["backend"] == "hf"
    assert (out / "report.md").is_file()


def test_cli_latest_writes_under_the_checkpoints_layout(
    data_dir: Path, tmp_path: Path, local_endpoint: str, tiny_model_dir: Path, capsys
):
    layout = Layout.local(tmp_path)
    hf = layout.experiment_dir("dapo", "rl") / "global_step_20" / "actor" / "huggingface"
    shutil.copytree(tiny_model_dir, hf)
    (hf.parents[2] / "latest_checkpointed_iteration.txt").write_text("20")
    argv = [
        "--checkpoint",
        "latest",
        "--root",
        str(tmp_path),
        "--data-dir",
        str(data_dir),
        "--datasets",
        "aime_2025",
        "--n",
        "1",
        "--max-problems",
        "1",
        "--max-new-tokens",
        "8",
        "--sandbox-url",
        f"{local_endpoint}/run_code",  # the tool's URL form works too
    ]
    assert main(argv) == 0
    result = layout.checkpoints / "eval" / "dapo-rl-step20"
    ckpt = json.loads((result / "eval_aime_2025.json").read_text())["checkpoint"]
    assert (ckpt["stage"], ckpt["experiment"], ckpt["step"]) == ("dapo", "rl", 20)
    progress = layout.checkpoints / "eval" / "progress-dapo-rl"
    assert (progress / "progress.png").read_bytes()[:4] == b"\x89PNG"

    # Evaluating it again never replaces the report: refused, or (--force) written beside it.
    first = (result / "eval_aime_2025.json").read_bytes()
    assert main([*argv, "--n", "2"]) == 2
    assert "already holds a report; pass --force" in capsys.readouterr().err
    assert main([*argv, "--n", "2", "--force"]) == 0
    assert (result / "eval_aime_2025.json").read_bytes() == first
    (again,) = layout.checkpoints.glob("eval/dapo-rl-step20@*")
    assert json.loads((again / "eval_aime_2025.json").read_text())["config"]["n"] == 2
    index = [json.loads(line) for line in (layout.checkpoints / "eval" / "index.jsonl")
             .read_text().splitlines()]  # fmt: skip
    assert [(e["report"], e["n"], e["max_problems"]) for e in index] == [
        ("dapo-rl-step20", 1, 1), (again.name, 2, 1)
    ]  # fmt: skip
    assert index[1]["checkpoint"]["path"] == str(hf) and "aime_2025" in index[1]["mean@k"]
    points = json.loads((progress / "progress.json").read_text())["aime_2025"]["dapo/rl"]
    assert [(p["step"], p["num_samples"]) for p in points] == [(20, 2)]  # the newest, once


def test_unreachable_sandbox_is_one_line(data_dir, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """(The other CLI mistakes are rows of tests/test_cli_mistakes.py; this one waits for the
    sandbox, 60 s, unless the wait is cut short in-process.)"""
    import recipe.retool.eval.runner as evaluate

    monkeypatch.setattr(evaluate, "check_sandbox", _no_sandbox)
    argv = ["--checkpoint", str(tiny_model_dir), "--data-dir", str(data_dir),
            "--out-dir", str(tmp_path / "o"), "--sandbox-url", "http://127.0.0.1:9"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "sandbox at http://127.0.0.1:9 is not answering" in err


def _no_sandbox(url: str, wait_s: float = 0) -> None:
    raise EvalError(f"sandbox at {url} is not answering (test)")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_backend_without_vllm_is_a_one_line_error(data_dir, tmp_path, tiny_model_dir, capsys):
    argv = [
        "--checkpoint",
        str(tiny_model_dir),
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(tmp_path / "o"),
        "--backend",
        "vllm",
    ]
    assert main(argv) == 2
    assert "needs vLLM" in capsys.readouterr().err


@pytest.mark.gpu
def test_vllm_backend_evaluates_a_small_model(
    data_dir: Path, tmp_path: Path, local_endpoint: str, vllm_model_dir: Path
):
    """The production generation path: vLLM's AsyncLLM under verl's tool agent loop."""
    cfg = EvalConfig(n=2, max_problems=1, max_response_tokens=64, max_assistant_turns=2,
                     gpu_memory_utilization=0.3)  # fmt: skip
    out = tmp_path / "vllm"
    summary = evaluate_checkpoint(
        vllm_model_dir, datasets(data_dir, "aime_2024"), out, cfg, local_endpoint, "vllm"
    )
    overall = summary["datasets"]["aime_2024"]
    assert summary["backend"] == "vllm" and (out / "summary.json").is_file()
    assert (overall["num_samples"], overall["rollout_errors"]) == (2, 0)
    assert 0 < overall["mean_generated_tokens"] <= 64


def test_crashed_rollouts_are_reported_and_fail_the_run(
    data_dir: Path, tmp_path: Path, local_endpoint: str, tiny_model_dir: Path, tiny_tokenizer
):
    cfg = EvalConfig(n=2, max_problems=1, max_concurrency=1)
    files = datasets(data_dir, "aime_2024")
    broken = ScriptedServer([], tiny_tokenizer)  # every generate() raises
    with pytest.raises(EvalError, match="2/2 rollouts crashed"):
        evaluate_checkpoint(tiny_model_dir, files, tmp_path / "a", cfg, local_endpoint, broken)
    assert (tmp_path / "a" / "eval_aime_2024.json").is_file()
    assert not (tmp_path / "a" / "summary.json").exists()  # not marked complete

    tolerant = cfg.replace(max_rollout_error_rate=1.0)
    summary = evaluate_checkpoint(
        tiny_model_dir, files, tmp_path / "b", tolerant, local_endpoint, broken
    )
    overall = summary["datasets"]["aime_2024"]
    assert (overall["rollout_errors"], overall["mean@k"]) == (2, 0.0)


def test_evaluation_cuts_tool_responses_like_dapo_training():
    from recipe.retool.eval.agent_loop import loop_config, training_tool_response_length

    cfg = loop_config(EvalConfig())
    assert cfg.actor_rollout_ref.rollout.multi_turn.max_tool_response_length == (
        training_tool_response_length()
    )
    assert training_tool_response_length() == 4608


# ---------------------------------------------------------------------------------------------
# A broken tool: a sandbox that refuses this process's token
# ---------------------------------------------------------------------------------------------

SANDBOX_TOKEN = "eval-test-token"


@pytest.fixture(scope="module")
def guarded_sandbox() -> Iterator[str]:
    env = {TOKEN_ENV: SANDBOX_TOKEN, "SANDBOX_SLOTS": "2"}
    with sandbox_service("--allow-insecure", "--log-level", "warning", env=env) as base:
        yield base


@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "HTTP 401.*SANDBOX_API_TOKEN is not set"),
     ("wrong", "HTTP 401.*SANDBOX_API_TOKEN is not its token"), (SANDBOX_TOKEN, None)],
)  # fmt: skip
def test_the_start_up_check_runs_code_with_the_tools_token(
    guarded_sandbox: str, monkeypatch, token, message
):
    from recipe.retool.eval.runner import check_sandbox

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    if token:
        monkeypatch.setenv(TOKEN_ENV, token)
    if message is None:
        check_sandbox(guarded_sandbox)  # ran the probe and read its output back
        return
    with pytest.raises(EvalError, match=message) as exc:
        check_sandbox(guarded_sandbox)
    assert "\n" not in str(exc.value)


def test_a_missing_token_fails_the_cli_in_one_line(
    data_dir: Path, tmp_path: Path, tiny_model_dir: Path, guarded_sandbox: str, capsys, monkeypatch
):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    argv = ["--checkpoint", str(tiny_model_dir), "--data-dir", str(data_dir),
            "--out-dir", str(tmp_path / "o"), "--sandbox-url", guarded_sandbox]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SANDBOX_API_TOKEN is not set" in err
    assert not (tmp_path / "o").exists()  # refused before any rollout


def test_a_run_whose_tool_breaks_fails_and_records_the_failure_rate(
    data_dir: Path, tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer, guarded_sandbox: str,
    monkeypatch,
):  # fmt: skip
    import recipe.retool.eval.runner as evaluate

    # The sandbox passed its start-up check, then stopped taking this process's token.
    monkeypatch.setattr(evaluate, "check_sandbox", lambda url: None)
    monkeypatch.setenv(TOKEN_ENV, "rotated")
    script = [call("print(25)"), "\\boxed{25}"] * 2
    cfg = EvalConfig(n=2, max_problems=1, max_concurrency=1, max_response_tokens=512)
    files = datasets(data_dir, "aime_2024")
    server = ScriptedServer(script, tiny_tokenizer)
    with pytest.raises(EvalError) as exc:
        evaluate_checkpoint(tiny_model_dir, files, tmp_path / "a", cfg, guarded_sandbox, server)
    assert str(exc.value).startswith(f"the sandbox at {guarded_sandbox} failed to run 2/2 tool "
                                     "calls (100%, over max_tool_failure_rate=0.2)")  # fmt: skip
    overall = json.loads((tmp_path / "a" / "eval_aime_2024.json").read_text())["overall"]
    assert (overall["tool_failures"], overall["tool_failure_rate"]) == (2, 1.0)
    assert not (tmp_path / "a" / "summary.json").exists()  # not marked complete

    tolerant = cfg.replace(max_tool_failure_rate=1.0)
    server = ScriptedServer(script, tiny_tokenizer)
    summary = evaluate_checkpoint(
        tiny_model_dir, files, tmp_path / "b", tolerant, guarded_sandbox, server
    )
    assert summary["datasets"]["aime_2024"]["tool_failure_rate"] == 1.0
