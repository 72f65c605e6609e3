"""The proof end to end: its settings, the SFT and DAPO requests of its arms, the calibration,
the arms side by side, and ``main`` (``python -m recipe.retool.workflows.learning_curve``)."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from recipe.retool.core import paths
from recipe.retool.core.request import LaunchRequest
from recipe.retool.core.topology import Topology
from recipe.retool.data.synthetic import SyntheticSizes, write_dataset
from recipe.retool.data.tiny_model import TinySpec, build
from recipe.retool.eval.config import EvalError
from recipe.retool.records import run_metrics
from recipe.retool.stages.dapo import run_dapo
from recipe.retool.stages.process import Runner, run_subprocess
from recipe.retool.stages.sft import run_sft
from recipe.retool.workflows.learning_curve.report import log_to_wandb, write_report
from recipe.retool.workflows.learning_curve.stats import (
    Band,
    NoStartInBand,
    past_band,
    pick_start,
    rise_of,
    verdict,
)
from sandbox.local import run_code_url

MODEL_ID = "local/tool-qwen2"
SFT_EXPERIMENT = "curve"
# Wide enough to learn to copy digits between question, code and answer in a few hundred steps.
MODEL_SPEC = TinySpec(
    hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4
)
# 8,000 SFT traces, RL prompts, and enough held-out problems that x 8 samples a rise of a few
# points is visible in paired validations.
CURVE_DATA = SyntheticSizes(sft=8000, rl_train=1024, rl_val=128)
EXIT_NO_START = 3


@dataclass(frozen=True)
class CurveSettings:
    """Sizes for one H100/H200. On the H100 run that first set a start, held-out accuracy after
    SFT steps 250/500/750/1000/1500 was 1/1/5/74/90 %; on an H200 rerun step 1000 already scored
    99 %: the jump lands between steps 500 and 1000, so the start is measured, not fixed."""

    data: SyntheticSizes = CURVE_DATA
    sft_epochs: int = 3  # 1,500 steps of 16 traces
    sft_save_every: int = 50
    band: Band = field(default_factory=Band)
    calibration_n: int = 4  # samples per held-out problem for each SFT step
    seeds: tuple[int, ...] = (1, 2)
    control: bool = True
    dapo_steps: int = 15
    dapo_lr: float = 1e-4
    test_freq: int = 5
    val_n: int = 8
    max_response_tokens: int = 384
    parallel: bool = True  # arms side by side on the GPU (each its own Ray and vLLM)
    rollout_mode: str = "sync"  # "async": verl's fully-async trainer (>= 2 GPUs, no control)


DEFAULTS = CurveSettings()


def given_settings(**given: int) -> CurveSettings:
    """The default settings with those ``given`` a value (the Modal function's arguments, where
    0 means "the default")."""
    return replace(CurveSettings(), **{name: value for name, value in given.items() if value})


@dataclass(frozen=True)
class Arm:
    """One DAPO run of the proof. The control shares the first seed: same data order and
    sampling as that seed's arm, the reward's information removed."""

    name: str
    seed: int
    control: bool

    @property
    def experiment(self) -> str:
        return f"curve-{self.name}"


def arms(settings: CurveSettings) -> list[Arm]:
    """The proof's arms; async ones are named apart, so both modes can share one root's SFT and
    calibration without resuming each other's runs."""
    prefix = "" if settings.rollout_mode == "sync" else f"{settings.rollout_mode}-"
    found = [Arm(f"{prefix}seed{s}", s, control=False) for s in settings.seeds]
    if settings.control:
        found.append(Arm("control", settings.seeds[0], control=True))
    return found


def sft_request(data: Path, settings: CurveSettings) -> LaunchRequest:
    """The SFT stage's sizes for a small model trained from scratch (hence the high lr)."""
    return LaunchRequest("sft", experiment=SFT_EXPERIMENT, overrides=(
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
        f"trainer.save_freq={settings.sft_save_every}",  # the candidates for the DAPO start
        "trainer.max_ckpt_to_keep=null",
        "trainer.logger=[console]",
    ))  # fmt: skip


def dapo_request(
    files: dict[str, Path], settings: CurveSettings, sft_start: Path, arm: Arm, val_dir: Path
) -> LaunchRequest:
    """The production DAPO config with sizes for a model of a few MB sharing one GPU."""
    overrides = [
        f"data.train_files={files['rl_train']}",
        f"data.val_files=[{files['rl_val']}]",
        f"data.seed={arm.seed}",
        "data.train_batch_size=16",
        "data.max_prompt_length=512",
        f"data.max_response_length={settings.max_response_tokens}",
        f"actor_rollout_ref.rollout.seed={arm.seed}",
        "actor_rollout_ref.rollout.n=8",
        f"actor_rollout_ref.rollout.val_kwargs.n={settings.val_n}",
        # Arms share the GPU: a small fixed KV cache each, and no memory profiling (vLLM would
        # count the other arms' allocations during its profile as its own).
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.15",
        "++actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes=4294967296",
        "actor_rollout_ref.rollout.enforce_eager=true",  # minutes of CUDA-graph capture saved
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=4",
        "actor_rollout_ref.rollout.multi_turn.max_user_turns=4",
        f"actor_rollout_ref.actor.optim.lr={settings.dapo_lr}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384",
        "actor_rollout_ref.actor.fsdp_config.param_offload=false",
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload=false",
        # From a start inside the band most groups carry signal: 2 batches bound a step's cost.
        "algorithm.filter_groups.max_num_gen_batches=2",
        f"reward.reward_kwargs.max_resp_len={settings.max_response_tokens}",
        "reward.reward_kwargs.overlong_buffer_cfg.len=64",
        f"trainer.total_training_steps={settings.dapo_steps}",
        f"trainer.test_freq={settings.test_freq}",
        f"trainer.save_freq={settings.dapo_steps}",
        "trainer.total_epochs=100",
        "trainer.logger=[console,file]",
        f"trainer.validation_data_dir={val_dir}",  # per-problem scores for the paired interval
    ]
    if arm.control:
        overrides.append(f"++trainer.v1.sampler.sampler_kwargs.shuffle_rewards_seed={arm.seed}")
    return LaunchRequest(
        "dapo", experiment=arm.experiment, sft_checkpoint=str(sft_start),
        rollout_mode=settings.rollout_mode, overrides=tuple(overrides),
    )  # fmt: skip


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# Stages of the proof
# ---------------------------------------------------------------------------------------------


ARM_STAGGER_S = 20.0  # between arm starts: each one's Ray and vLLM start while others run


@dataclass
class Curve:
    """One proof under ``root``: what it was given and where it writes."""

    root: Path
    settings: CurveSettings
    gpus: int
    runner: Runner | None = None  # None: run_subprocess, output to the arm's log

    def __post_init__(self) -> None:
        self.layout = paths.Layout.local(self.root)
        self.topo = Topology(gpus_per_node=self.gpus)
        # One id for every arm of this proof, a rerun that finishes it included.
        id_file = self.root / "proof_id"
        if not id_file.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            id_file.write_text(time.strftime("%Y%m%d-%H%M%S") + "\n")
        self.proof = id_file.read_text().strip()

    def sft(self, files: dict[str, Path], model: Path) -> float:
        """SFT unless a finished one is here; returns its seconds (0 when kept)."""
        if paths.read_checkpoint_info(self.layout, "sft", SFT_EXPERIMENT) is not None:
            return 0.0
        result = run_sft(
            self.layout,
            self.topo,
            sft_request(files["sft"], self.settings),
            model_path=model,
        )
        if result.returncode != 0 or result.checkpoint is None:
            raise SystemExit(f"SFT failed (exit {result.returncode})")
        return result.seconds

    def saved_sft_steps(self) -> list[tuple[int, Path]]:
        steps = paths.list_checkpoints(self.layout, "sft", SFT_EXPERIMENT)
        return sorted((c.step, c.hf_dir) for c in steps if c.complete)

    def calibrate(self, problems_file: Path, sandbox_url: str, backend: str) -> dict[int, float]:
        """Held-out accuracy of the saved SFT steps in order, until one scores inside or above
        the band. Kept in ``calibration.json``: a rerun scores only steps saved since (an SFT
        trained further when no step reached the band)."""
        cache = self.root / "calibration.json"
        acc = (
            {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.is_file() else {}
        )
        band = self.settings.band

        def settled(a: float) -> bool:  # a start is found, or no later step will be one
            return a in band or past_band(a, band)

        if any(settled(a) for a in acc.values()):
            return acc
        todo = [(s, d) for s, d in self.saved_sft_steps() if s > max(acc, default=-1)]
        if not todo:
            return acc
        from recipe.retool.eval.config import EvalConfig
        from recipe.retool.eval.problems import load_problems
        from recipe.retool.eval.sweep import score_steps

        cfg = EvalConfig(
            n=self.settings.calibration_n,
            top_p=0.6,  # as DAPO's validation (config/dapo.yaml val_kwargs)
            max_response_tokens=self.settings.max_response_tokens,
            max_prompt_tokens=512,
            max_assistant_turns=4,
            max_user_turns=4,
            max_concurrency=512,
            save_samples=False,
            gpu_memory_utilization=0.3,
            enforce_eager=True,
        )
        acc |= score_steps(
            todo,
            load_problems(problems_file),
            cfg,
            sandbox_url,
            backend,
            stop=settled,
        )
        cache.write_text(json.dumps(acc, indent=1) + "\n")
        return acc

    def run_arm(self, arm: Arm, files: dict[str, Path], start: Path, sandbox_url: str) -> dict:
        """One DAPO run (its output in ``arms/<arm>.log``); its row, also in ``arms/<arm>.json``."""
        out = self.root / "arms"
        out.mkdir(parents=True, exist_ok=True)
        row_file = out / f"{arm.name}.json"
        if row_file.is_file():
            return json.loads(row_file.read_text())
        val_dir = out / f"{arm.name}-validation"
        request = dapo_request(files, self.settings, start, arm, val_dir)
        log = out / f"{arm.name}.log"
        print(f"arm {arm.name}: DAPO from {start.name} (log: {log})", flush=True)
        result = run_dapo(
            self.layout,
            self.topo,
            request,
            sandbox_url=sandbox_url,
            runner=self.runner or _logged(log),
        )
        summary = run_metrics.summarize(
            run_metrics.read_run(self.layout.experiment_dir("dapo", arm.experiment))
        )
        row: dict[str, Any] = {
            "kind": "dapo",
            "proof": self.proof,
            "arm": arm.name,
            "seed": arm.seed,
            "control": arm.control,
            "gpus": self.gpus,
            "gpu": gpu_name(),
            "dapo_exit": result.returncode,
            "dapo_s": round(result.seconds, 1),
            **summary.to_json(),
        }
        row.update(rise_of(val_dir))
        if result.returncode == 0:
            row_file.write_text(json.dumps(row, indent=1) + "\n")
        return row

    def run_arms(self, files: dict[str, Path], start: Path, sandbox_url: str) -> list[dict]:
        todo = arms(self.settings)
        if not self.settings.parallel:
            return [self.run_arm(a, files, start, sandbox_url) for a in todo]
        # Staggered starts: each arm's Ray and vLLM come up while the previous one trains.
        with ThreadPoolExecutor(max_workers=len(todo)) as pool:
            futures = []
            for i, arm in enumerate(todo):
                if i:
                    time.sleep(ARM_STAGGER_S)
                futures.append(pool.submit(self.run_arm, arm, files, start, sandbox_url))
            return [f.result() for f in futures]


def _logged(log: Path) -> Runner:
    """The stage runner with the child's output in ``log``: arms run side by side."""

    def run(command: Sequence[str], env: dict[str, str]) -> int:
        with log.open("ab") as sink:
            return run_subprocess(command, env, stdout=sink)

    return run


# ---------------------------------------------------------------------------------------------
# The whole proof
# ---------------------------------------------------------------------------------------------


def run(
    root: Path,
    settings: CurveSettings,
    gpus: int,
    sandbox_url: str | None,
    *,
    backend: str = "vllm",
    runner: Runner | None = None,
) -> dict:
    """Model → data → SFT → calibration → arms → report; returns ``curve.json``'s content.
    Raises :class:`NoStartInBand` when no saved SFT step scores inside the band."""
    curve = Curve(root, settings, gpus, runner=runner)
    model = build(curve.layout.model_dir(MODEL_ID), MODEL_SPEC)
    files = write_dataset(root / "synthetic", settings.data)
    timings: dict[str, float] = {}
    started = time.monotonic()
    timings["sft_s"] = round(curve.sft(files, model), 1)
    with run_code_url(sandbox_url) as url:
        mark = time.monotonic()
        acc_by_step = curve.calibrate(files["rl_val"], url, backend)
        timings["calibration_s"] = round(time.monotonic() - mark, 1)
        start_step = pick_start(acc_by_step, settings.band)
        start = curve.layout.experiment_dir("sft", SFT_EXPERIMENT) / f"global_step_{start_step}"
        print(
            f"DAPO starts from SFT step {start_step} "
            f"(held-out accuracy {acc_by_step[start_step]:.3f}, band {settings.band})",
            flush=True,
        )
        mark = time.monotonic()
        rows = curve.run_arms(files, start, url)
        timings["arms_s"] = round(time.monotonic() - mark, 1)
    timings["total_s"] = round(time.monotonic() - started, 1)
    shared = {
        "start_step": start_step,
        "start_acc": round(acc_by_step[start_step], 4),
        "sft_acc_by_step": {str(k): round(v, 4) for k, v in sorted(acc_by_step.items())},
        "band": [settings.band.lo, settings.band.hi],
        "model_params_m": round(_param_count(model) / 1e6, 2),
        "settings": _settings_json(settings),
    }
    rows = [{**row, **shared} for row in rows]
    for row in rows:
        (root / "arms" / f"{row['arm']}.json").write_text(json.dumps(row, indent=1) + "\n")
    result = {"proof": curve.proof, "timing_s": timings, **shared, "arms": rows}
    result["verdict"] = verdict(rows)
    (root / "curve.json").write_text(json.dumps(result, indent=1) + "\n")
    write_report(root, result)
    return result


def _settings_json(settings: CurveSettings) -> dict[str, Any]:
    out = asdict(settings)
    out["band"] = [settings.band.lo, settings.band.hi]
    return json.loads(json.dumps(out))  # tuples as the lists a reader of the row gets


def _param_count(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for f in model_dir.glob("*.safetensors") for t in load_file(f).values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=Path("runs") / f"curve-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--dapo-steps", type=int, default=DEFAULTS.dapo_steps)
    parser.add_argument("--sft-epochs", type=int, default=DEFAULTS.sft_epochs)
    parser.add_argument(
        "--seeds", default=",".join(map(str, DEFAULTS.seeds)), help="comma-separated"
    )
    parser.add_argument(
        "--band",
        default=f"{DEFAULTS.band.lo},{DEFAULTS.band.hi}",
        help="LO,HI: held-out accuracies a DAPO start may have",
    )
    parser.add_argument("--no-control", action="store_true", help="seeds only (not a proof)")
    parser.add_argument("--sequential", action="store_true", help="one arm at a time")
    parser.add_argument(
        "--rollout-mode",
        choices=("sync", "async"),
        default=DEFAULTS.rollout_mode,
        help="async: verl's fully-async trainer, beside a sync curve from the same start",
    )
    parser.add_argument("--backend", choices=("vllm", "hf"), default="vllm")
    parser.add_argument(
        "--report-only", action="store_true", help="redo curve.md/png from curve.json"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.report_only:
        write_report(root, json.loads((root / "curve.json").read_text()))
        return 0
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        parser.error(f"--seeds takes integers separated by commas, got {args.seeds!r}")
    try:
        band = Band(*(float(x) for x in args.band.split(",")))
    except (TypeError, ValueError):
        parser.error(f"--band takes LO,HI with 0 <= LO < HI <= 1, got {args.band!r}")
    if args.rollout_mode == "async" and not args.no_control:
        parser.error(
            "--rollout-mode async runs no control arm (its shuffled reward lives in the sync "
            "sampler, which the fully-async trainer does not run): add --no-control"
        )
    if args.rollout_mode == "async" and args.gpus < 2:
        parser.error("--rollout-mode async needs --gpus 2 or more (rollout and training GPUs)")
    if not seeds or args.dapo_steps < 1 or args.sft_epochs < 1:
        parser.error("--seeds needs one seed at least; --dapo-steps and --sft-epochs must be >= 1")
    settings = replace(
        DEFAULTS,
        sft_epochs=args.sft_epochs,
        dapo_steps=args.dapo_steps,
        seeds=seeds,
        band=band,
        control=not args.no_control,
        parallel=not args.sequential,
        rollout_mode=args.rollout_mode,
    )
    try:
        result = run(
            root,
            settings,
            args.gpus,
            os.environ.get("SANDBOX_FUSION_ENDPOINT"),
            backend=args.backend,
        )
    except NoStartInBand as exc:
        print(f"learning curve: {exc}; not running DAPO (see {root / 'calibration.json'})")
        return EXIT_NO_START
    except EvalError as exc:  # the calibration's sandbox did not run the tool
        print(f"learning curve: {exc}")
        return 1
    print(json.dumps(result["verdict"], indent=1))
    print(f"report: {root / 'curve.md'}")
    log_to_wandb(root, result)
    failed = [r["arm"] for r in result["arms"] if r["dapo_exit"] != 0]
    if failed:
        print(f"learning curve: arms {failed} failed (logs in {root / 'arms'})")
        return 1
    return 0 if result["verdict"].get("holds", True) else 1
