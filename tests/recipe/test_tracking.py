"""wandb: the credential check before any GPU, one run id per experiment, the offline directory."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from recipe.retool.core.paths import Layout
from recipe.retool.core.request import LaunchError, LaunchRequest
from recipe.retool.core.topology import Topology
from recipe.retool.launch.check import main
from recipe.retool.records import tracking
from recipe.retool.stages.dapo import run_dapo
from tests.recipe.test_paths import make_step, mark_tracked
from tests.recipe.test_stages import LoggingRunner, layout  # noqa: F401  (a fixture)

SECRET = "wandb-secret-value-4242"


@pytest.fixture
def no_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A machine without wandb credentials: nothing in the environment, an empty ``.env``."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    dotenv = tmp_path / ".env"
    dotenv.write_text("# nothing yet\nHF_TOKEN=\n")
    monkeypatch.setattr(tracking, "DOTENV", dotenv)
    return dotenv


def test_launch_check_without_a_key_is_one_line_and_exit_2(no_wandb, capsys) -> None:
    assert main(["check", "dapo", "--gpus", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "WANDB_API_KEY" in err and "WANDB_MODE=offline" in err


@pytest.mark.parametrize("stage", ["sft", "dapo"])
def test_offline_mode_or_a_key_in_dotenv_passes_and_the_key_is_never_printed(
    no_wandb, monkeypatch, capsys, stage
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["check", stage]) == 0
    monkeypatch.delenv("WANDB_MODE")
    no_wandb.write_text(f"WANDB_API_KEY='{SECRET}'\n")
    assert main(["check", stage]) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err


def test_a_run_that_does_not_log_to_wandb_needs_no_key(no_wandb) -> None:
    assert main(["check", "dapo", "trainer.logger=[console,file]"]) == 0


def test_train_dapo_fails_before_the_trainer_starts(no_wandb, layout: Layout) -> None:  # noqa: F811
    make_step(layout, "sft", "s1", 4)
    mark_tracked(layout, "sft", "s1", 4)
    runner = LoggingRunner(layout, "dapo", [[(1, {})]], returncodes=[0])
    with pytest.raises(LaunchError, match="WANDB_API_KEY"):
        run_dapo(layout, Topology(gpus_per_node=4), LaunchRequest("dapo", experiment="d"),
                        sandbox_url="http://sb/run_code", runner=runner)  # fmt: skip
    assert runner.envs == []  # nothing ran


def test_run_ids_are_stable_and_valid_for_wandb() -> None:
    assert tracking.run_id("dapo", "retool-7b") == "dapo-retool-7b"
    odd = tracking.run_id("dapo", "my exp:v2?")
    assert odd == tracking.run_id("dapo", "my exp:v2?")
    assert not set(odd) & set("/\\#?%: ")
    assert odd != tracking.run_id("dapo", "my exp-v2-")  # sanitised names stay apart
    assert len(tracking.run_id("sft", "x" * 300)) <= 96


class FakeWandb(types.ModuleType):
    """What verl's Tracking calls, recording the run identity wandb would take from the
    environment (WANDB_RUN_ID / WANDB_RESUME / WANDB_DIR, as wandb.init reads them)."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict[str, str | None]] = []

    def init(self, **kwargs):
        import os

        self.inits.append({k: os.environ.get(k) for k in ("WANDB_RUN_ID", "WANDB_RESUME",
                                                         "WANDB_DIR")} | kwargs)  # fmt: skip
        return self

    def finish(self, exit_code: int = 0) -> None:
        """verl's Tracking finishes the run when it is collected."""


class VerlTrackingRunner(LoggingRunner):
    """Each attempt starts verl's own ``Tracking`` with the wandb backend, in the environment the
    stage hands main_ppo, then logs its rows and saves a checkpoint like verl."""

    def __call__(self, command, env) -> int:
        from verl.utils.tracking import Tracking

        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            Tracking("retool-dapo", "d", default_backend=["wandb"])
        return super().__call__(command, env)


def test_every_attempt_of_an_experiment_continues_one_wandb_run(
    layout: Layout,  # noqa: F811
    monkeypatch,
    attempt_clock,
) -> None:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    make_step(layout, "sft", "s1", 4)
    mark_tracked(layout, "sft", "s1", 4)
    attempts = [[(1, {"critic/score/mean": 0.1})], [(2, {"critic/score/mean": 0.2})]]
    runner = VerlTrackingRunner(layout, "dapo", attempts, returncodes=[1, 0])
    for _ in attempts:  # a failed attempt, then its retry
        run_dapo(layout, Topology(gpus_per_node=4), LaunchRequest("dapo", experiment="d"),
                        sandbox_url="http://sb/run_code", runner=runner)  # fmt: skip
    first, retry = fake.inits
    assert first["WANDB_RUN_ID"] == retry["WANDB_RUN_ID"] == tracking.run_id("dapo", "d")
    assert first["WANDB_RESUME"] == retry["WANDB_RESUME"] == "allow"
    assert first["WANDB_DIR"] == str(layout.checkpoints / "wandb")  # the checkpoints volume
    assert Path(first["WANDB_DIR"]).is_dir()
    metrics_files = {env["VERL_FILE_LOGGER_PATH"] for env in runner.envs}
    assert len(metrics_files) == 2  # while each attempt keeps its own metrics file


def test_results_are_logged_only_where_wandb_is_configured(tmp_path, monkeypatch, capsys) -> None:
    class Run:
        def __init__(self) -> None:
            self.summary: dict = {}
            self.logged: list = []
            self.finished = False

        def log(self, data) -> None:
            self.logged.append(data)

        def finish(self) -> None:
            self.finished = True

    fake = types.ModuleType("wandb")
    runs: list[tuple[dict, Run]] = []
    fake.init = lambda **kw: runs.append((kw, Run())) or runs[-1][1]
    fake.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    local = Layout.local(tmp_path)
    png = tmp_path / "x.png"
    png.write_bytes(b"png")
    args = {"project": "retool-eval", "run": "eval-sft-a", "metrics": {"aime_2024/mean@k": 0.5},
            "images": {"progress": png}}  # fmt: skip
    assert tracking.log_results(local, env={}, **args) is None
    assert "not configured" in capsys.readouterr().out and runs == []
    url = tracking.log_results(local, env={"WANDB_API_KEY": "k", "WANDB_ENTITY": "me"}, **args)
    assert url == "https://wandb.ai/me/retool-eval/runs/eval-sft-a"
    ((kwargs, run),) = runs
    assert kwargs["id"] == "eval-sft-a" and kwargs["resume"] == "allow"
    assert kwargs["dir"] == str(tmp_path / "checkpoints" / "wandb")
    assert run.summary == {"aime_2024/mean@k": 0.5}
    assert run.logged == [{"progress": ("image", str(png))}] and run.finished
