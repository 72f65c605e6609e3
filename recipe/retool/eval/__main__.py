"""``python -m recipe.retool.eval``: evaluate a checkpoint, compare results, plot progress.

Settings are ``config/eval.yaml`` plus overrides written as training writes its Hydra ones,
``KEY=VALUE`` after the options (any :class:`~recipe.retool.eval.config.EvalConfig` field; the
value is YAML), last wins; a few common ones also have a flag (``--n``, ``--max-new-tokens``).

    python -m recipe.retool.eval --checkpoint latest --root runs/local --sandbox-url URL
    python -m recipe.retool.eval --checkpoint PATH --data-dir runs/local/data \\
        --out-dir /tmp/eval --n 4 --max-new-tokens 256 --backend hf tool_timeout_s=10
    python -m recipe.retool.eval compare --result base=DIR --result sft=DIR \\
        --result dapo=DIR --out-dir DIR
    python -m recipe.retool.eval progress --eval-root CHECKPOINTS/eval --out-dir DIR

Every mistake ends in one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipe.retool.core.paths import BASE_MODEL_ID, Layout
from recipe.retool.eval import report
from recipe.retool.eval.backends import BACKENDS
from recipe.retool.eval.checkpoints import eval_dir, report_dir, resolve_checkpoint
from recipe.retool.eval.config import (
    CONFIG_FILE,
    DEFAULT_DATASETS,
    DEFAULT_SANDBOX_URL,
    EvalConfig,
    EvalError,
)
from recipe.retool.eval.problems import dataset_paths
from recipe.retool.eval.runner import evaluate_checkpoint

PROG = "python -m recipe.retool.eval"


def _layout(root: Path | None) -> Layout:
    return Layout.local(root) if root else Layout.modal()


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items as settings, each value read as YAML (``n=4``, ``tool_config=null``)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EvalError(
                f"cannot read argument {item!r}: expected KEY=VALUE, an eval setting "
                "(e.g. tool_timeout_s=10)"
            )
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise EvalError(f"override {item!r}: the value is not YAML (quote it)") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Evaluate a checkpoint on AIME with the training tool loop (verl ToolAgentLoop + "
            "sandbox + reward). Subcommands: `compare` (base vs SFT vs DAPO report from results) "
            "and `progress` (accuracy against training step); see `... compare --help`."
        ),
    )
    parser.add_argument(
        "--checkpoint",
        default="latest",
        help="latest (DAPO if any, else SFT) | base | sft | dapo | an experiment (or sft/NAME, "
        "dapo/NAME) | a model or step directory",
    )
    parser.add_argument("--root", type=Path, help="local layout root (default: Modal mounts)")
    parser.add_argument("--data-dir", type=Path, help="data root with rl/<dataset>.parquet")
    parser.add_argument("--datasets", default=",".join(DEFAULT_DATASETS), help="comma-separated")
    parser.add_argument("--out-dir", type=Path, help="default: <checkpoints>/eval/<label>")
    parser.add_argument(
        "--force",
        action="store_true",
        help="evaluate again although --out-dir holds a report: the new one goes next to it",
    )
    parser.add_argument("--config", type=Path, default=CONFIG_FILE, help="eval settings yaml")
    parser.add_argument("--n", type=int, help="samples per problem (paper: 32)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--max-new-tokens", type=int, help="response-token budget per sample")
    parser.add_argument("--max-turns", type=int, help="max assistant turns")
    parser.add_argument("--max-problems", type=int, help="first N problems of each dataset")
    parser.add_argument("--concurrency", type=int, help="rollouts in flight")
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument(
        "--sandbox-url",
        default=os.environ.get("SANDBOX_FUSION_ENDPOINT", DEFAULT_SANDBOX_URL),
        help="sandbox base URL (default: $SANDBOX_FUSION_ENDPOINT or %(default)s)",
    )
    parser.add_argument("--base-model", default=BASE_MODEL_ID, help="for --checkpoint base")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="any eval setting (config/eval.yaml), e.g. tool_timeout_s=10; wins over the flags",
    )
    return parser


def _config_from_args(args: argparse.Namespace) -> EvalConfig:
    if not args.config.is_file():
        raise EvalError(f"config {args.config} not found")
    flags = {
        "n": args.n,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_response_tokens": args.max_new_tokens,
        "max_assistant_turns": args.max_turns,
        "max_problems": args.max_problems,
        "max_concurrency": args.concurrency,
    }
    overrides = {k: v for k, v in flags.items() if v is not None} | parse_overrides(args.overrides)
    return EvalConfig.from_yaml(args.config, **overrides)


def run_cli(argv: Sequence[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    cfg = _config_from_args(args)
    if args.root is not None and not args.root.is_dir():
        raise EvalError(f"--root {args.root} is not a directory (the local layout's root)")
    layout = _layout(args.root)
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    datasets = dataset_paths(args.data_dir or layout.data, names)
    ref = resolve_checkpoint(args.checkpoint, layout, args.base_model)
    out_dir = report_dir(args.out_dir or eval_dir(layout, ref.label), force=args.force)
    print(f"evaluating {ref.label} ({ref.path}) → {out_dir}", flush=True)
    summary = evaluate_checkpoint(
        ref.path, datasets, out_dir, cfg, args.sandbox_url, args.backend, checkpoint=ref
    )
    report.show_summary(summary, ref, layout, progress=args.out_dir is None)
    return 0


def _labelled(items: Sequence[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise EvalError(f"--result expects LABEL=DIR, got {item!r}")
        out[label] = Path(path)
    return out


def compare_cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} compare",
        description="Side-by-side report and plot (e.g. base vs SFT vs DAPO) from eval results.",
    )
    parser.add_argument(
        "--result",
        action="append",
        required=True,
        metavar="LABEL=DIR",
        help="a label and a directory of eval_<dataset>.json; repeat, in order",
    )
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    files = report.write_comparison_report(_labelled(args.result), args.out_dir)
    print("\n".join(str(f) for f in files))
    return 0


def progress_cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} progress",
        description="Accuracy against training step from the eval results of one experiment.",
    )
    parser.add_argument("--eval-root", type=Path, required=True, help="<checkpoints>/eval")
    parser.add_argument("--stage", choices=("sft", "dapo"), help="only this stage")
    parser.add_argument("--experiment", help="only this experiment")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.eval_root.is_dir():
        raise EvalError(f"{args.eval_root} is not a directory")
    files = report.write_progress_report(
        sorted(args.eval_root.iterdir()),
        args.out_dir,
        stage=args.stage,
        experiment=args.experiment,
    )
    print("\n".join(str(f) for f in files))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"compare": compare_cli, "progress": progress_cli}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return run_cli(argv)
    except (EvalError, report.ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
