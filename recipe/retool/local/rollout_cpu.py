"""Run verl's own ``ToolAgentLoop`` on CPU, without Ray or an inference engine.

Only the LLM server is replaced, by an object with verl's ``generate`` signature:

* :class:`ScriptedServer` replays pre-written assistant turns (tests: the parser, our tool, the
  sandbox and the reward run for real, deterministically);
* :class:`HFGenerateServer` samples from a Hugging Face model with ``model.generate`` (the local
  smoke run: the tiny model really generates, the loop really parses and calls the tool).

Everything else is verl 0.9.1's code path for ``agent_name: tool_agent``: the config is composed
from verl's ``ppo_trainer`` defaults, the loop is built inside the running event loop (its base
class caches ``get_event_loop()``), tools come from ``initialize_tools_from_config``, and the
output is verl's ``AgentLoopOutput`` (``response_mask`` 1 on model tokens, 0 on tool output).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from recipe.retool.launch import TOOL_CONFIG_FILE, compose
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


class ScriptedServer:
    """Stands in for verl's LLM server: returns the next pre-written turn on every call.

    Each turn is tokenised as the model would emit it, ending in ``<|im_end|>``. ``calls`` keeps
    the prompt each call saw (verl passes the whole running context every time).
    """

    def __init__(self, turns: Sequence[str], tokenizer: Any) -> None:
        self.turns = list(turns)
        self.tokenizer = tokenizer
        self.calls: list[list[int]] = []

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ):
        from verl.workers.rollout.replica import TokenOutput

        if len(self.calls) >= len(self.turns):
            raise RuntimeError(f"script has only {len(self.turns)} turns")
        text = self.turns[len(self.calls)] + self.tokenizer.eos_token
        self.calls.append(list(prompt_ids))
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return TokenOutput(token_ids=ids, stop_reason="completed")


def generate_kwargs(
    sampling_params: dict[str, Any], eos_ids: list[int], pad_id: int | None, max_new: int
) -> dict[str, Any]:
    """``model.generate`` arguments for verl's sampling params (``temperature``, ``top_p``,
    ``top_k``, ``stop_token_ids``); temperature 0 is greedy, as in vLLM."""
    temperature = float(sampling_params.get("temperature", 1.0) or 0.0)
    top_k = int(sampling_params.get("top_k", -1) or -1)
    stop = {*eos_ids, *(sampling_params.get("stop_token_ids") or [])}
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new,
        "eos_token_id": sorted(stop),
        "pad_token_id": pad_id,
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs.update(
            temperature=temperature,
            top_p=float(sampling_params.get("top_p", 1.0)),
            top_k=top_k if top_k > 0 else 0,
        )
    return kwargs


class HFGenerateServer:
    """Stands in for verl's LLM server with real sampling from a HF causal LM (CPU smoke runs).

    Honours verl's sampling params (``temperature``, ``top_p``, ``top_k``, ``max_tokens``,
    ``stop_token_ids``); ``max_new_tokens`` caps each turn so a tiny random model cannot run long.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 128, seed: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.calls = 0

    def _generate(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> list[int]:
        import torch

        max_new = min(
            int(sampling_params.get("max_tokens") or self.max_new_tokens), self.max_new_tokens
        )
        kwargs = generate_kwargs(
            sampling_params, [self.tokenizer.eos_token_id], self.tokenizer.pad_token_id, max_new
        )
        torch.manual_seed(self.seed + self.calls)
        self.calls += 1
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        with torch.no_grad():
            out = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), **kwargs
            )
        return out[0, len(prompt_ids) :].tolist()

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ):
        from verl.workers.rollout.replica import TokenOutput

        ids = await asyncio.to_thread(self._generate, list(prompt_ids), sampling_params)
        return TokenOutput(token_ids=ids, stop_reason="completed")


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
