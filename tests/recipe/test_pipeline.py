"""Stage skipping and resumption of the SFT → DAPO → eval pipeline, on a temporary layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipe.retool.core.paths import CheckpointInfo, Layout, write_checkpoint_info
from recipe.retool.data.prep import SUMMARY_FILE
from recipe.retool.launch.commands import load_stage_config
from recipe.retool.stages.checkpoints import COMPLETE_MARKER
from recipe.retool.workflows import pipeline

SFT_MAX_LENGTH = load_stage_config("sft").overrides["data.max_length"]


class World:
    """Fake stage runners that produce each stage's real done-marker on a temp layout."""

    def __init__(self, layout: Layout, fail: dict[str, int] | None = None) -> None:
        self.layout = layout
        self.calls: list[str] = []
        self.fail = dict(fail or {})  # stage -> how many times to fail before succeeding

    def _maybe_fail(self, stage: str) -> None:
        self.calls.append(stage)
        if self.fail.get(stage, 0) > 0:
            self.fail[stage] -= 1
            raise RuntimeError(f"{stage} crashed")

    def prep(self, sft_max_length: int | None = SFT_MAX_LENGTH) -> None:
        """Prep's files; ``sft_max_length`` is what the summary says traces were filtered at."""
        self._maybe_fail("prep")
        for path in [self.layout.sft_train_file()] + [
            self.layout.rl_file(n) for n in pipeline.RL_FILES
        ]:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        summary = {"sft": {"sft_max_length": sft_max_length}}
        (self.layout.data / SUMMARY_FILE).write_text(json.dumps(summary))

    def download(self) -> None:
        self._maybe_fail("download")
        target = self.layout.model_dir()
        target.mkdir(parents=True)
        (target / COMPLETE_MARKER).write_text("rev\n")

    def train(self, stage: str) -> None:
        self._maybe_fail(stage)
        write_checkpoint_info(self.layout, CheckpointInfo("exp", stage, 1, "p", "base"))

    def evaluate(self) -> None:
        self._maybe_fail("eval")
        out = pipeline.comparison_dir(self.layout, "exp")
        out.mkdir(parents=True)
        (out / "compare.json").write_text("{}\n")

    def runners(self):
        return {
            "prep": self.prep,
            "download": self.download,
            "sft": lambda: self.train("sft"),
            "dapo": lambda: self.train("dapo"),
            "eval": self.evaluate,
        }


def run(world: World, **kwargs):
    status = lambda: pipeline.stage_done(world.layout, "exp")  # noqa: E731
    return pipeline.run_pipeline(status, world.runners(), log=lambda _: None, **kwargs)


def test_fresh_pipeline_runs_every_stage_in_order(tmp_path: Path) -> None:
    world = World(Layout.local(tmp_path))
    outcomes = run(world)
    assert [o.action for o in outcomes] == ["ran"] * 5
    assert world.calls == list(pipeline.PIPELINE_STAGES)
    assert all(pipeline.stage_done(world.layout, "exp").values())


def test_second_run_skips_everything(tmp_path: Path) -> None:
    world = World(Layout.local(tmp_path))
    run(world)
    world.calls.clear()
    outcomes = run(world)
    assert world.calls == []
    assert {o.action for o in outcomes} == {"skipped (done)"}


def test_interrupted_pipeline_resumes_at_the_failed_stage(tmp_path: Path) -> None:
    world = World(Layout.local(tmp_path), fail={"dapo": 1})
    first = run(world)
    assert [o.stage for o in first] == ["download", "prep", "sft", "dapo"]
    assert first[-1].action.startswith("failed: dapo crashed")
    world.calls.clear()
    second = run(world)
    assert world.calls == ["dapo", "eval"]
    assert [o.action for o in second] == ["skipped (done)"] * 3 + ["ran", "ran"]


def test_download_comes_before_prep_so_prep_can_count_tokens() -> None:
    order = pipeline.PIPELINE_STAGES
    assert order.index("download") < order.index("prep") < order.index("sft")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert readme.index("::download_model ") < readme.index("::prep_dataset ")


@pytest.mark.parametrize("filtered_at", [None, SFT_MAX_LENGTH // 2])
def test_data_prepared_without_the_length_filter_is_prepared_again(
    tmp_path: Path, filtered_at
) -> None:
    """Data prepped before the model arrived (no tokenizer: no filter), or at another limit."""
    world = World(Layout.local(tmp_path))
    world.prep(sft_max_length=filtered_at)
    assert not pipeline.stage_done(world.layout, "exp")["prep"]
    world.calls.clear()
    outcomes = run(world)
    assert world.calls[:2] == ["download", "prep"]
    assert [o.action for o in outcomes[:2]] == ["ran", "ran"]
    assert pipeline.stage_done(world.layout, "exp")["prep"]


def test_prep_records_the_length_filter_it_ran(tmp_path: Path) -> None:
    from recipe.retool.data.prep import prepare, sft_length_checked
    from recipe.retool.data.tiny_model import build_tokenizer
    from recipe.retool.local import samples

    sources = samples.write_sources(tmp_path / "src")
    out = tmp_path / "data"
    prepare(out, only=["sft"], source_dir=sources, on_error="skip", show=False)
    assert sft_length_checked(out) is None
    tokenizer = tmp_path / "tok"
    build_tokenizer(1024).save_pretrained(tokenizer)
    prepare(out, only=["sft"], source_dir=sources, on_error="skip", show=False,
            tokenizer=tokenizer, sft_max_length=SFT_MAX_LENGTH)  # fmt: skip
    assert sft_length_checked(out) == SFT_MAX_LENGTH
    assert json.loads((out / SUMMARY_FILE).read_text())["sft"]["tokenizer"] == str(tokenizer)


def test_a_stage_that_returns_without_its_marker_is_not_done(tmp_path: Path) -> None:
    world = World(Layout.local(tmp_path))
    runners = world.runners() | {"sft": lambda: None}
    status = lambda: pipeline.stage_done(world.layout, "exp")  # noqa: E731
    outcomes = pipeline.run_pipeline(status, runners, log=lambda _: None)
    assert outcomes[-1] == pipeline.StageOutcome("sft", "failed: finished without its done marker")


def test_forced_stages_rerun_and_unknown_ones_are_rejected(tmp_path: Path) -> None:
    world = World(Layout.local(tmp_path))
    run(world)
    world.calls.clear()
    pipeline.comparison_dir(world.layout, "exp").joinpath("compare.json").unlink()
    pipeline.comparison_dir(world.layout, "exp").rmdir()
    run(world, force=("eval",))
    assert world.calls == ["eval"]
    with pytest.raises(ValueError, match="unknown stage"):
        run(world, force=("ppo",))


def test_status_is_readable(tmp_path: Path) -> None:
    text = pipeline.format_status(pipeline.stage_done(Layout.local(tmp_path), "exp"))
    assert text.splitlines()[0].split() == ["download", "pending"]
    assert len(text.splitlines()) == 5


@pytest.mark.slow
def test_evaluate_experiment_compares_base_sft_and_dapo(tmp_path, tiny_model_dir, local_endpoint):
    """The eval stage for real (tiny model, HF generation, local sandbox); finished ones skip."""
    import shutil

    from recipe.retool.data.prep import prepare
    from recipe.retool.eval.config import EvalConfig
    from recipe.retool.local import samples
    from tests.recipe.test_paths import mark_tracked

    layout = Layout.local(tmp_path)
    shutil.copytree(tiny_model_dir, layout.model_dir())
    for stage in ("sft", "dapo"):
        step = layout.experiment_dir(stage, "exp") / "global_step_3"
        shutil.copytree(
            tiny_model_dir, step / ("huggingface" if stage == "sft" else "actor/huggingface")
        )
        mark_tracked(layout, stage, "exp", 3)
    prepare(layout.data, only=["val"], source_dir=samples.write_sources(tmp_path / "src"),
            show=False)  # fmt: skip
    cfg = EvalConfig(n=1, max_problems=1, max_response_tokens=16, max_assistant_turns=1)
    files = pipeline.evaluate_experiment(layout, "exp", local_endpoint + "/run_code", cfg)
    out = pipeline.comparison_dir(layout, "exp")
    assert {f.name for f in files} == {"compare.md", "compare.json", "compare.png"}
    assert set(json.loads((out / "compare.json").read_text())) == {"base", "sft", "dapo"}
    assert pipeline.stage_done(layout, "exp")["eval"]
    stamp = (out / "sft" / "summary.json").stat().st_mtime_ns
    pipeline.evaluate_experiment(layout, "exp", local_endpoint + "/run_code", cfg)
    assert (out / "sft" / "summary.json").stat().st_mtime_ns == stamp  # not evaluated again


def test_the_pipelines_dapo_starts_from_its_own_sft_and_crosses_as_arguments() -> None:
    from recipe.retool.core.request import parse
    from recipe.retool.workflows.pipeline import training_requests

    sft, dapo = training_requests("retool-7b")
    assert sft.to_argv() == ["--experiment-name=retool-7b"]
    assert dapo.to_argv() == ["--experiment-name=retool-7b", "--sft-checkpoint=retool-7b"]
    assert parse("dapo", dapo.to_argv()) == dapo
