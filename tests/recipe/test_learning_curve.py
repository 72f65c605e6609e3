"""`make dapo-curve`: its settings compose against verl, the kept start is checked (files and
held-out accuracy) before any DAPO, the arms (seeds + control) become rows with paired
intervals, the verdict follows the criterion, failed arms are redone, and the report is derived
from the rows."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from recipe.retool.core import paths
from recipe.retool.core.paths import Layout
from recipe.retool.core.topology import Topology
from recipe.retool.data.synthetic import SyntheticSizes
from recipe.retool.data.tiny_model import TinySpec
from recipe.retool.launch.commands import dapo_overrides, sft_overrides
from recipe.retool.launch.validation import validate
from recipe.retool.workflows.learning_curve import proof as learning_curve
from recipe.retool.workflows.learning_curve.settings import CURVE_DATA
from recipe.retool.workflows.learning_curve.stats import Band, NoStartInBand

FILES = {name: Path(f"/d/{name}.parquet") for name in ("sft", "rl_train", "rl_val")}
GPU_RUNS = Path(__file__).resolve().parents[2] / "docs" / "gpu-runs"
ROW_KEYS = {"kind", "proof", "arm", "seed", "control", "gpu", "dapo_exit", "val_acc", "rise"}
ROW_KEYS |= {"rise_ci95", "start_acc", "gpus", "sft_acc_by_step", "failed", "rise_by_step"}


def compose_arm(arm: learning_curve.Arm, settings: learning_curve.CurveSettings):
    topo = Topology(gpus_per_node=1)
    start = Path("/c/start")
    dapo = learning_curve.dapo_request(FILES, settings, start, arm, Path("/v") / arm.name)
    assert dapo.sft_checkpoint == str(start) and dapo.experiment == arm.experiment
    return validate(
        "dapo", dapo_overrides(Layout.modal(), "c", Path("/m"), topo, dapo.overrides), topo
    )


def test_settings_compose_on_one_gpu_with_the_production_dapo_config() -> None:
    topo = Topology(gpus_per_node=1)
    settings = learning_curve.CurveSettings()
    sft = learning_curve.sft_request(FILES["sft"], settings)
    cfg = validate("sft", sft_overrides(Layout.modal(), "c", Path("/m"), topo, sft.overrides), topo)
    assert cfg.trainer.save_freq == settings.sft_save_every
    cfg = compose_arm(learning_curve.Arm("seed2", 2, control=False), settings)
    assert cfg.algorithm.filter_groups.enable is True  # the production dynamic sampling
    assert list(cfg.data.val_files) == [str(FILES["rl_val"])]
    assert cfg.trainer.total_training_steps == settings.dapo_steps
    assert cfg.trainer.test_freq == settings.dapo_steps // 2  # validations at 0, half-way, end
    actor = cfg.actor_rollout_ref.actor
    # the update measured to work: lr 3e-5, 3 warm-up steps, one on-policy update a step
    assert (actor.optim.lr, actor.optim.lr_warmup_steps) == (3e-5, 3)
    assert actor.ppo_mini_batch_size == cfg.data.train_batch_size == settings.train_batch
    assert cfg.actor_rollout_ref.rollout.val_kwargs.n == settings.val_n
    assert (cfg.data.seed, cfg.actor_rollout_ref.rollout.seed) == (2, 2)
    assert cfg.trainer.validation_data_dir == "/v/seed2"
    assert cfg.trainer.val_before_train is True  # the first validation is the start's
    assert "file" in cfg.trainer.logger
    assert "shuffle_rewards_seed" not in cfg.trainer.v1.sampler.sampler_kwargs


def test_the_control_arm_differs_only_in_its_shuffled_reward() -> None:
    settings = learning_curve.CurveSettings()
    arms = learning_curve.arms(settings)
    assert [(a.name, a.seed, a.control) for a in arms] == [
        ("seed1", 1, False),
        ("seed2", 2, False),
        ("seed3", 3, False),
        ("control", 1, True),
    ]
    seed1, control = compose_arm(arms[0], settings), compose_arm(arms[-1], settings)
    assert control.trainer.v1.sampler.sampler_kwargs.shuffle_rewards_seed == 1
    # the sampler that reads the seed is the one main_ppo loads
    assert control.trainer.v1.sampler.custom_sampler.name == "BoundedDAPOReplayBuffer"
    from omegaconf import OmegaConf

    seed1, control = (OmegaConf.to_container(c) for c in (seed1, control))
    del control["trainer"]["v1"]["sampler"]["sampler_kwargs"]["shuffle_rewards_seed"]
    for key in ("validation_data_dir", "experiment_name", "default_local_dir"):
        control["trainer"][key] = seed1["trainer"][key]
    assert control == seed1
    assert [a.name for a in learning_curve.arms(replace(settings, control=False))] == [
        "seed1",
        "seed2",
        "seed3",
    ]


# ---------------------------------------------------------------------------------------------
# The proof end to end, with main_ppo replaced by what it writes and a scripted engine scoring
# the start through evaluation's real rollouts, sandbox and reward
# ---------------------------------------------------------------------------------------------

SMALL = learning_curve.CurveSettings(
    data=SyntheticSizes(sft=8, rl_train=8, rl_val=8),
    calibration_n=2,
    dapo_steps=4,
    test_freq=2,
    max_response_tokens=32,
)


class AnsweringBackend:
    """A stand-in engine that answers the held-out problem in its prompt: right for the first
    ``right[name]`` problems (in question order), where ``name`` names the checkpoint it holds
    (``start``, or the SFT step's ``global_step_N``), ``\\boxed{-1}`` for the others."""

    max_concurrency = 1

    def __init__(self, tokenizer, first: Path, right: dict[str, int]) -> None:
        from recipe.retool.data.synthetic import problems

        self.tokenizer, self.right = tokenizer, right
        self.answers = {p.question: p.answer for p in problems(SMALL.data.rl_val, seed=1)}
        self.order = sorted(self.answers)
        self.holds = self.name(first)

    @staticmethod
    def name(model_dir: Path) -> str:
        return model_dir.parent.name if model_dir.name == "huggingface" else model_dir.name

    async def load_weights(self, model_dir: Path) -> None:
        self.holds = self.name(model_dir)

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        prompt = self.tokenizer.decode(prompt_ids)
        question = next(q for q in self.answers if q in prompt)
        right = self.order.index(question) < self.right[self.holds]
        text = f"\\boxed{{{self.answers[question] if right else -1}}}" + self.tokenizer.eos_token
        return TokenOutput(token_ids=self.tokenizer.encode(text, add_special_tokens=False))

    def close(self) -> None:
        pass


def kept_start(where: Path, model: Path, step: int = 700, acc: float = 0.5) -> Path:
    """A start as --make-start leaves it: an SFT step's HF files and the record."""
    record = {
        "sft_step": step,
        "acc": acc,
        "sft_acc_by_step": {"650": 0.1, str(step): acc},
        "model_params_m": 0.1,
        "made": {"date": "2026-12-07", "device": "cpu", "machine": "test", "sft_s": 1.0},
    }
    learning_curve.export_start(model, where, record)
    return where


class FakeMainPPO:
    """Writes what main_ppo writes for an arm: metrics (val acc at steps 0/2/4) and validation
    dumps of 16 problems x 2 samples. Seeds gain on every problem; the control gains on half
    and loses on the other half. ``fail`` names experiments whose first run exits 1 half-way."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.calls: list[str] = []
        self.fail = set(fail)

    def __call__(self, command, env) -> int:
        overrides = dict(a.split("=", 1) for a in command if "=" in a and not a.startswith("-"))
        control = any("shuffle_rewards_seed" in a for a in command)
        val_dir = Path(overrides["trainer.validation_data_dir"])
        experiment = overrides["trainer.experiment_name"]
        self.calls.append(experiment)
        failing = experiment in self.fail
        self.fail.discard(experiment)
        val_dir.mkdir(parents=True)
        accs = {}
        for step, shift in ((0, 0.0), (2, 0.125), (4, 0.25)):
            if failing and step == 4:
                break
            rows = []
            for p in range(16):
                acc = 0.5 + ((shift if p % 2 else -shift) if control else shift)
                rows += [{"input": f"q{p}", "acc": a} for a in (acc, acc)]
            (val_dir / f"{step}.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
            accs[step] = sum(r["acc"] for r in rows) / len(rows)
        with Path(env["VERL_FILE_LOGGER_PATH"]).open("w") as log:
            for step in range(5):
                data = {"critic/score/mean": 0.1 * step} if step else {}
                if step in accs:
                    data["val-core/synthetic/acc/mean@2"] = accs[step]
                log.write(json.dumps({"step": step, "data": data}) + "\n")
        return 1 if failing else 0


@pytest.fixture
def proof(tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer, monkeypatch):
    """A kept start and an engine that scores it 0.5 held-out; the arms' stagger off."""
    monkeypatch.setattr(learning_curve, "ARM_STAGGER_S", 0.0)
    start = kept_start(tmp_path / "kept", tiny_model_dir)
    backend = AnsweringBackend(tiny_tokenizer, tmp_path / "root" / "start", {"start": 4})
    return tmp_path / "root", start, backend


def test_the_proof_checks_its_start_runs_its_arms_and_writes_rows_and_a_report(
    proof, local_endpoint: str
):
    root, start, backend = proof
    main_ppo = FakeMainPPO()
    result = learning_curve.run(root, SMALL, 1, local_endpoint, backend=backend, runner=main_ppo,
                                start=start)  # fmt: skip
    assert sorted(main_ppo.calls) == ["curve-control", "curve-seed1", "curve-seed2", "curve-seed3"]
    # the start: copied, its files checked, scored here through evaluation's rollouts
    assert (result["start_step"], result["start_acc"]) == (700, 0.5)
    assert result["start"]["check"] | {"scored_s": 0} == {
        "acc": 0.5, "samples_per_problem": 2, "problems": 8, "scored_s": 0, "band": [0.2, 0.65],
        "in_band": True,
    }  # fmt: skip
    assert (root / "start" / "model.safetensors").is_file()
    assert set(result["timing_s"]) == {"setup_s", "start_check_s", "arms_s", "total_s"}
    rows = {r["arm"]: r for r in result["arms"]}
    for name, row in rows.items():
        assert set(row) >= ROW_KEYS and row["proof"] == result["proof"]
        assert json.loads((root / "arms" / f"{name}.json").read_text()) == row
        assert row["failed"] is False and row["val_acc"][0] == 0.5  # first validation: the start
    assert rows["seed1"]["rise"] == 0.25 and rows["seed1"]["rise_ci95"] == [0.25, 0.25]
    assert rows["seed1"]["rise_by_step"] == {
        "2": {"rise": 0.125, "ci95": [0.125, 0.125]},
        "4": {"rise": 0.25, "ci95": [0.25, 0.25]},
    }
    lo, hi = rows["control"]["rise_ci95"]
    assert rows["control"]["rise"] == 0.0 and lo < 0 < hi
    verdict = result["verdict"]
    assert verdict["holds"] is True and verdict["seeds"] == 3 and verdict["failed_arms"] == []
    assert (verdict["min_gap_to_control"], verdict["control_rise"]) == (0.25, 0.0)
    assert verdict["line"].startswith("The proof holds: 3 seeds rose +0.250 [+0.250, +0.250]")
    report = (root / "curve.md").read_text()
    assert f"**{verdict['line']}**" in report
    assert "scored **0.500** held-out here (8 problems × 2 samples; 0.500 when made)" in report
    assert "| seed1 | 1 | ReTool | 0.500 → 0.625 → 0.750 | +0.125 [+0.125, +0.125] | " in report
    assert "| control | 1 | shuffled | 0.500 → 0.500 → 0.500 |" in report
    assert "the control's drift (reported, not tested): +0.000" in report
    assert re.search(r"\| start_check \| [\d.]+ \|", report) and "| total |" in report
    assert (root / "curve.png").stat().st_size > 0

    again = learning_curve.run(root, SMALL, 1, local_endpoint, backend=backend, runner=main_ppo,
                               start=start)  # fmt: skip
    assert len(main_ppo.calls) == 4  # finished arms are kept
    assert again["arms"] == result["arms"] and again["proof"] == result["proof"]


def test_a_failed_arm_is_marked_and_a_rerun_redoes_only_it(proof, local_endpoint: str):
    root, start, backend = proof
    main_ppo = FakeMainPPO(fail=("curve-seed2",))
    first = learning_curve.run(root, SMALL, 1, local_endpoint, backend=backend, runner=main_ppo,
                               start=start)  # fmt: skip
    failed = next(r for r in first["arms"] if r["arm"] == "seed2")
    assert failed["failed"] is True and failed["dapo_exit"] == 1
    assert json.loads((root / "arms" / "seed2.json").read_text())["failed"] is True
    assert first["verdict"]["holds"] is False and first["verdict"]["failed_arms"] == ["seed2"]
    assert "arms seed2 failed" in first["verdict"]["line"]
    assert "| seed2 | 2 | ReTool |" in (root / "curve.md").read_text()

    second = learning_curve.run(root, SMALL, 1, local_endpoint, backend=backend, runner=main_ppo,
                                start=start)  # fmt: skip
    assert sorted(main_ppo.calls) == sorted(["curve-control", "curve-seed1", "curve-seed2",
                                             "curve-seed3", "curve-seed2"])  # fmt: skip
    redone = next(r for r in second["arms"] if r["arm"] == "seed2")
    assert redone["failed"] is False and redone["rise"] == 0.25
    assert second["verdict"]["holds"] is True
    kept = root / "arms" / "attempts" / "seed2-1"
    assert json.loads((kept / "seed2.json").read_text())["failed"] is True  # nothing is lost
    assert sorted(p.name for p in (kept / "seed2-validation").iterdir()) == ["0.jsonl", "2.jsonl"]
    assert (kept / "curve-seed2").is_dir()  # the failed attempt's DAPO experiment


def test_an_arm_cut_off_without_a_row_starts_over(proof, local_endpoint: str):
    root, start, backend = proof
    cut = root / "arms" / "seed1-validation"
    cut.mkdir(parents=True)
    (cut / "4.jsonl").write_text('{"input": "q0", "acc": 1.0}\n')  # a stale dump of step 4
    result = learning_curve.run(root, SMALL, 1, local_endpoint, backend=backend,
                                runner=FakeMainPPO(), start=start)  # fmt: skip
    seed1 = next(r for r in result["arms"] if r["arm"] == "seed1")
    assert seed1["rise"] == 0.25 and seed1["rise_problems"] == 16  # not paired with the stale one
    assert (root / "arms" / "attempts" / "seed1-1" / "seed1-validation" / "4.jsonl").is_file()


def test_a_start_outside_the_band_here_runs_no_dapo(
    tmp_path: Path, tiny_model_dir: Path, local_endpoint: str, monkeypatch, capsys
):
    """The random tiny model as the kept start, scored for real (HF generation on CPU): it
    answers nothing right, so the proof refuses before any DAPO, in one line."""
    start = kept_start(tmp_path / "kept", tiny_model_dir, acc=0.4)
    main_ppo = FakeMainPPO()
    with pytest.raises(NoStartInBand, match=r"scored 0\.000 held-out here, outside the band"):
        learning_curve.run(tmp_path / "a", SMALL, 1, local_endpoint, backend="hf",
                           runner=main_ppo, start=start)  # fmt: skip
    assert main_ppo.calls == [] and not (tmp_path / "a" / "arms").exists()

    monkeypatch.setattr(learning_curve, "DEFAULTS", SMALL)
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", local_endpoint)
    capsys.readouterr()  # the scoring's own output
    argv = ["--root", str(tmp_path / "a"), "--start-dir", str(start), "--backend", "hf"]
    assert learning_curve.main(argv) == learning_curve.EXIT_NO_START  # the check is kept
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "outside the band [20%, 65%]" in out[0] and "--make-start" in out[0]


def test_a_start_that_differs_from_its_record_is_refused(
    tmp_path: Path, tiny_model_dir: Path, local_endpoint: str
):
    start = kept_start(tmp_path / "kept", tiny_model_dir)
    with (start / "model.safetensors").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(NoStartInBand, match=r"model\.safetensors is missing or differs"):
        learning_curve.run(tmp_path / "a", SMALL, 1, local_endpoint, start=start)
    with pytest.raises(NoStartInBand, match="no start checkpoint at"):
        learning_curve.run(tmp_path / "b", SMALL, 1, local_endpoint, start=tmp_path / "none")


def fake_sft(root: Path, model: Path, steps: tuple[int, ...]) -> None:
    """What a finished SFT leaves: steps with HF weights, the tracker and checkpoint_info."""
    layout = Layout.local(root)
    exp = layout.experiment_dir("sft", learning_curve.SFT_EXPERIMENT)
    for step in steps:
        shutil.copytree(model, exp / f"global_step_{step}" / "huggingface")
    (exp / paths.TRACKER_FILE).write_text(str(max(steps)))
    paths.write_checkpoint_info(
        layout,
        paths.CheckpointInfo(
            experiment=learning_curve.SFT_EXPERIMENT,
            stage="sft",
            step=max(steps),
            path=str(exp / f"global_step_{max(steps)}"),
            base_model=str(model),
        ),
    )


def test_making_a_start_scores_the_saved_steps_and_keeps_the_pick_with_its_record(
    tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer, local_endpoint: str, monkeypatch
):
    monkeypatch.setattr(learning_curve, "MODEL_SPEC", TinySpec())  # CPU-sized
    root = tmp_path / "make"
    fake_sft(root, tiny_model_dir, (50, 100, 150, 200))
    exp = Layout.local(root).experiment_dir("sft", learning_curve.SFT_EXPERIMENT)
    right = {"global_step_50": 0, "global_step_100": 3, "global_step_150": 6, "global_step_200": 8}
    backend = AnsweringBackend(tiny_tokenizer, exp / "global_step_50" / "huggingface", right)
    out = tmp_path / "curve_start"
    record = learning_curve.make_start(root, SMALL, 1, local_endpoint, out=out, backend=backend,
                                       device="cpu")  # fmt: skip
    # 0/8, 3/8 (in the band), 6/8 (past it: the sweep stops), step 200 never scored
    assert record["sft_acc_by_step"] == {"50": 0.0, "100": 0.375, "150": 0.75}
    assert (record["sft_step"], record["acc"]) == (100, 0.375)
    assert record["made"]["device"] == "cpu" and record["made"]["sft_s"] == 0.0  # SFT was kept
    assert "synthetic/sft.parquet" in " ".join(record["sft_args"])  # no machine paths
    assert learning_curve.read_start(out) == record  # every file hashed
    assert (out / "model.safetensors").read_bytes() == (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "a,b"], "--seeds takes integers"),
        (["--seeds", ","], "one seed at least"),
        (["--dapo-steps", "0"], "must be >= 1"),
        (["--rollout-mode", "async", "--gpus", "2"], "add --no-control"),
        (["--rollout-mode", "async", "--no-control"], "needs --gpus 2 or more"),
        (["--band", "0.7,0.2"], "--band takes LO,HI"),
    ],
)
def test_bad_arguments_are_one_line(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        learning_curve.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_band_default_is_where_grpo_has_signal() -> None:
    assert learning_curve.CurveSettings().band == Band(0.2, 0.65)


def test_the_kept_start_matches_its_record_and_was_inside_the_band_when_made() -> None:
    record = learning_curve.read_start(learning_curve.START_DIR)  # every file's sha256
    assert record["acc"] in Band(*record["band"])
    assert record["problems"] == CURVE_DATA.rl_val
    assert record["data"] == {"sft": 8000, "rl_train": 1024, "rl_val": 256}  # SFT saw no held-out
    size = sum(p.stat().st_size for p in learning_curve.START_DIR.iterdir())
    assert size < 20e6


def test_the_proof_is_logged_to_wandb_from_its_result(tmp_path: Path, monkeypatch) -> None:
    from recipe.retool.records import tracking

    result = json.loads((GPU_RUNS / "curve_20261204_h200.json").read_text())
    calls = []
    monkeypatch.setattr(tracking, "log_results", lambda layout, **kw: calls.append(kw) or "url")
    assert learning_curve.log_to_wandb(tmp_path, result) == "url"
    ((kw,),) = [calls]
    assert kw["project"] == "retool-curve" and kw["run"] == "curve-20261204-190844"
    assert kw["images"] == {"curve": tmp_path / "curve.png"}
    metrics = kw["metrics"]
    assert metrics["arms/seed1/rise"] == -0.0811 and metrics["arms/control/rise"] == -0.2061
    assert metrics["holds"] == 0.0 and metrics["start_step"] == 1400.0
    assert metrics["verdict/mean_rise"] == -0.064 and metrics["timing_s/arms_s"] == 769.4


def test_an_async_curve_passes_the_mode_to_its_dapo_runs() -> None:
    settings = replace(learning_curve.CurveSettings(), rollout_mode="async", control=False)
    arm = learning_curve.arms(settings)[0]
    assert arm.experiment == "curve-async-seed1"  # apart from the sync arm sharing its root
    args = learning_curve.dapo_request(FILES, settings, Path("/s"), arm, Path("/v"))
    assert args.rollout_mode == "async"
    sync = learning_curve.dapo_request(
        FILES, learning_curve.CurveSettings(), Path("/s"), arm, Path("/v")
    )
    assert sync.rollout_mode == "sync"
