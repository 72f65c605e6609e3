"""Proof that DAPO learns: SFT a small model to use the tool, then DAPO it and watch held-out
accuracy rise. ``make dapo-curve`` on any GPU box; the same stage functions run on Modal.

Every piece is the production code path: the SFT stage (``stages.run_sft``), the DAPO stage
(``stages.run_dapo`` → verl ``main_ppo`` with vLLM rollouts, the code-interpreter tool in the
project's sandbox, the ReTool reward manager, the bounded dynamic sampler), and verl's own
metrics (``run_metrics.py``). Only sizes differ: a random-init Qwen2 of a few million parameters
(``local/tiny_model.py``), synthetic problems whose answers the code computes
(``data/synthetic.py``), and step counts that fit a short GPU lease. If rewards, advantages,
tool-response loss masks or weight sync were wrong, validation accuracy would not rise.

Writes under ``--root``: the Modal-volume layout, ``curve.json`` (the ``docs/gpu-runs`` row),
``curve.md`` and ``curve.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from recipe.retool import launch, paths, run_metrics, stages
from recipe.retool.data.synthetic import SyntheticSizes, write_dataset
from recipe.retool.local.tiny_model import TinySpec, build
from sandbox.local import run_code_url

MODEL_ID = "local/tool-qwen2"
EXPERIMENT = "curve"
# Wide enough to learn to copy digits between question, code and answer in a few hundred steps.
MODEL_SPEC = TinySpec(
    hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4
)


# 8,000 SFT traces, RL prompts, and enough held-out problems that x 8 samples a rise of ~2 points
# is visible in paired validations.
CURVE_DATA = SyntheticSizes(sft=8000, rl_train=1024, rl_val=128)


@dataclass(frozen=True)
class CurveSettings:
    """Sizes measured on an H100 (docs/benchmarks.md, "DAPO on a GPU"): held-out accuracy after
    SFT steps 250/500/750/1000/1500/2000 was 1/1/5/74/90/90 %. DAPO starts from step 1000 of
    that run, where the model uses the tool every time but is wrong a quarter of the time."""

    data: SyntheticSizes = CURVE_DATA
    sft_epochs: int = 4  # 2,000 steps of 16 traces (~12 steps/s on an H100)
    dapo_from_sft_step: int = 1000
    dapo_steps: int = 40
    dapo_lr: float = 1e-4
    test_freq: int = 5
    val_n: int = 8


def sft_args(data: Path, settings: CurveSettings) -> list[str]:
    """The SFT stage's sizes for a small model trained from scratch (hence the high lr)."""
    return [
        f"--experiment-name={EXPERIMENT}",
        f"data.train_files={data}",
        "data.max_length=640",
        # Many small steps: verl's SFT step costs ~60-80 ms per sample on the host even for a
        # model this size (measured on an H200), and copying digits is learned in steps.
        "data.train_batch_size=16",
        # Padded micro-batches: with SDPA, remove-padding packs a micro-batch into one sequence
        # whose attention is quadratic in all its tokens (118 GB reserved here; padded: 1.2 GB).
        "model.use_remove_padding=false",
        "data.use_dynamic_bsz=false",
        "data.micro_batch_size_per_gpu=16",
        "data.num_workers=8",
        "optim.lr=1e-3",
        "optim.lr_warmup_steps_ratio=0.05",
        "model.enable_gradient_checkpointing=false",
        "model.use_liger=false",
        f"trainer.total_epochs={settings.sft_epochs}",
        # The DAPO start and the end of SFT (verl saves only at multiples of save_freq).
        f"trainer.save_freq={settings.dapo_from_sft_step}",
        "trainer.max_ckpt_to_keep=null",
        "trainer.logger=[console]",
    ]


def dapo_args(files: dict[str, Path], settings: CurveSettings, sft_start: Path) -> list[str]:
    """The production DAPO config with sizes for one GPU and a model of a few MB."""
    return [
        f"--experiment-name={EXPERIMENT}",
        f"--sft-checkpoint={sft_start}",
        f"data.train_files={files['rl_train']}",
        f"data.val_files=[{files['rl_val']}]",
        "data.train_batch_size=16",
        "data.max_prompt_length=512",
        "data.max_response_length=384",
        "actor_rollout_ref.rollout.n=8",
        f"actor_rollout_ref.rollout.val_kwargs.n={settings.val_n}",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
        "actor_rollout_ref.rollout.enforce_eager=true",  # minutes of CUDA-graph capture saved
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=4",
        "actor_rollout_ref.rollout.multi_turn.max_user_turns=4",
        f"actor_rollout_ref.actor.optim.lr={settings.dapo_lr}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384",
        "actor_rollout_ref.actor.fsdp_config.param_offload=false",
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload=false",
        "algorithm.filter_groups.max_num_gen_batches=4",
        "reward.reward_kwargs.max_resp_len=384",
        "reward.reward_kwargs.overlong_buffer_cfg.len=64",
        f"trainer.total_training_steps={settings.dapo_steps}",
        f"trainer.test_freq={settings.test_freq}",
        f"trainer.save_freq={settings.dapo_steps}",
        "trainer.total_epochs=100",
        "trainer.logger=[console,file]",
    ]


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def run(root: Path, settings: CurveSettings, gpus: int, sandbox_url: str | None) -> dict:
    """Model → data → SFT → DAPO; returns the summary row (also written to curve.json)."""
    layout = paths.Layout.local(root)
    topo = launch.Topology(gpus_per_node=gpus)
    model = build(layout.model_dir(MODEL_ID), MODEL_SPEC)
    files = write_dataset(root / "synthetic", settings.data)
    started = time.time()
    if paths.read_checkpoint_info(layout, "sft", EXPERIMENT) is None:  # a rerun keeps its SFT
        sft = stages.run_sft(layout, topo, sft_args(files["sft"], settings), model_path=model)
        if sft.returncode != 0 or sft.checkpoint is None:
            raise SystemExit(f"SFT failed (exit {sft.returncode})")
    sft_step = paths.latest_checkpoint(layout, "sft", EXPERIMENT).step
    sft_s = time.time() - started
    start = layout.experiment_dir("sft", EXPERIMENT) / f"global_step_{settings.dapo_from_sft_step}"
    if not start.is_dir():
        raise SystemExit(f"no SFT checkpoint at step {settings.dapo_from_sft_step}: {start}")
    with run_code_url(sandbox_url) as url:
        dapo = stages.run_dapo(layout, topo, dapo_args(files, settings, start), sandbox_url=url)
    summary = run_metrics.summarize(run_metrics.read_run(layout.experiment_dir("dapo", EXPERIMENT)))
    row = {
        "kind": "dapo",
        "what": "learning curve: tiny Qwen2 SFT on synthetic tool traces, then DAPO",
        "gpus": gpus,
        "gpu": gpu_name(),
        "model_params_m": round(_param_count(model) / 1e6, 2),
        "sft_steps": sft_step,
        "dapo_from_sft_step": settings.dapo_from_sft_step,
        "dapo_lr": settings.dapo_lr,
        "sft_s": round(sft_s, 1),
        "dapo_exit": dapo.returncode,
        "dapo_s": round(dapo.seconds, 1),
        **summary.to_json(),
    }
    (root / "curve.json").write_text(json.dumps(row, indent=1) + "\n")
    write_report(root, row)
    return row


def _param_count(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for f in model_dir.glob("*.safetensors") for t in load_file(f).values())


def write_report(root: Path, row: dict) -> None:
    """``curve.md`` always; ``curve.png`` where matplotlib is installed."""
    acc = row["val_acc"]
    lines = [
        f"# DAPO learning curve ({row['gpus']}× {row['gpu']})",
        "",
        f"- SFT: {row['sft_steps']} steps in {row['sft_s']} s; DAPO: {row['steps']} steps, "
        + (row["ended"] if "ended" in row else f"{row['dapo_s']} s (exit {row['dapo_exit']})"),
        "- validation accuracy (mean@k, held-out problems), in order: "
        + ", ".join(f"step {s}: {a:.3f}" for s, a in zip(row["val_steps"], acc, strict=True)),
    ]
    if row["val_tool_calls"]:
        errors = [
            e / c if c else 0.0
            for e, c in zip(row["val_tool_errors"], row["val_tool_calls"], strict=True)
        ]
        lines.append(
            "- tool calls per trajectory (validation): "
            + ", ".join(f"{c:.2f}" for c in row["val_tool_calls"])
            + "; tool error rate: "
            + ", ".join(f"{e:.3f}" for e in errors)
        )
    lines.append(f"- mean step time split (s): {row['timing_s']}")
    (root / "curve.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(row["val_steps"], acc, marker="o")
    left.set(xlabel="DAPO step", ylabel="validation accuracy", title="held-out synthetic problems")
    right.plot(row["train_steps"], row["reward_mean"], label="mean reward")
    if row["tool_calls_per_traj"]:
        right.plot(row["train_steps"], row["tool_calls_per_traj"], label="tool calls / trajectory")
    right.set(xlabel="DAPO step", title="training batches")
    right.legend()
    fig.tight_layout()
    fig.savefig(root / "curve.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=Path("runs") / f"curve-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--dapo-steps", type=int, default=CurveSettings.dapo_steps)
    parser.add_argument("--sft-epochs", type=int, default=CurveSettings.sft_epochs)
    parser.add_argument(
        "--report-only", action="store_true", help="redo curve.md/png from curve.json"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.report_only:
        write_report(root, json.loads((root / "curve.json").read_text()))
        return 0
    settings = replace(CurveSettings(), sft_epochs=args.sft_epochs, dapo_steps=args.dapo_steps)
    row = run(root, settings, args.gpus, os.environ.get("SANDBOX_FUSION_ENDPOINT"))
    print(json.dumps(row, indent=1))
    print(f"report: {root / 'curve.md'}")
    return 0 if row["dapo_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
