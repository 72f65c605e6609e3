"""``python -m recipe.retool.launch check sft|dapo [--gpus N] [--nodes N] [ARGS...]``: the dry run
Modal lacks, validating a launch exactly as ``train``/``train_dapo`` will."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from recipe.retool.core.paths import Layout
from recipe.retool.core.request import LaunchError, LaunchRequest, parse
from recipe.retool.core.topology import Topology
from recipe.retool.launch.commands import (
    render,
    sft_command,
    sft_overrides,
)
from recipe.retool.launch.cost import estimate_cost
from recipe.retool.launch.validation import ineffective_overrides, validate


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recipe.retool.launch check sft|dapo [--gpus N] [--nodes N] [ARGS...]``.

    The dry run Modal lacks: validates a launch exactly as ``train``/``train_dapo`` will, on this
    machine, before any GPU starts (``make sft``/``make dapo`` run it first), and prints the
    command line and the cost line.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m recipe.retool.launch", description=main.__doc__
    )
    parser.add_argument("action", choices=["check"])
    parser.add_argument("stage", choices=["sft", "dapo"])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node (RETOOL_GPUS)")
    parser.add_argument("--nodes", type=int, default=1)
    ns, rest = parser.parse_known_args(argv)  # the rest: options and overrides, as after --
    layout = Layout.from_env()  # the volumes in a container, RETOOL_ROOT in a test
    try:
        topo = Topology(gpus_per_node=ns.gpus, nnodes=ns.nodes)
        request = parse(ns.stage, rest)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return check(layout, request, topo)


def check(layout: Layout, request: LaunchRequest, topo: Topology) -> int:
    """Compose and validate ``request`` as its launch will, printing the notes, the command
    line, the ``ok`` line and the cost line: 0, or 2 after one ``error:`` line (stderr)."""
    from recipe.retool.core.paths import BASE_MODEL_ID, MODELS_MOUNT
    from recipe.retool.records.tracking import check_wandb, launch_env

    stage = request.stage
    try:
        experiment = request.experiment or f"{stage}-<timestamp>"
        if stage == "sft":
            model = MODELS_MOUNT / BASE_MODEL_ID
            overrides = sft_overrides(layout, experiment, model, topo, request.overrides)
            command = sft_command(overrides, topo)
            composed = validate(stage, overrides, topo)
            notes: list[str] = []
        else:
            from recipe.retool.launch.async_plan import plan_dapo

            model = Path(request.sft_checkpoint or "<latest complete SFT checkpoint>")
            plan = plan_dapo(layout, experiment, model, topo, request)
            overrides, command, composed, notes = (
                plan.overrides,
                plan.command,
                plan.composed,
                plan.notes,
            )
        start = _dapo_start_note(layout, request.sft_checkpoint) if stage == "dapo" else None
        check_wandb(composed, launch_env())
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    for warning in ineffective_overrides(stage, composed, request.overrides):
        print(f"warning: {warning}", file=sys.stderr)
    print(render(command))
    print(f"ok: {len(overrides)} overrides compose against verl's config")
    if start:
        print(start)
    print(estimate_cost(stage, topo))
    return 0


def _dapo_start_note(layout: Layout, requested: str | None) -> str:
    """What ``check`` can say of DAPO's start: checked here where the checkpoints volume is
    mounted, else (a laptop) left to the launch, which refuses a missing or broken one in one
    line (``core.paths.resolve_sft_checkpoint``)."""
    what = f"--sft-checkpoint={requested}" if requested else "the latest complete SFT checkpoint"
    if not layout.checkpoints.is_dir():
        return (
            f"note: DAPO's start ({what}) is checked at launch: {layout.checkpoints} (the "
            "checkpoints volume) is not mounted here"
        )
    from recipe.retool.core.paths import CheckpointNotFound, resolve_sft_checkpoint

    try:
        return f"DAPO starts from {resolve_sft_checkpoint(layout, requested)}"
    except CheckpointNotFound as exc:
        raise LaunchError(str(exc)) from None
