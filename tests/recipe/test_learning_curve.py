"""`make dapo-curve`: its SFT and DAPO settings compose against verl, and its report is derived."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipe.retool import launch, learning_curve
from recipe.retool.paths import Layout

FILES = {name: Path(f"/d/{name}.parquet") for name in ("sft", "rl_train", "rl_val")}


def test_settings_compose_on_one_gpu_with_the_production_dapo_config() -> None:
    topo = launch.Topology(gpus_per_node=1)
    settings = learning_curve.CurveSettings()
    sft = launch.parse_launch_args(learning_curve.sft_args(FILES["sft"], settings))
    launch.validate(
        "sft", launch.sft_overrides(Layout.modal(), "c", Path("/m"), topo, sft.overrides), topo
    )
    start = Path("/c/sft-experiments/curve/global_step_1000")
    dapo = launch.parse_launch_args(learning_curve.dapo_args(FILES, settings, start))
    assert dapo.sft_checkpoint == str(start)
    cfg = launch.validate(
        "dapo", launch.dapo_overrides(Layout.modal(), "c", Path("/m"), topo, dapo.overrides), topo
    )
    assert cfg.algorithm.filter_groups.enable is True  # the production dynamic sampling
    assert list(cfg.data.val_files) == [str(FILES["rl_val"])]
    assert cfg.trainer.total_training_steps == settings.dapo_steps
    assert cfg.actor_rollout_ref.actor.optim.lr == settings.dapo_lr
    assert cfg.actor_rollout_ref.rollout.val_kwargs.n == settings.val_n
    assert "file" in cfg.trainer.logger


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        ("dapo_curve_h200", ("step 0: 0.016", "step 12: 0.023", "(exit 0)")),
        # cut when the device budget ran out: no exit code, the reason instead
        ("dapo_curve_h100", ("19 steps, cut after step 19", "step 15: 0.856")),
    ],
)
def test_report_is_written_from_the_row(tmp_path: Path, run: str, expected: tuple[str, ...]):
    runs = Path(__file__).resolve().parents[2] / "docs" / "gpu-runs"
    row = json.loads((runs / f"{run}.json").read_text())
    learning_curve.write_report(tmp_path, row)
    text = (tmp_path / "curve.md").read_text()
    assert all(part in text for part in expected), text
    assert (tmp_path / "curve.png").stat().st_size > 0
