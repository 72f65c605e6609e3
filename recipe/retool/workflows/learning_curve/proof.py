"""Proof that DAPO learns: from a fixed SFT start kept in the repository, DAPO with several seeds
and a control whose reward carries no information, judged by a stated criterion. ``make
dapo-curve`` on a GPU box; the Modal ``learning_curve`` function runs the same code.

Every piece is the production code path: the SFT stage (``run_sft``), evaluation's
rollouts and scoring (``eval/sweep.py``: one vLLM engine, each checkpoint's weights swapped in),
the DAPO stage (``run_dapo`` → verl ``main_ppo`` with vLLM rollouts, the tool in the
project's sandbox, the ReTool reward manager, the bounded dynamic sampler) and verl's own metrics
and validation dumps. Only sizes differ: a random-init Qwen2 of a few million parameters, synthetic
problems whose answers the code computes, and step counts that fit a short GPU lease.

1. **The start** (``recipe/retool/curve_start/``, :mod:`.start`): one SFT checkpoint of the small
   model, kept with the record of how it was made (:data:`START_RECORD`: its SFT, the held-out
   accuracy of every saved step, what making it cost, each file's sha256). Where SFT's abrupt jump
   in accuracy lands varies from run to run (steps 250, 850 and 1400 in three GPU runs of the same
   code), so a start picked afresh by every proof made what the proof showed a lottery. Every proof
   checks the kept start first, and times it: its files are the recorded ones and its held-out
   accuracy on this machine lies inside the band; otherwise one line, exit 3, no DAPO.
   ``--make-start`` remakes it: SFT saving every ``sft_save_every`` steps, every
   (``calibrate_every``-th) saved step scored on the held-out problems until one is past the band,
   the pick (``stats.pick_start``: the one inside the band nearest ``start_target``).
2. **Arms**, from that start with the same settings and number of updates: one per seed, and the
   control (rewards shuffled across each batch: ``dapo_sampler.shuffle_rewards``), side by side
   on the GPU.
3. **Rise** of each arm at each validation: that validation minus the first (at the start), with
   a paired bootstrap interval over the held-out problems from verl's validation dumps.
4. **Verdict** (``stats.judge``): every seed's rise has a 95 % interval above 0 and beats
   the control's rise by ``Criterion.min_gap``; at least ``Criterion.min_seeds`` seeds; the
   control's drift is reported.

Writes under ``--root``: the volume layout, ``start/`` (the start, copied) and
``start_check.json``, ``arms/<arm>.json`` (the ``docs/gpu-runs`` rows; a failed arm's row says
``"failed": true``), ``curve.json`` (all of it), ``curve.md`` and ``curve.png``. A rerun keeps the
start's check and finished arms, and redoes failed or unfinished ones (what they left is kept
under ``arms/attempts/``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from recipe.retool.core import paths
from recipe.retool.core.topology import Topology
from recipe.retool.data.synthetic import write_dataset
from recipe.retool.data.tiny_model import build
from recipe.retool.eval.config import EvalError
from recipe.retool.records import run_metrics
from recipe.retool.stages.dapo import run_dapo
from recipe.retool.stages.process import Runner, run_subprocess
from recipe.retool.stages.sft import run_sft
from recipe.retool.workflows.learning_curve.report import log_to_wandb, write_report
from recipe.retool.workflows.learning_curve.settings import (
    DEFAULTS,
    EXIT_NO_START,
    MODEL_ID,
    MODEL_SPEC,
    SFT_EXPERIMENT,
    Arm,
    CurveSettings,
    arms,
    dapo_request,
    every_saved,
    sft_request,
)
from recipe.retool.workflows.learning_curve.start import (
    REMAKE_HINT,
    START_DIR,
    START_RECORD,
    StartRefused,
    export_start,
    read_start,
)
from recipe.retool.workflows.learning_curve.stats import (
    Band,
    NoStartInBand,
    judge,
    past_band,
    pick_start,
    rise_of,
)
from sandbox.local import run_code_url


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# The start
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Stages of the proof
# ---------------------------------------------------------------------------------------------


ARM_STAGGER_S = 10.0  # between arm starts: each one's Ray and vLLM start while others run
Scorer = Callable[..., dict[int, float]]  # eval.sweep.score_steps's shape


@dataclass
class Curve:
    """One proof (or the making of a start) under ``root``: what it was given and where it
    writes."""

    root: Path
    settings: CurveSettings
    gpus: int
    runner: Runner | None = None  # None: run_subprocess, output to the arm's log
    device: str = "cuda"

    def __post_init__(self) -> None:
        self.layout = paths.Layout.local(self.root)
        self.topo = Topology(gpus_per_node=self.gpus, device=self.device)  # type: ignore[arg-type]
        self.start_dir = self.root / "start"
        # One id for every arm of this proof, a rerun that finishes it included.
        id_file = self.root / "proof_id"
        if not id_file.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            id_file.write_text(time.strftime("%Y%m%d-%H%M%S") + "\n")
        self.proof = id_file.read_text().strip()

    # -- scoring checkpoints on the held-out problems ------------------------------------------

    def _eval_config(self):
        from recipe.retool.eval.config import EvalConfig

        return EvalConfig(
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

    def score(
        self,
        steps: Sequence[tuple[int, Path]],
        problems_file: Path,
        sandbox_url: str,
        backend: Any,
        stop: Callable[[float], bool] = lambda acc: False,
    ) -> dict[int, float]:
        from recipe.retool.eval.problems import load_problems
        from recipe.retool.eval.sweep import score_steps

        problems = load_problems(problems_file)
        return score_steps(steps, problems, self._eval_config(), sandbox_url, backend, stop=stop)

    # -- making a start -------------------------------------------------------------------------

    def sft(self, files: dict[str, Path], model: Path) -> float:
        """SFT unless a finished one is here; returns its seconds (0 when kept)."""
        if paths.read_checkpoint_info(self.layout, "sft", SFT_EXPERIMENT) is not None:
            return 0.0
        request = sft_request(files["sft"], self.settings, self.device)
        result = run_sft(self.layout, self.topo, request, model_path=model)
        if result.returncode != 0 or result.checkpoint is None:
            raise SystemExit(f"SFT failed (exit {result.returncode})")
        return result.seconds

    def saved_sft_steps(self) -> list[tuple[int, Path]]:
        steps = paths.list_checkpoints(self.layout, "sft", SFT_EXPERIMENT)
        return sorted((c.step, c.hf_dir) for c in steps if c.complete)

    def calibrate(self, problems_file: Path, sandbox_url: str, backend: Any) -> dict[int, float]:
        """Held-out accuracy of the saved SFT steps in order, until one scores above the band
        (later steps will not come back into it). Kept in ``calibration.json``: a rerun scores
        only steps not yet scored."""
        cache = self.root / "calibration.json"
        acc = (
            {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.is_file() else {}
        )
        band = self.settings.band
        if any(past_band(a, band) for a in acc.values()):
            return acc
        every = every_saved(self.settings)
        saved = [(s, d) for s, d in self.saved_sft_steps() if s % every == 0]
        todo = [(s, d) for s, d in saved if s > max(acc, default=-1)]
        if todo:
            stop = lambda a: past_band(a, band)  # noqa: E731
            acc |= self.score(todo, problems_file, sandbox_url, backend, stop=stop)
            cache.write_text(json.dumps(acc, indent=1) + "\n")
        return acc

    # -- the proof ------------------------------------------------------------------------------

    def check_start(
        self, source: Path, problems_file: Path, sandbox_url: str, backend: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The kept start copied into this root, its files checked against its record, and its
        held-out accuracy measured here (kept in ``start_check.json`` for a rerun in this root);
        returns ``(record, check)``. Raises :class:`StartRefused` outside the band."""
        record = read_start(source)
        if not (self.start_dir / START_RECORD).is_file():
            shutil.rmtree(self.start_dir, ignore_errors=True)
            shutil.copytree(source, self.start_dir)
        record = read_start(self.start_dir)
        cache = self.root / "start_check.json"
        if cache.is_file():
            check = json.loads(cache.read_text())
        else:
            mark = time.monotonic()
            step = record["sft_step"]
            acc = self.score([(step, self.start_dir)], problems_file, sandbox_url, backend)[step]
            check = {
                "acc": round(acc, 4),
                "samples_per_problem": self.settings.calibration_n,
                "problems": self.settings.data.rl_val,
                "scored_s": round(time.monotonic() - mark, 1),
            }
            cache.write_text(json.dumps(check, indent=1) + "\n")
        band = self.settings.band
        check = {**check, "band": [band.lo, band.hi], "in_band": check["acc"] in band}
        if not check["in_band"]:
            raise StartRefused(
                f"the start (SFT step {record['sft_step']}, {record['acc']:.3f} when made) "
                f"scored {check['acc']:.3f} held-out here, outside the band {band}: {REMAKE_HINT}"
                ", or pass --band"
            )
        return record, check

    def run_arm(self, arm: Arm, files: dict[str, Path], start: Path, sandbox_url: str) -> dict:
        """One DAPO run (its output in ``arms/<arm>.log``); its row, also in ``arms/<arm>.json``.
        A finished row is kept; an arm without one (failed, or cut off) starts over, what its
        earlier attempt left set aside under ``arms/attempts/``."""
        out = self.root / "arms"
        out.mkdir(parents=True, exist_ok=True)
        row_file = out / f"{arm.name}.json"
        if row_file.is_file():
            row = json.loads(row_file.read_text())
            if not row.get("failed"):
                return row
        self._set_aside(arm)
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
        row["failed"] = result.returncode != 0 or row["rise"] is None
        row_file.write_text(json.dumps(row, indent=1) + "\n")
        return row

    def _set_aside(self, arm: Arm) -> None:
        """Move what an unfinished attempt of ``arm`` left (row, log, validation dumps, DAPO
        experiment) to ``arms/attempts/<arm>-<k>/``: the next attempt starts clean, nothing is
        lost."""
        out = self.root / "arms"
        left = [
            out / f"{arm.name}.json",
            out / f"{arm.name}.log",
            out / f"{arm.name}-validation",
            self.layout.experiment_dir("dapo", arm.experiment),
        ]
        left = [p for p in left if p.exists()]
        if not left:
            return
        attempts = out / "attempts"
        k = 1
        while (attempts / f"{arm.name}-{k}").exists():
            k += 1
        keep = attempts / f"{arm.name}-{k}"
        keep.mkdir(parents=True)
        for path in left:
            path.rename(keep / path.name)
        print(f"arm {arm.name}: its unfinished attempt is kept in {keep}", flush=True)

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
# The whole proof, and the making of its start
# ---------------------------------------------------------------------------------------------


def verdict(rows: Sequence[dict], settings: CurveSettings = DEFAULTS) -> dict[str, Any]:
    """What the arms show together, by the settings' criterion (``curve_stats.judge``)."""
    return judge(rows, settings.criterion)


def run(
    root: Path,
    settings: CurveSettings,
    gpus: int,
    sandbox_url: str | None,
    *,
    backend: Any = "vllm",
    runner: Runner | None = None,
    start: Path = START_DIR,
) -> dict:
    """Data → the start's check → arms → report; returns ``curve.json``'s content. Raises
    :class:`StartRefused` (a :class:`NoStartInBand`) when the start is missing, altered or
    outside the band here."""
    started = time.monotonic()
    curve = Curve(root, settings, gpus, runner=runner)
    files = write_dataset(root / "synthetic", settings.data)
    timings: dict[str, float] = {"setup_s": round(time.monotonic() - started, 1)}
    with run_code_url(sandbox_url) as url:
        mark = time.monotonic()
        record, check = curve.check_start(start, files["rl_val"], url, backend)
        timings["start_check_s"] = round(time.monotonic() - mark, 1)
        print(
            f"DAPO starts from the kept SFT step {record['sft_step']}: held-out accuracy "
            f"{check['acc']:.3f} here ({record['acc']:.3f} when made), band {settings.band}",
            flush=True,
        )
        mark = time.monotonic()
        rows = curve.run_arms(files, curve.start_dir, url)
        timings["arms_s"] = round(time.monotonic() - mark, 1)
    timings["total_s"] = round(time.monotonic() - started, 1)
    shared = {
        "start_step": record["sft_step"],
        "start_acc": check["acc"],
        "start_acc_when_made": record["acc"],
        "sft_acc_by_step": record["sft_acc_by_step"],
        "band": [settings.band.lo, settings.band.hi],
        "model_params_m": record["model_params_m"],
        "settings": _settings_json(settings),
    }
    rows = [{**row, **shared} for row in rows]
    for row in rows:
        (root / "arms" / f"{row['arm']}.json").write_text(json.dumps(row, indent=1) + "\n")
    result = {
        "proof": curve.proof,
        "gpu": rows[0]["gpu"],
        "gpus": gpus,
        "timing_s": timings,
        "start": {"check": check, "made": record["made"]},
        **shared,
        "arms": rows,
        "verdict": verdict(rows, settings),
    }
    (root / "curve.json").write_text(json.dumps(result, indent=1) + "\n")
    write_report(root, result)
    return result


def make_start(
    root: Path,
    settings: CurveSettings,
    gpus: int,
    sandbox_url: str | None,
    *,
    out: Path = START_DIR,
    backend: Any = "vllm",
    device: str = "cuda",
) -> dict:
    """Model → data → SFT → every saved step scored (until one is past the band) → the pick,
    exported to ``out`` with its record; returns the record. Raises :class:`NoStartInBand`."""
    started = time.monotonic()
    curve = Curve(root, settings, gpus, device=device)
    model = build(curve.layout.model_dir(MODEL_ID), MODEL_SPEC)
    files = write_dataset(root / "synthetic", settings.data)
    sft_s = curve.sft(files, model)
    with run_code_url(sandbox_url) as url:
        mark = time.monotonic()
        acc_by_step = curve.calibrate(files["rl_val"], url, backend)
        calibration_s = time.monotonic() - mark
    step = pick_start(acc_by_step, settings.band, settings.start_target)
    hf_dir = next(d for s, d in curve.saved_sft_steps() if s == step)
    record = {
        "sft_step": step,
        "acc": round(acc_by_step[step], 4),
        "band": [settings.band.lo, settings.band.hi],
        "samples_per_problem": settings.calibration_n,
        "problems": settings.data.rl_val,
        "sft_acc_by_step": {str(k): round(v, 4) for k, v in sorted(acc_by_step.items())},
        "pick": {"nearest": settings.start_target, "scored_every": every_saved(settings)},
        "model_spec": asdict(MODEL_SPEC),
        "model_params_m": round(_param_count(hf_dir) / 1e6, 2),
        "data": asdict(settings.data),
        "sft_args": sft_request(Path("synthetic/sft.parquet"), settings, device).to_argv(),
        "made": {
            "date": time.strftime("%Y-%m-%d"),
            "device": device,
            "machine": gpu_name() if device == "cuda" else _cpu_name(),
            "backend": backend if isinstance(backend, str) else type(backend).__name__,
            "sft_s": round(sft_s, 1),
            "calibration_s": round(calibration_s, 1),
            "total_s": round(time.monotonic() - started, 1),
        },
    }
    record = export_start(hf_dir, out, record)
    print(
        f"start: SFT step {step} ({record['acc']:.3f} held-out, band {settings.band}) "
        f"written to {out}",
        flush=True,
    )
    return record


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    return "cpu"


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
        "--start-dir", type=Path, default=START_DIR, help="the kept start (made by --make-start)"
    )
    parser.add_argument(
        "--make-start",
        action="store_true",
        help="SFT, score every saved step held-out, write the pick to --start-dir; no DAPO",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="--make-start")
    parser.add_argument("--sft-epochs", type=int, default=DEFAULTS.sft_epochs, help="--make-start")
    parser.add_argument(
        "--calibrate-every",
        type=int,
        default=DEFAULTS.calibrate_every,
        help="--make-start: score every k-th saved SFT step",
    )
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
    if not seeds or min(args.dapo_steps, args.sft_epochs, args.calibrate_every) < 1:
        parser.error(
            "--seeds needs one seed at least; --dapo-steps, --sft-epochs and --calibrate-every "
            "must be >= 1"
        )
    settings = replace(
        DEFAULTS,
        sft_epochs=args.sft_epochs,
        calibrate_every=args.calibrate_every,
        dapo_steps=args.dapo_steps,
        seeds=seeds,
        band=band,
        control=not args.no_control,
        parallel=not args.sequential,
        rollout_mode=args.rollout_mode,
    )
    sandbox = os.environ.get("SANDBOX_FUSION_ENDPOINT")
    try:
        if args.make_start:
            make_start(root, settings, args.gpus, sandbox, out=args.start_dir.resolve(),
                       backend=args.backend, device=args.device)  # fmt: skip
            return 0
        result = run(root, settings, args.gpus, sandbox, backend=args.backend,
                     start=args.start_dir.resolve())  # fmt: skip
    except NoStartInBand as exc:
        print(f"learning curve: {exc}; not running DAPO")
        return EXIT_NO_START
    except EvalError as exc:  # the sandbox did not run the tool while a checkpoint was scored
        print(f"learning curve: {exc}")
        return 1
    print(result["verdict"]["line"])
    print(f"report: {root / 'curve.md'}")
    log_to_wandb(root, result)
    failed = result["verdict"]["failed_arms"]
    if failed:
        print(f"learning curve: arms {failed} failed (logs in {root / 'arms'})")
        return 1
    return 0 if result["verdict"]["holds"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
