"""`make dapo-curve`: its settings compose against verl, the start is chosen by measurement, the
arms (seeds + control) become rows with paired intervals, and the report is derived from them."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from recipe.retool.core import paths
from recipe.retool.core.paths import Layout
from recipe.retool.core.topology import Topology
from recipe.retool.data.synthetic import SyntheticSizes
from recipe.retool.launch.commands import dapo_overrides, sft_overrides
from recipe.retool.launch.validation import validate
from recipe.retool.workflows.learning_curve import proof as learning_curve
from recipe.retool.workflows.learning_curve.stats import Band, NoStartInBand

FILES = {name: Path(f"/d/{name}.parquet") for name in ("sft", "rl_train", "rl_val")}
GPU_RUNS = Path(__file__).resolve().parents[2] / "docs" / "gpu-runs"
ROW_KEYS = {"kind", "seed", "control", "start_step", "start_acc", "val_acc", "rise_ci95", "proof"}
ROW_KEYS |= {"gpus", "gpu", "sft_acc_by_step"}


def compose_arm(arm: learning_curve.Arm, settings: learning_curve.CurveSettings):
    topo = Topology(gpus_per_node=1)
    start = Path("/c/sft-experiments/curve/global_step_800")
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
    assert cfg.actor_rollout_ref.actor.optim.lr == settings.dapo_lr
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
        ("control", 1, True),
    ]
    seed1, control = compose_arm(arms[0], settings), compose_arm(arms[2], settings)
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
    ]


# ---------------------------------------------------------------------------------------------
# The proof end to end, with main_ppo replaced by what it writes
# ---------------------------------------------------------------------------------------------

SMALL = learning_curve.CurveSettings(
    data=SyntheticSizes(sft=8, rl_train=8, rl_val=8), dapo_steps=4, test_freq=2, parallel=True
)


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


class FakeMainPPO:
    """Writes what main_ppo writes for an arm: metrics (val acc first and last) and validation
    dumps of 16 problems x 2 samples. Seeds gain on every problem; the control gains on half
    and loses on the other half."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, command, env) -> int:
        overrides = dict(a.split("=", 1) for a in command if "=" in a and not a.startswith("-"))
        control = any("shuffle_rewards_seed" in a for a in command)
        val_dir = Path(overrides["trainer.validation_data_dir"])
        self.calls.append(overrides["trainer.experiment_name"])
        val_dir.mkdir(parents=True)
        accs = {}
        for step, shift in ((0, 0.0), (4, 0.25)):
            rows = []
            for p in range(16):
                gain = (shift if p % 2 else -shift) if control else shift
                acc = 0.5 + gain
                rows += [{"input": f"q{p}", "acc": a} for a in (acc, acc)]
            (val_dir / f"{step}.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
            accs[step] = sum(r["acc"] for r in rows) / len(rows)
        with Path(env["VERL_FILE_LOGGER_PATH"]).open("w") as log:
            for step in range(5):
                data = {"critic/score/mean": 0.1 * step} if step else {}
                if step in accs:
                    data["val-core/synthetic/acc/mean@2"] = accs[step]
                log.write(json.dumps({"step": step, "data": data}) + "\n")
        return 0


def test_the_proof_runs_its_arms_and_writes_rows_and_a_report(
    tmp_path: Path, tiny_model_dir: Path, local_endpoint: str, monkeypatch
):
    fake_sft(tmp_path, tiny_model_dir, (50, 100, 150))
    (tmp_path / "calibration.json").write_text(json.dumps({"50": 0.02, "100": 0.4, "150": 0.9}))
    monkeypatch.setattr(learning_curve, "MODEL_SPEC", learning_curve.TinySpec())  # CPU-sized
    monkeypatch.setattr(learning_curve, "ARM_STAGGER_S", 0.0)
    main_ppo = FakeMainPPO()
    result = learning_curve.run(tmp_path, SMALL, 1, local_endpoint, runner=main_ppo)
    assert sorted(main_ppo.calls) == ["curve-control", "curve-seed1", "curve-seed2"]
    assert (result["start_step"], result["start_acc"]) == (100, 0.4)
    rows = {r["arm"]: r for r in result["arms"]}
    for name, row in rows.items():
        assert set(row) >= ROW_KEYS and row["proof"] == result["proof"]
        assert json.loads((tmp_path / "arms" / f"{name}.json").read_text()) == row
        assert row["sft_acc_by_step"] == {"50": 0.02, "100": 0.4, "150": 0.9}
        assert row["val_acc"][0] == 0.5  # the first validation is at the start
    assert rows["seed1"]["rise"] == 0.25 and rows["seed1"]["rise_ci95"] == [0.25, 0.25]
    lo, hi = rows["control"]["rise_ci95"]
    assert rows["control"]["rise"] == 0.0 and lo < 0 < hi
    assert result["verdict"] == {
        "seeds": 2,
        "mean_rise": 0.25,
        "control_rise": 0.0,
        "control_below_every_seed": True,
        "control_ci_includes_0": True,
        "holds": True,
    }
    report = (tmp_path / "curve.md").read_text()
    assert "DAPO starts from step 100 (0.400" in report
    assert "| control | 1 | shuffled | 0.500 → 0.500 | +0.000 |" in report
    assert "mean rise over 2 seeds: +0.250" in report and "The proof holds." in report
    assert (tmp_path / "curve.png").stat().st_size > 0

    again = learning_curve.run(tmp_path, SMALL, 1, local_endpoint, runner=main_ppo)
    assert len(main_ppo.calls) == 3  # finished arms are kept
    assert again["arms"] == result["arms"] and again["proof"] == result["proof"]


def test_no_step_in_the_band_runs_no_dapo(
    tmp_path: Path, tiny_model_dir: Path, local_endpoint: str, monkeypatch, capsys
):
    fake_sft(tmp_path, tiny_model_dir, (50, 100))
    (tmp_path / "calibration.json").write_text(json.dumps({"50": 0.01, "100": 0.99}))
    monkeypatch.setattr(learning_curve, "MODEL_SPEC", learning_curve.TinySpec())
    main_ppo = FakeMainPPO()
    with pytest.raises(NoStartInBand, match=r"50: 0\.01, 100: 0\.99"):
        learning_curve.run(tmp_path, SMALL, 1, local_endpoint, runner=main_ppo)
    assert main_ppo.calls == [] and not (tmp_path / "arms").exists()

    monkeypatch.setattr(learning_curve, "DEFAULTS", SMALL)
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", local_endpoint)
    assert learning_curve.main(["--root", str(tmp_path)]) == learning_curve.EXIT_NO_START
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no saved SFT step scored inside [25%, 65%]" in out[0]


def test_a_failed_proof_says_so(tmp_path: Path):
    rows = [
        {"arm": "seed1", "control": False, "rise": 0.05, "rise_ci95": [0.0, 0.1]},
        {"arm": "control", "control": True, "rise": 0.08, "rise_ci95": [0.02, 0.14]},
    ]
    v = learning_curve.verdict(rows)
    assert v["control_below_every_seed"] is False and v["control_ci_includes_0"] is False
    assert v["holds"] is False
    assert learning_curve.verdict(rows[:1]) == {"seeds": 1, "mean_rise": 0.05}


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
    assert learning_curve.CurveSettings().band == Band(0.25, 0.65)


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
    assert metrics["verdict/mean_rise"] == -0.064


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
