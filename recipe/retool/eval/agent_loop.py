"""One evaluation rollout: verl 0.9.1's own ``ToolAgentLoop``, in this process, without Ray.

Only the LLM server is replaced, by a generation backend (``backends``: vLLM on GPU, Hugging Face
``generate`` on CPU, or a scripted stand-in in tests) with verl's ``generate`` signature.
Everything else is verl's code path for ``agent_name: tool_agent``: the config is composed from
verl's ``ppo_trainer`` defaults with this evaluation's lengths and turn limits, the loop is built
inside the running event loop (its base class caches ``get_event_loop()``), tools come from the
training tool yaml through ``initialize_tools_from_config``, the output is verl's
``AgentLoopOutput`` (``response_mask`` 1 on model tokens, 0 on tool output), and it is scored by
the training reward (``reward.compute_score``), as DAPO's rollouts and validation are.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from recipe.retool.core.constants import TOOL_CALLS_KEY
from recipe.retool.eval.backends import TurnBudget, make_backend
from recipe.retool.eval.config import EvalConfig
from recipe.retool.eval.metrics import SampleResult, is_tool_error, mask_turns
from recipe.retool.eval.problems import Problem
from recipe.retool.launch.commands import TOOL_CONFIG_FILE, load_stage_config
from recipe.retool.launch.validation import compose
from recipe.retool.verl_plugins.reward import compute_score


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """verl's ``ppo_trainer`` config with multi-turn on (hermes format) plus ``overrides``."""
    return compose(
        "ppo_trainer",
        [
            "actor_rollout_ref.rollout.multi_turn.enable=True",
            "actor_rollout_ref.rollout.multi_turn.format=hermes",
            "actor_rollout_ref.rollout.prompt_length=1024",
            "actor_rollout_ref.rollout.response_length=1024",
            *overrides,
        ],
    )


async def run_tool_agent(
    messages: list[dict[str, Any]],
    *,
    server: Any,
    tokenizer: Any,
    tools: list[Any] | None = None,
    config: DictConfig | None = None,
    tools_kwargs: dict[str, Any] | None = None,
    sampling_params: dict[str, Any] | None = None,
):
    """One rollout through verl's ``ToolAgentLoop``; must be awaited inside a running loop."""
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
    from verl.tools.tool_registry import initialize_tools_from_config
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = config if config is not None else compose_config()
    if tools is None:
        tools = initialize_tools_from_config(str(TOOL_CONFIG_FILE))
    loop = ToolAgentLoop(
        trainer_config=DictConfigWrap(config),
        server_manager=server,
        tokenizer=tokenizer,
        processor=None,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
        hf_model_type="qwen2",
        tools=ToolListWrap(tools),
    )
    params = sampling_params or {"temperature": 1.0, "top_p": 1.0, "top_k": -1}
    return await loop.run(params, raw_prompt=messages, tools_kwargs=tools_kwargs or {})


def score_rollout(output: Any, tokenizer: Any, ground_truth: str, data_source: str = "math_dapo"):
    """Score an ``AgentLoopOutput`` as the DAPO config's reward manager does: the decoded
    response, with ``num_turns`` and the tool's call records in ``extra_info``."""
    text = tokenizer.decode(output.response_ids, skip_special_tokens=True)
    extra = {**(output.extra_fields or {}), "num_turns": output.num_turns}
    return compute_score(data_source, text, ground_truth, extra)


def build_tools(cfg: EvalConfig, sandbox_url: str) -> list[Any]:
    """The training tool yaml, pointed at ``sandbox_url``, built by verl's own registry."""
    import tempfile

    from omegaconf import OmegaConf
    from verl.tools.tool_registry import initialize_tools_from_config

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
