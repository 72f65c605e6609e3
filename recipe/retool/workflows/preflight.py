"""What a launch checks before any GPU starts, run where the run will run (the Modal app's
``check_launch``: this image's verl, the volumes, the secrets, the sandbox).

Each check returns ``{"error": one line or None, "lines": [what the checks printed], ...}`` and
never raises for a mistake it can name: the launch prints the line and exits 2.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from recipe.retool.core.paths import CheckpointNotFound, Layout
from recipe.retool.core.request import LaunchError, LaunchRequest
from recipe.retool.core.topology import Topology
from recipe.retool.eval.checkpoints import eval_dir, report_dir, resolve_checkpoint
from recipe.retool.eval.config import EvalConfig, EvalError
from recipe.retool.eval.runner import check_sandbox
from recipe.retool.launch import check
from recipe.retool.launch.commands import load_stage_config
from recipe.retool.records.follow import project_override
from recipe.retool.stages.sft import check_sft_inputs
from recipe.retool.stages.tool_sandbox import NodeSandboxError, tool_sandbox
from recipe.retool.workflows.pipeline import PIPELINE_STAGES

Found = dict[str, Any]


def check_training(
    layout: Layout,
    request: LaunchRequest,
    topo: Topology,
    *,
    deployed_url: Callable[[], str],
    also_refused: tuple[type[Exception], ...] = (),
) -> Found:
    """``launch check``'s checks here, where the volumes are mounted (DAPO's start is checked
    too), and for SFT its data and base model; DAPO's sandbox runs a test program.
    ``also_refused``: the caller's own one-line errors (the deployed sandbox's lookup)."""
    stage = request.stage
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = check.check(layout, request, topo)
    lines = out.getvalue().splitlines() + err.getvalue().splitlines()
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    command = shlex.quote(sys.executable) + " "  # the trainer's command line: long, not shown
    shown = [line for line in lines if not line.startswith(("error: ", command))]
    plan: Found = {"lines": shown}
    if code:
        return plan | {"error": errors[-1] if errors else f"launch check exited {code}"}
    try:
        if stage == "sft":
            check_sft_inputs(layout, layout.model_dir(), request)
        else:
            plan["lines"].append(check_tool_sandbox(request.sandbox, deployed_url))
    except (LaunchError, NodeSandboxError, EvalError, *also_refused) as exc:
        return plan | {"error": str(exc)}
    project = project_override(
        request.overrides, load_stage_config(stage).overrides["trainer.project_name"]
    )
    return plan | {"error": None, "experiment": request.experiment, "project": project}


def check_tool_sandbox(choice: str | None, deployed_url: Callable[[], str]) -> str:
    """The tool's sandbox as the run will get it (``stages/tool_sandbox.py``'s order), checked
    without making Modal Sandboxes: those cost CPU-hours and a minute to start, so the check
    names them and the run makes them. This node's sandbox (or the deployed one) runs a test
    program; a node that fails its self-test under ``auto`` says that the run falls back to the
    pool."""
    if choice == "modal":
        return "sandbox: Modal Sandboxes (--sandbox=modal), made when the run starts"
    try:
        with tool_sandbox(choice or "node", deployed_url=deployed_url) as url:
            check_sandbox(url)
    except NodeSandboxError as exc:
        if choice is not None:
            raise
        return f"sandbox: not this node's ({exc}); the run falls back to Modal Sandboxes"
    return f"sandbox: {url} ran a test program"


def check_evaluation(layout: Layout, options: dict, deployed_url: Callable[[], str]) -> Found:
    """The evaluation's settings, its checkpoint on the volume, its report directory, and the
    tool sandbox it will use (:func:`check_tool_sandbox`)."""
    lines = []
    try:
        cfg = EvalConfig.from_yaml()
        replace(cfg, n=options.get("n") or cfg.n,
                max_problems=options.get("max_problems") or cfg.max_problems)  # fmt: skip
        if not options.get("experiment"):
            ref = resolve_checkpoint(options.get("checkpoint", "latest"), layout)
            report_dir(eval_dir(layout, ref.label), force=bool(options.get("force")))
            lines.append(f"evaluates {ref.path}")
        lines.append(check_tool_sandbox(None, deployed_url))
    except (EvalError, CheckpointNotFound, NodeSandboxError) as exc:
        return {"lines": lines, "error": str(exc)}
    return {"lines": lines, "error": None}


def check_pipeline(options: dict) -> Found:
    """The stages ``--force`` names exist."""
    unknown = set(filter(None, options.get("force", "").split(","))) - set(PIPELINE_STAGES)
    if unknown:
        return {"lines": [], "error": f"--force: unknown stage(s) {sorted(unknown)}; stages are "
                                      f"{PIPELINE_STAGES}"}  # fmt: skip
    return {"lines": [], "error": None}
