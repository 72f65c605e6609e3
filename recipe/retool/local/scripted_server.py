"""A stand-in for verl's LLM server that replays pre-written assistant turns.

With it, verl's own ``ToolAgentLoop`` (``eval.agent_loop.run_tool_agent``) runs deterministically:
the hermes parser, our tool, the sandbox and the reward run for real on turns whose content is
known, so tests and the local smoke run can assert exact tool calls, responses and scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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
