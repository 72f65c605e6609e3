"""Evaluate a checkpoint on AIME 2024/2025 with the training loop: tool calls, sandbox, reward.

Every sample is one run of verl 0.9.1's ``ToolAgentLoop`` (``agent_loop``: hermes tool parser,
our ``code_interpreter`` tool, the sandbox client) scored by ``reward.compute_score``: the same
code path as DAPO's rollouts and validation, with only the LLM server swapped for a generation
backend (``backends``: vLLM on GPU, Hugging Face ``generate`` on CPU). Defaults follow the ReTool
paper's evaluation (``config/eval.yaml``: n=32, T=1.0, top_p=0.7, 16,384 response tokens, 16
assistant turns); metrics are defined in ``metrics``; reports and plots in ``report``.

From code (the Modal app, the pipeline, the smoke run): :func:`evaluate_checkpoint`; from a
shell: ``python -m recipe.retool.eval`` (``__main__``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from recipe.retool.eval import report
from recipe.retool.eval.agent_loop import rollout_context, run_samples
from recipe.retool.eval.backends import BACKENDS
from recipe.retool.eval.checkpoints import (
    SUMMARY_FILE,
    CheckpointRef,
    add_to_index,
    check_model_dir,
)
from recipe.retool.eval.config import SCHEMA_VERSION, EvalConfig, EvalError
from recipe.retool.eval.metrics import SampleResult, default_ks, overall_metrics, problem_metrics
from recipe.retool.eval.problems import Problem, load_problems

PROBE_CODE = "print(6 * 7)"  # what the start-up check runs; the sandbox must print 42


def check_sandbox(url: str, wait_s: float = 60.0) -> None:
    """Fail fast, in one line naming the cause, unless the sandbox at ``url`` runs code for this
    process: wait up to ``wait_s`` for ``GET /v1/ping`` (open, so a starting service is waited
    for), then run :data:`PROBE_CODE` through ``/run_code`` with the token the tool will send
    (``SANDBOX_API_TOKEN``). A ping alone passes a sandbox that would refuse every tool call."""
    import httpx

    from sandbox.client import TOKEN_ENV, SandboxClient, SandboxRequestError, SandboxUnavailable

    base = url.rstrip("/").removesuffix("/run_code")  # the tool accepts either form
    deadline = time.monotonic() + wait_s
    error: Exception | None = None
    while True:
        try:
            if httpx.get(f"{base}/v1/ping", timeout=10).status_code == 200:
                break
        except httpx.HTTPError as exc:
            if error is None:
                print(f"waiting up to {wait_s:.0f} s for the sandbox at {url} ...", flush=True)
            error = exc
        if time.monotonic() > deadline:
            raise EvalError(
                f"sandbox at {url} is not answering ({error or 'ping failed'}); start one with "
                "`python -m sandbox serve` or pass --sandbox-url"
            )
        time.sleep(2.0)
    client = SandboxClient(base, timeout_s=60.0, max_retries=2)
    try:
        result = client.run_code_sync(PROBE_CODE)
    except SandboxRequestError as exc:
        if exc.status_code == 401:
            cause = "is not set" if not os.environ.get(TOKEN_ENV) else "is not its token"
            raise EvalError(
                f"sandbox at {url} refused a test run (HTTP 401): {TOKEN_ENV} {cause}; export "
                "the token the sandbox was started with"
            ) from None
        raise EvalError(f"sandbox at {url} refused a test run: {exc}") from None
    except SandboxUnavailable as exc:
        raise EvalError(f"sandbox at {url} could not run a test program: {exc}") from None
    finally:
        client.close()
    if result.stdout.strip() != "42":
        raise EvalError(
            f"sandbox at {url} ran {PROBE_CODE!r} but answered {result.status} with stdout "
            f"{result.stdout.strip()[:80]!r} (stderr {result.stderr.strip()[-160:]!r})"
        )


def score_dataset(
    name: str, problems: Sequence[Problem], samples: Sequence[SampleResult], cfg: EvalConfig
) -> dict[str, Any]:
    """The ``eval_<dataset>.json`` body (without checkpoint/backend, added by the caller)."""
    by_problem: dict[int, list[SampleResult]] = {p.index: [] for p in problems}
    for s in samples:
        by_problem[s.problem].append(s)
    ks = default_ks(cfg.n)
    per_problem = []
    for p in problems:
        metrics = problem_metrics(by_problem[p.index], p.ground_truth, ks)
        per_problem.append(
            {"index": p.index, "source_id": p.source_id, "ground_truth": p.ground_truth, **metrics}
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": name,
        "overall": overall_metrics(per_problem, samples),
        "per_problem": per_problem,
    }


async def _evaluate_async(
    model_dir: Path,
    datasets: dict[str, list[Problem]],
    cfg: EvalConfig,
    sandbox_url: str,
    backend: Any,
) -> dict[str, list[SampleResult]]:
    async with rollout_context(model_dir, cfg, sandbox_url, backend) as ctx:
        results = {}
        for name, problems in datasets.items():
            print(f"{name}: {len(problems)} problems × {cfg.n} samples", flush=True)
            results[name] = await run_samples(problems, ctx)
        return results


def evaluate_checkpoint(
    model_dir: Path,
    datasets: dict[str, Path],
    out_dir: Path,
    cfg: EvalConfig,
    sandbox_url: str,
    backend: str | Any = "hf",
    *,
    checkpoint: CheckpointRef | None = None,
) -> dict[str, Any]:
    """Evaluate one model on each ``datasets`` file; write the reports; return the summary.

    ``model_dir``: a Hugging Face directory with weights. ``datasets``: name → verl RL parquet
    (``{"aime_2024": layout.rl_file("aime_2024"), ...}``). ``backend``: ``"hf"`` (CPU),
    ``"vllm"`` (GPU), or a ready object with the ``backends.GenerationBackend`` shape.
    ``checkpoint`` labels the report (stage/experiment/step); default: derived from the path.

    Writes to ``out_dir``: ``eval_<dataset>.json`` (keys: ``schema_version``, ``dataset``,
    ``checkpoint``, ``backend``, ``config``, ``overall``, ``per_problem``, ``timing``),
    ``samples_<dataset>.jsonl`` (``cfg.save_samples``), ``report.md`` and, last and only on
    success, ``summary.json`` (the returned dict; a pipeline can skip a checkpoint that has one).
    Returns ``{"checkpoint", "backend", "config", "out_dir", "files", "wall_s", "datasets":
    {name: overall}}``. Raises :class:`EvalError` for bad inputs or when more than
    ``cfg.max_rollout_error_rate`` of the rollouts crashed, or when the sandbox failed to run
    more than ``cfg.max_tool_failure_rate`` of the tool calls (both after writing the reports).
    """
    model_dir = Path(model_dir)
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise EvalError("--backend vllm needs vLLM (the trainer image); on CPU use --backend hf")
    if isinstance(backend, str) and backend not in BACKENDS:
        raise EvalError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    check_model_dir(model_dir)
    ref = checkpoint or CheckpointRef.from_path(model_dir)
    problems = {name: load_problems(Path(p), cfg.max_problems) for name, p in datasets.items()}
    check_sandbox(sandbox_url)
    started = time.monotonic()
    samples = asyncio.run(_evaluate_async(model_dir, problems, cfg, sandbox_url, backend))
    wall_s = time.monotonic() - started

    backend_name = backend if isinstance(backend, str) else type(backend).__name__
    results = {}
    for name, dataset_samples in samples.items():
        result = score_dataset(name, problems[name], dataset_samples, cfg)
        result.update(
            checkpoint=ref.to_dict(),
            backend=backend_name,
            config=asdict(cfg),
            timing={"wall_s_all_datasets": round(wall_s, 3)},
        )
        results[name] = result
    files = report.write_checkpoint_report(out_dir, results, samples, cfg.save_samples)
    summary = {
        "checkpoint": ref.to_dict(),
        "backend": backend_name,
        "config": asdict(cfg),
        "out_dir": str(out_dir),
        "files": [str(f) for f in files],
        "wall_s": round(wall_s, 3),
        "datasets": {name: r["overall"] for name, r in results.items()},
    }
    crashed = sum(r["overall"]["rollout_errors"] for r in results.values())
    total = sum(r["overall"]["num_samples"] for r in results.values())
    if total and crashed / total > cfg.max_rollout_error_rate:
        first = next(s.error for v in samples.values() for s in v if s.error)
        raise EvalError(
            f"{crashed}/{total} rollouts crashed (first: {first}); reports in {out_dir} count "
            "them as wrong"
        )
    refuse_broken_tool(
        [r["overall"] for r in results.values()], cfg, sandbox_url, f"; reports in {out_dir}"
    )
    summary["files"].append(str(Path(out_dir) / SUMMARY_FILE))
    report.write_json(Path(out_dir) / SUMMARY_FILE, summary)  # last: marks the run complete
    add_to_index(Path(out_dir), summary)
    return summary


def refuse_broken_tool(
    overalls: Sequence[dict[str, Any]], cfg: EvalConfig, sandbox_url: str, where: str = ""
) -> None:
    """Raise :class:`EvalError` when the sandbox failed to run more than
    ``cfg.max_tool_failure_rate`` of the tool calls scored in ``overalls`` (``score_dataset``'s
    ``overall`` blocks): such scores measure the model without its tool. ``where`` ends the
    message (where the reports are)."""
    calls = sum(o["tool_calls"] for o in overalls)
    failed = sum(o["tool_failures"] for o in overalls)
    if calls and failed / calls > cfg.max_tool_failure_rate:
        raise EvalError(
            f"the sandbox at {sandbox_url} failed to run {failed}/{calls} tool calls "
            f"({failed / calls:.0%}, over max_tool_failure_rate={cfg.max_tool_failure_rate:g}): "
            f"the scores measure the model without its tool{where}"
        )
