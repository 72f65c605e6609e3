"""Evaluate a checkpoint on AIME 2024/2025 with the training loop: tool calls, sandbox, reward.

Every sample is one run of verl 0.9.1's ``ToolAgentLoop`` (hermes tool parser, our
``code_interpreter`` tool, the sandbox client) scored by ``reward.compute_score``: the same code
path as DAPO's rollouts and validation, with only the LLM server swapped for a generation backend
(``backends``: vLLM on GPU, Hugging Face ``generate`` on CPU). Defaults follow the ReTool
paper's evaluation (``config/eval.yaml``: n=32, T=1.0, top_p=0.7, 16,384 response tokens, 16
assistant turns); metrics are defined in ``metrics``; reports and plots in ``report``.

    python -m recipe.retool.eval.evaluate --checkpoint latest --root runs/local --sandbox-url URL
    python -m recipe.retool.eval.evaluate --checkpoint PATH --data-dir runs/local/data \\
        --out-dir /tmp/eval --n 4 --max-new-tokens 256 --backend hf
    python -m recipe.retool.eval.evaluate compare --result base=DIR --result sft=DIR \\
        --result dapo=DIR --out-dir DIR
    python -m recipe.retool.eval.evaluate progress --eval-root CHECKPOINTS/eval --out-dir DIR

From code (the Modal app and the pipeline): :func:`evaluate_checkpoint`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from recipe.retool.eval import report
from recipe.retool.eval.backends import BACKENDS, HFBackend, TurnBudget, VLLMBackend
from recipe.retool.eval.metrics import (
    SampleResult,
    default_ks,
    is_tool_error,
    mask_turns,
    overall_metrics,
    problem_metrics,
)
from recipe.retool.paths import (
    BASE_MODEL_ID,
    EVAL_SETS,
    CheckpointNotFound,
    Layout,
    resolve_model_dir,
    weights_problem,
)

CONFIG_FILE = Path(__file__).parents[1] / "config" / "eval.yaml"
DEFAULT_DATASETS = EVAL_SETS
DEFAULT_SANDBOX_URL = "http://127.0.0.1:8080"
SCHEMA_VERSION = 1
SUMMARY_FILE = "summary.json"  # written last, only by a successful run: "this eval is done"
INDEX_FILE = "index.jsonl"  # next to the report directories: one line per finished evaluation


class EvalError(RuntimeError):
    """A user-facing failure (bad path, missing data, unreachable sandbox): one line, no trace."""


class EvalConfigError(EvalError, ValueError):
    """Settings that cannot work (unknown key, wrong type, out of range, unreadable yaml)."""


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_problem(name: str, value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the field's annotation (``int``, ``float | None``, ...), if so."""
    allowed = get_args(hint) or (hint,)
    if value is None:
        fits = type(None) in allowed
    elif isinstance(value, bool):
        fits = bool in allowed
    else:
        fits = any(isinstance(value, t) for t in allowed if t not in (bool, type(None)))
        fits = fits or (float in allowed and isinstance(value, int))
    if fits:
        return None
    words = " or ".join(_TYPE_WORDS.get(t, "null") for t in allowed)
    return f"{name}={value!r}: expected {words}"


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings. Defaults: the ReTool paper's evaluation (mirrored in eval.yaml)."""

    n: int = 32  # samples per problem
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = -1
    max_response_tokens: int = 16384  # whole multi-turn response, tool output included
    max_prompt_tokens: int = 2048  # as in DAPO training (vLLM context = prompt + response)
    max_assistant_turns: int = 16
    max_user_turns: int = 16  # tool-response turns
    max_tool_response_length: int | None = None  # chars; None: DAPO training's (dapo.yaml)
    tool_config: str | None = None  # tool yaml; None: the training one
    tool_timeout_s: float | None = None  # None: the tool yaml's (training: 30 s; paper: 10 s)
    max_concurrency: int = 64  # rollouts in flight (the backend may allow fewer)
    max_problems: int | None = None  # first N problems only (smoke runs)
    max_rollout_error_rate: float = 0.0  # fail the run when more rollouts than this crash
    # Fail the run when the sandbox failed to run more than this share of the tool calls (a
    # wrong token, a dead service): its scores would measure a model without its tool.
    max_tool_failure_rate: float = 0.2
    save_samples: bool = True  # samples_<dataset>.jsonl with every response
    seed: int = 0
    # vLLM only
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    dtype: str = "bfloat16"
    enforce_eager: bool = False  # True: no torch.compile or CUDA graphs (small models start fast)

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        wrong = [
            _type_problem(f.name, getattr(self, f.name), hints[f.name])
            for f in dataclasses.fields(self)
        ]
        if any(wrong):
            raise EvalConfigError("invalid eval config: " + "; ".join(filter(None, wrong)))
        problems = []
        if self.n < 1:
            problems.append("n must be >= 1")
        if self.temperature < 0:
            problems.append("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.max_response_tokens < 1 or self.max_prompt_tokens < 1:
            problems.append("token budgets must be >= 1")
        if self.max_assistant_turns < 1 or self.max_user_turns < 0:
            problems.append("max_assistant_turns must be >= 1 and max_user_turns >= 0")
        if self.max_concurrency < 1:
            problems.append("max_concurrency must be >= 1")
        if not 0 <= self.max_tool_failure_rate <= 1:
            problems.append("max_tool_failure_rate must be in [0, 1]")
        if self.max_problems is not None and self.max_problems < 1:
            problems.append("max_problems must be >= 1")
        if self.tool_config is not None and not Path(self.tool_config).is_file():
            problems.append(
                f"tool_config {self.tool_config} is not a file (omit it for the training tool yaml)"
            )
        if problems:
            raise EvalConfigError("invalid eval config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvalConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise EvalConfigError(f"unknown eval config keys: {unknown}; known: {sorted(fields)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: Path = CONFIG_FILE, **overrides: Any) -> EvalConfig:
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise EvalConfigError(f"{path} is not valid YAML{line}: {problem}") from None
        if not isinstance(raw, dict):
            raise EvalConfigError(f"{path} must be a mapping of eval settings (key: value)")
        return cls.from_dict({**raw, **overrides})

    def replace(self, **changes: Any) -> EvalConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# What is evaluated
# ---------------------------------------------------------------------------------------------

_STEP_DIR = re.compile(r"^global_step_(\d+)$")
_STAGE_DIR = re.compile(r"^(sft|dapo)-experiments$")


@dataclass(frozen=True)
class CheckpointRef:
    """A model to evaluate: its HF directory plus what the report says about it."""

    label: str  # also the report directory's name: base, sft-<exp>-step<N>, ...
    path: Path
    stage: str | None = None  # base | sft | dapo | None (an arbitrary model directory)
    experiment: str | None = None
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    @classmethod
    def from_path(cls, path: Path) -> CheckpointRef:
        """Describe a directory; a ``<stage>-experiments/<exp>/global_step_N/...`` path keeps
        its stage, experiment and step; a step directory resolves to its HF weights."""
        path = Path(path)
        if not (path / "config.json").is_file():
            for sub in ("huggingface", "actor/huggingface"):
                if (path / sub / "config.json").is_file():
                    path = path / sub
                    break
        stage = experiment = step = None
        parts = path.parts
        for i, part in enumerate(parts):
            if _STAGE_DIR.match(part) and i + 1 < len(parts):
                stage, experiment = _STAGE_DIR.match(part).group(1), parts[i + 1]
            if _STEP_DIR.match(part):
                step = int(_STEP_DIR.match(part).group(1))
        if stage and step is not None:
            label = f"{stage}-{experiment}-step{step}"
        else:
            label = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.name).strip("-.") or "model"
        return cls(label, path, stage, experiment, step)


def check_model_dir(path: Path) -> None:
    """An HF model directory whose weights load (headers checked, :func:`weights_problem`), or a
    one-line error saying what is missing or broken."""
    if not path.is_dir():
        raise EvalError(f"checkpoint {path} does not exist")
    if not (path / "config.json").is_file():
        raise EvalError(f"{path} is not a Hugging Face model directory (no config.json)")
    if any(path.glob("pytorch_model*.bin")) and not any(path.glob("*.safetensors")):
        return  # pickled weights: no header to check without loading them
    if problem := weights_problem(path):
        raise EvalError(
            f"{problem}; merge the checkpoint first "
            "(modal run recipe/retool/retool_modal_sft.py::merge_checkpoint)"
        )


def resolve_checkpoint(spec: str, layout: Layout, base_model: str = BASE_MODEL_ID) -> CheckpointRef:
    """``base`` | ``latest`` (DAPO if any, else SFT) | ``sft`` | ``dapo`` | an experiment | a path.

    The same resolution serving uses (:func:`recipe.retool.paths.resolve_model_dir`), plus the
    label the reports are filed under.
    """
    if spec == "base":
        ref = CheckpointRef("base", layout.model_dir(base_model), "base")
    else:
        try:
            path = resolve_model_dir(layout, spec)
        except CheckpointNotFound as exc:
            raise EvalError(str(exc)) from None
        ref = CheckpointRef.from_path(path)
    check_model_dir(ref.path)
    return ref


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    index: int  # row in the file
    source_id: str
    data_source: str
    messages: list[dict[str, Any]]
    ground_truth: str
    tools_kwargs: dict[str, Any] = field(default_factory=dict)


def load_problems(path: Path, max_problems: int | None = None) -> list[Problem]:
    """Rows of a verl RL parquet (``prep.RL_SCHEMA``): prompt, reward_model, extra_info."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise EvalError(
            f"dataset {path} not found; run prep first (python -m recipe.retool.data.prep)"
        )
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise EvalError(f"cannot read {path}: {exc}") from None
    missing = {"prompt", "reward_model"} - set(table.column_names)
    if missing:
        raise EvalError(f"{path} is not a verl RL file (missing columns {sorted(missing)})")
    rows = table.to_pylist()[:max_problems] if max_problems else table.to_pylist()
    problems = []
    for i, row in enumerate(rows):
        extra = row.get("extra_info") or {}
        truth = (row.get("reward_model") or {}).get("ground_truth")
        if not row.get("prompt") or truth is None:
            raise EvalError(f"{path} row {i}: empty prompt or ground truth")
        problems.append(
            Problem(
                index=i,
                source_id=str(extra.get("source_id", extra.get("index", i))),
                data_source=row.get("data_source") or "math_dapo",
                messages=[{"role": m["role"], "content": m["content"]} for m in row["prompt"] if m],
                ground_truth=str(truth),
                tools_kwargs={
                    k: v for k, v in (extra.get("tools_kwargs") or {}).items() if v is not None
                },
            )
        )
    if not problems:
        raise EvalError(f"{path} has no rows")
    return problems


def dataset_paths(data_dir: Path, names: Sequence[str]) -> dict[str, Path]:
    """``<data>/rl/<name>.parquet`` (the prep layout), or ``<data_dir>/<name>.parquet``."""
    if not names:
        raise EvalError(
            f"no dataset named: pass --datasets as a comma-separated list, e.g. "
            f"{','.join(DEFAULT_DATASETS)}"
        )
    found = {}
    for name in names:
        candidates = [data_dir / "rl" / f"{name}.parquet", data_dir / f"{name}.parquet"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise EvalError(
                f"dataset {name!r} not found (looked for {candidates[0]} and {candidates[1]}); "
                "run prep first (python -m recipe.retool.data.prep)"
            )
        found[name] = path
    return found


# ---------------------------------------------------------------------------------------------
# Running the loop
# ---------------------------------------------------------------------------------------------


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


def build_tools(cfg: EvalConfig, sandbox_url: str) -> list[Any]:
    """The training tool yaml, pointed at ``sandbox_url``, built by verl's own registry."""
    import tempfile

    from omegaconf import OmegaConf
    from verl.tools.tool_registry import initialize_tools_from_config

    from recipe.retool.launch import TOOL_CONFIG_FILE

    conf = OmegaConf.load(cfg.tool_config or TOOL_CONFIG_FILE)
    for tool in conf.tools:
        if "sandbox_fusion_url" in tool.config:
            tool.config.sandbox_fusion_url = sandbox_url
        if cfg.tool_timeout_s is not None:
            tool.config.default_timeout = cfg.tool_timeout_s
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(OmegaConf.to_yaml(conf))
    try:
        return initialize_tools_from_config(handle.name)
    finally:
        Path(handle.name).unlink(missing_ok=True)


def loop_config(cfg: EvalConfig):
    """verl's ``ppo_trainer`` config with this evaluation's lengths and turn limits."""
    from recipe.retool.local.rollout_cpu import compose_config

    rollout = "actor_rollout_ref.rollout"
    overrides = [
        f"{rollout}.prompt_length={cfg.max_prompt_tokens}",
        f"{rollout}.response_length={cfg.max_response_tokens}",
        f"{rollout}.multi_turn.max_assistant_turns={cfg.max_assistant_turns}",
        f"{rollout}.multi_turn.max_user_turns={cfg.max_user_turns}",
    ]
    tool_chars = cfg.max_tool_response_length or training_tool_response_length()
    overrides.append(f"{rollout}.multi_turn.max_tool_response_length={tool_chars}")
    return compose_config(overrides)


def training_tool_response_length() -> int:
    """The tool-response cut DAPO trains with (config/dapo.yaml), so evaluation matches it."""
    from recipe.retool.launch import load_stage_config

    key = "actor_rollout_ref.rollout.multi_turn.max_tool_response_length"
    return int(load_stage_config("dapo").overrides[key])


def sampling_params(cfg: EvalConfig) -> dict[str, Any]:
    """What verl's agent-loop worker passes to the loop (validation: ``val_kwargs``)."""
    return {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "repetition_penalty": 1.0,
        "logprobs": False,
    }


@dataclass
class _Context:
    cfg: EvalConfig
    backend: Any
    tokenizer: Any
    tools: list[Any]
    config: Any
    params: dict[str, Any]


async def rollout_one(problem: Problem, sample: int, ctx: _Context) -> SampleResult:
    """One sample through ``ToolAgentLoop``, scored by the training reward."""
    from recipe.retool.constants import TOOL_CALLS_KEY
    from recipe.retool.local.rollout_cpu import run_tool_agent, score_rollout

    try:
        out = await run_tool_agent(
            copy.deepcopy(problem.messages),
            server=TurnBudget(ctx.backend, ctx.cfg.max_response_tokens),
            tokenizer=ctx.tokenizer,
            tools=ctx.tools,
            config=ctx.config,
            tools_kwargs=copy.deepcopy(problem.tools_kwargs),
            sampling_params=dict(ctx.params),
        )
    except Exception as exc:
        # one crashed rollout is recorded and counted as wrong (see max_rollout_error_rate)
        return SampleResult(
            problem.index, sample, False, -1.0, None, 0, 0, 0, 0, 0, error=repr(exc)[:500]
        )
    scored = score_rollout(out, ctx.tokenizer, problem.ground_truth, problem.data_source)
    calls = list((out.extra_fields or {}).get(TOOL_CALLS_KEY) or [])
    assistant_turns, tool_turns = mask_turns(out.response_mask)
    response = None
    if ctx.cfg.save_samples:
        response = ctx.tokenizer.decode(out.response_ids, skip_special_tokens=True)
    return SampleResult(
        problem=problem.index,
        sample=sample,
        correct=bool(scored["acc"]),
        score=float(scored["score"]),
        pred=scored["pred"] or None,
        num_turns=int(out.num_turns),
        assistant_turns=assistant_turns,
        tool_turns=tool_turns,
        tool_calls=len(calls),
        tool_errors=sum(1 for c in calls if is_tool_error(c)),
        tool_statuses=[str(c.get("status")) for c in calls],
        response_tokens=len(out.response_ids),
        generated_tokens=int(sum(out.response_mask)),
        truncated=len(out.response_ids) >= ctx.cfg.max_response_tokens,
        response=response,
    )


async def run_samples(problems: Sequence[Problem], ctx: _Context) -> list[SampleResult]:
    """All ``n`` samples of every problem, at most ``concurrency`` in flight (a worker pool, so
    with one worker the order is problem-major and deterministic)."""
    jobs: asyncio.Queue[tuple[Problem, int]] = asyncio.Queue()
    for problem in problems:
        for sample in range(ctx.cfg.n):
            jobs.put_nowait((problem, sample))
    limit = ctx.cfg.max_concurrency
    if getattr(ctx.backend, "max_concurrency", None):
        limit = min(limit, ctx.backend.max_concurrency)
    results: list[SampleResult] = []
    total = jobs.qsize()
    started = time.monotonic()

    async def worker() -> None:
        while not jobs.empty():
            problem, sample = jobs.get_nowait()
            results.append(await rollout_one(problem, sample, ctx))
            done = len(results)
            if done == total or done % max(1, total // 10) == 0:
                print(f"  {done}/{total} samples ({time.monotonic() - started:.0f} s)", flush=True)

    await asyncio.gather(*(worker() for _ in range(min(limit, total))))
    return sorted(results, key=lambda s: (s.problem, s.sample))


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


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def make_backend(backend: str, model_dir: Path, tokenizer: Any, cfg: EvalConfig) -> Any:
    if backend == "hf":
        return HFBackend(
            model_dir, tokenizer, max_new_tokens=cfg.max_response_tokens, seed=cfg.seed
        )
    if backend == "vllm":
        return VLLMBackend(
            model_dir,
            max_model_len=cfg.max_prompt_tokens + cfg.max_response_tokens,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            dtype=cfg.dtype,
            seed=cfg.seed,
            enforce_eager=cfg.enforce_eager,
        )
    raise EvalError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


@contextlib.asynccontextmanager
async def rollout_context(
    model_dir: Path, cfg: EvalConfig, sandbox_url: str, backend: Any
) -> AsyncIterator[_Context]:
    """Tokenizer, tools and engine for rollouts of ``model_dir``; closed on exit (the engine only
    when built here from a backend name). Enter it inside the running event loop: vLLM's
    AsyncLLM and verl's loop bind to it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tools = build_tools(cfg, sandbox_url)
    engine = (
        make_backend(backend, model_dir, tokenizer, cfg) if isinstance(backend, str) else backend
    )
    try:
        yield _Context(cfg, engine, tokenizer, tools, loop_config(cfg), sampling_params(cfg))
    finally:
        for tool in tools:
            client = getattr(tool, "client", None)
            if client is not None:
                await client.aclose()
        if isinstance(backend, str):
            engine.close()


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
    _add_to_index(Path(out_dir), summary)
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


def eval_dir(layout: Layout, label: str) -> Path:
    """Where a checkpoint's reports go by default: ``<checkpoints>/eval/<label>``."""
    return layout.checkpoints / "eval" / label


def has_report(directory: Path) -> bool:
    """Whether an evaluation wrote its reports to ``directory`` (finished or not)."""
    return (directory / SUMMARY_FILE).exists() or any(directory.glob("eval_*.json"))


def report_dir(out_dir: Path, *, force: bool = False) -> Path:
    """Where this evaluation writes: ``out_dir`` while it holds no report. A report there is
    never overwritten: without ``force`` the evaluation is refused; with it the new reports go
    to a sibling ``<out_dir>@<time>`` and both are listed in the index (:data:`INDEX_FILE`)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"--out-dir {out_dir} is a file, not a directory")
    if not has_report(out_dir):
        return out_dir
    if not force:
        raise EvalError(
            f"{out_dir} already holds a report; pass --force to keep it and write a new one "
            f"next to it (listed in {out_dir.parent / INDEX_FILE}), or choose --out-dir"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fresh = out_dir.with_name(f"{out_dir.name}@{stamp}")
    serial = 1
    while fresh.exists():  # two evaluations in one second
        serial += 1
        fresh = out_dir.with_name(f"{out_dir.name}@{stamp}.{serial}")
    return fresh


def _add_to_index(out_dir: Path, summary: dict[str, Any]) -> None:
    """One JSON line per finished evaluation in ``<parent>/index.jsonl``: which checkpoint, with
    which settings, which report directory, what it scored (``O_APPEND``: lines never mix)."""
    cfg = summary["config"]
    entry = {
        "report": out_dir.name,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": summary["checkpoint"],
        "backend": summary["backend"],
        "n": cfg["n"],
        "max_problems": cfg["max_problems"],
        "mean@k": {name: o.get("mean@k") for name, o in summary["datasets"].items()},
    }
    with (out_dir.parent / INDEX_FILE).open("a") as index:
        index.write(json.dumps(entry, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _layout(root: Path | None) -> Layout:
    return Layout.local(root) if root else Layout.modal()


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise EvalError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise EvalError(f"--set {item!r}: the value is not YAML (quote it)") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipe.retool.eval.evaluate",
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
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any EvalConfig field, e.g. --set tool_timeout_s=10",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument(
        "--sandbox-url",
        default=os.environ.get("SANDBOX_FUSION_ENDPOINT", DEFAULT_SANDBOX_URL),
        help="sandbox base URL (default: $SANDBOX_FUSION_ENDPOINT or %(default)s)",
    )
    parser.add_argument("--base-model", default=BASE_MODEL_ID, help="for --checkpoint base")
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
    overrides = {k: v for k, v in flags.items() if v is not None} | _parse_set(args.set)
    return EvalConfig.from_yaml(args.config, **overrides)


def run_cli(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = _config_from_args(args)
    layout = _layout(args.root)
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    datasets = dataset_paths(args.data_dir or layout.data, names)
    ref = resolve_checkpoint(args.checkpoint, layout, args.base_model)
    out_dir = report_dir(args.out_dir or eval_dir(layout, ref.label), force=args.force)
    print(f"evaluating {ref.label} ({ref.path}) → {out_dir}", flush=True)
    summary = evaluate_checkpoint(
        ref.path, datasets, out_dir, cfg, args.sandbox_url, args.backend, checkpoint=ref
    )
    show_summary(summary, ref, layout, progress=args.out_dir is None)
    return 0


def show_summary(
    summary: dict[str, Any], ref: CheckpointRef, layout: Layout, *, progress: bool = True
) -> list[Path]:
    """What the CLI and the Modal function print after an evaluation: the summary table, where
    the reports are, and, for a training checkpoint, the experiment's accuracy-against-step
    report (``progress.png``), brought up to date. Returns the plots written."""
    print(report.summary_table(summary["datasets"]))
    print(f"reports: {summary['out_dir']}")
    if not (progress and ref.stage in ("sft", "dapo")):
        return []
    eval_root = layout.checkpoints / "eval"
    files = report.write_progress_report(
        sorted(eval_root.iterdir()),
        eval_root / f"progress-{ref.stage}-{ref.experiment}",
        stage=ref.stage,
        experiment=ref.experiment,
    )
    print(f"progress: {files[0].parent}")
    return [f for f in files if f.suffix == ".png"]


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
        prog="python -m recipe.retool.eval.evaluate compare",
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
        prog="python -m recipe.retool.eval.evaluate progress",
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
