"""Score many checkpoints of one model on the same problems with one engine.

The learning curve picks its DAPO start by measuring every saved SFT step on the held-out
problems. Building a vLLM engine costs about a minute, scoring a tiny model's step a few seconds:
so one engine is built for the first step and each later step's weights are swapped in
(``backend.load_weights``) before its rollouts. Rollouts, tool calls and scoring are evaluation's
own (``agent_loop.run_samples``), so a step's accuracy here is the accuracy ``make eval`` reports,
and so are its checks: a sandbox that does not run code for this process, or fails to run too
many of a step's tool calls, stops the sweep in one line (:class:`config.EvalError`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from recipe.retool.eval.agent_loop import rollout_context, run_samples
from recipe.retool.eval.config import EvalConfig
from recipe.retool.eval.problems import Problem
from recipe.retool.eval.runner import check_sandbox, refuse_broken_tool, score_dataset


async def _sweep(
    steps: Sequence[tuple[int, Path]],
    problems: Sequence[Problem],
    cfg: EvalConfig,
    sandbox_url: str,
    backend: Any,
    stop: Callable[[float], bool],
) -> dict[int, float]:
    acc: dict[int, float] = {}
    async with rollout_context(steps[0][1], cfg, sandbox_url, backend) as ctx:
        for i, (step, model_dir) in enumerate(steps):
            started = time.monotonic()
            if i:
                await ctx.backend.load_weights(model_dir)
            samples = await run_samples(problems, ctx)
            overall = score_dataset("held-out", problems, samples, cfg)["overall"]
            refuse_broken_tool([overall], cfg, sandbox_url, f" (scoring step {step})")
            acc[step] = overall["mean@k"]
            print(
                f"step {step}: held-out accuracy {acc[step]:.3f} "
                f"({len(samples)} samples, {time.monotonic() - started:.1f} s)",
                flush=True,
            )
            if stop(acc[step]):
                break
    return acc


def score_steps(
    steps: Sequence[tuple[int, Path]],
    problems: Sequence[Problem],
    cfg: EvalConfig,
    sandbox_url: str,
    backend: str | Any = "hf",
    *,
    stop: Callable[[float], bool] = lambda acc: False,
) -> dict[int, float]:
    """``{step: mean accuracy}`` for ``steps`` (``(step, HF model dir)``, scored in the order
    given) until ``stop(accuracy)`` is true. ``backend``: ``"vllm"``, ``"hf"`` or a ready object
    with ``generate`` and ``load_weights``."""
    if not steps:
        raise ValueError("no checkpoints to score")
    check_sandbox(sandbox_url)
    return asyncio.run(_sweep(steps, problems, cfg, sandbox_url, backend, stop))
