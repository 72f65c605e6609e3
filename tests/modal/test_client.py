"""The client side, as a user has it after the README's and the seed's ``pip install modal``: every
app file imports, and every ``modal run`` / ``modal deploy`` command the README, the Makefile or
the seed names gets through modal's own CLI to the calls it makes on Modal (recorded here)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.modal import harness
from tests.modal.conftest import APP_FILES

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]

# The seed's quick start, verbatim (issue 32); its `pip install modal` is harness.client_venv.
SEED = """\
pip install modal
modal setup
cp recipe/retool/env.example .env
modal run recipe/retool/retool_modal_sft.py::prep_dataset
modal run recipe/retool/retool_modal_sft.py::download_model
modal run recipe/retool/retool_modal_sft.py::train
modal deploy recipe/retool/modal_fusion_sandbox.py
modal run recipe/retool/retool_modal_sft.py::train_dapo
"""
# Make targets that run modal (`make -n` prints their command lines).
MAKE_TARGETS = ("sft", "dapo", "eval", "pipeline", "status", "results", "wandb-sync",
                "deploy-sandbox", "serve", "checkpoints")  # fmt: skip
_COMMAND = re.compile(r"((?:[A-Z_]+=\S+ )*)(?:\S*/)?modal ((?:run|deploy) [^`#\n]*)")


def commands(text: str) -> list[str]:
    """``VAR=x modal run FILE::fn ARGS`` commands in ``text`` (code blocks and inline code; a
    trailing ``# comment`` dropped, elided ones like ``...::train`` skipped)."""
    found = []
    for env, command in _COMMAND.findall(text):
        if "recipe/" in command and "..." not in command:
            found.append(f"{env}modal {command}".strip())
    return found


def make_commands() -> list[str]:
    out = subprocess.run(["make", "-n", *MAKE_TARGETS, "PY=python"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return commands(out)


ALL = sorted({*commands(SEED), *commands((REPO / "README.md").read_text()), *make_commands()})
# What each entry point or function reaches Modal with: the launches check first, then spawn
# the GPU function and wait on it.
LAUNCHES = {"train": "train_gpu", "train_dapo": "train_dapo_gpu", "evaluate": "evaluate_gpu",
            "train_multinode": "train_multinode_gpu", "pipeline": "pipeline_run",
            "train_dapo_multinode": "train_dapo_multinode_gpu"}  # fmt: skip
REMOTE_ENTRYPOINTS = {"results": "result_files", "test_single_request": "run_snippet"}
RETURNS = {
    "check_launch": {"error": None, "lines": ["ok: checked"], "experiment": None,
                     "project": "retool-sft"},
    "run_snippet": {"endpoint": "https://sandbox.modal.run/run_code", "status": "Success",
                    "run_status": "Finished", "latency_ms": 7, "stdout": "4\n", "stderr": "",
                    "ok": True},
    "result_files": {},
}  # fmt: skip


def split(command: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words[: words.index("modal")])
    return env, words[words.index("modal") + 1 :]


def test_the_commands_cover_the_seed_the_readme_and_the_makefile() -> None:
    refs = {c.split()[c.split().index("modal") + 1 :][-1] for c in ALL}
    assert len(ALL) >= 15
    for name in ("prep_dataset", "download_model", "train", "train_dapo", "evaluate",
                 "pipeline", "results", "test_single_request"):  # fmt: skip
        assert any(f"::{name}" in c for c in ALL), name
    assert {f"modal deploy {APP_FILES[k]}" for k in ("sandbox", "serve")} <= set(ALL), refs


@pytest.mark.parametrize("name", sorted(APP_FILES))
def test_each_app_file_imports_with_modal_alone_as_a_top_level_module(checkout, name) -> None:
    """Defect 2 of issue 32: `pip install modal` then any README command ended in
    `No module named 'yaml'` (modal_common) or 'httpx' (sandbox.client)."""
    result = harness.describe(checkout, APP_FILES[name])
    assert result.exit == 0, result.stderr[-2000:]
    stem = Path(APP_FILES[name]).stem
    assert (result.record["module"], result.record["package"]) == (stem, "")
    for spec in result.record["functions"].values():
        assert (spec["module"], spec["source_type"]) == (stem, "FILE")
        # the entry file alone at /root/<stem>.py, as modal 1.6.4 mounts a file run by path
        mounted = {remote for _, remote in spec["image"]["files"]}
        assert f"/root/{stem}.py" in mounted


def test_the_sandbox_app_mounts_its_packages_beside_the_entry_file(describe) -> None:
    files = describe("sandbox")["functions"]["serve"]["image"]["files"]
    remote = {r for _, r in files}
    assert {"/root/sandbox/api.py", "/root/recipe/retool/modal_common.py"} <= remote
    assert all(r.endswith(".py") for r in remote)  # add_local_python_source: .py files only


@pytest.mark.parametrize("command", ALL)
def test_every_named_command_runs_on_the_client(checkout, command) -> None:
    env, argv = split(command)
    ref = next(a for a in argv if a.startswith("recipe/"))
    result = harness.modal_cli(checkout, *argv, env=env, returns=RETURNS)
    assert result.exit == 0, result.stdout[-1500:] + result.stderr[-3000:]
    calls = [(c["how"], c["function"]) for c in result.calls() if c["how"] != "run_app"]
    if argv[0] == "deploy":
        assert calls == [("deploy_app", result.record["calls"][0]["function"])]
        return
    name = ref.split("::")[1]
    detached = "--detach" in argv
    if name in LAUNCHES:
        spawned = LAUNCHES[name]
        assert calls == [("remote", "check_launch"), ("spawn", spawned), ("get", spawned)]
        after = argv[argv.index("--") + 1 :] if "--" in argv else []
        assert result.calls("spawn")[0]["args"] == after  # options and overrides, untouched
        assert "logs:    modal app logs ap-harness --function-call fc-harness01" in result.stdout
    elif name in REMOTE_ENTRYPOINTS:
        assert calls == [("remote", REMOTE_ENTRYPOINTS[name])]
    else:  # a function: the CLI calls it, spawned and waited on when detached
        assert calls == ([("spawn", name), ("get", name)] if detached else [("remote", name)])


def test_the_readmes_overrides_reach_the_gpu_function_intact(checkout) -> None:
    result = harness.modal_cli(
        checkout, "run", f"{APP_FILES['sft']}::train", "--", "--experiment-name=my-exp",
        "trainer.total_epochs=5", returns=RETURNS | {"check_launch": RETURNS["check_launch"] | {
            "experiment": "my-exp"}},
    )  # fmt: skip
    assert result.exit == 0, result.stderr[-2000:]
    (check,) = result.calls("remote")
    assert check["args"] == ["sft", ["--experiment-name=my-exp", "trainer.total_epochs=5"], 1, {}]
    assert result.calls("spawn")[0]["args"] == [
        "--experiment-name=my-exp",
        "trainer.total_epochs=5",
    ]
    assert "wandb:   https://wandb.ai/harness-team/retool-sft/runs/sft-my-exp" in result.stdout


def test_a_launch_its_check_refuses_ends_in_one_line_before_any_gpu(checkout) -> None:
    refused = {"error": "unknown key 'trainer.total_epoch'; did you mean trainer.total_epochs",
               "lines": []}  # fmt: skip
    argv = ("run", f"{APP_FILES['sft']}::train_dapo", "--", "trainer.total_epoch=5")
    result = harness.modal_cli(checkout, *argv, returns={"check_launch": refused})
    assert result.exit == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {refused['error']}"
    assert "Traceback" not in result.stderr
    assert result.calls("spawn") == []


def test_a_run_that_fails_ends_the_launch_failed(checkout) -> None:
    returns = RETURNS | {"train_gpu.get": {"raise": "main_ppo exited 1"}}
    result = harness.modal_cli(checkout, "run", f"{APP_FILES['sft']}::train", returns=returns)
    assert result.exit == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: sft on 8xH100 failed: main_ppo exited 1 (modal app logs ap-harness)"
    )


def test_a_failed_sandbox_request_is_one_line(checkout) -> None:
    returns = {"run_snippet": {"error": "the sandbox is not deployed: run `modal deploy ...`"}}
    result = harness.modal_cli(checkout, "run", f"{APP_FILES['check']}::test_single_request",
                               returns=returns)  # fmt: skip
    assert result.exit == 1
    assert result.stderr.strip().splitlines() == [f"error: {returns['run_snippet']['error']}"]


def test_the_seeds_env_example_is_where_the_seed_copies_it_from(checkout) -> None:
    subprocess.run(["cp", "recipe/retool/env.example", "seed.env"], cwd=checkout.root, check=True)
    assert (checkout.root / "seed.env").read_text() == (checkout.root / ".env.example").read_text()
