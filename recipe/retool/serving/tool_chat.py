"""The serving tool loop: ask the model, run its code in the sandbox, repeat until it answers.

Training and evaluation run verl's ``ToolAgentLoop`` on token ids. A served model speaks chat
messages instead, so this is the same loop on the message level, for any backend that completes a
chat with the ``code_interpreter`` tool offered:

* :class:`OpenAIChatBackend`: an OpenAI-compatible ``/v1/chat/completions`` (vLLM started with
  ``--enable-auto-tool-choice --tool-call-parser hermes`` returns structured ``tool_calls``; a
  server without a tool parser returns the model's raw ``<tool_call>{json}</tool_call>`` text,
  which is parsed here);
* :class:`HFChatBackend`: a Hugging Face model on the CPU (renders the chat template with the
  tool, generates, parses the hermes blocks) - the tests' tiny model.

Each call runs through :func:`recipe.retool.verl_plugins.interpreter.run_code_call`, the
function the verl tool uses, so a served model reads back exactly what it read in training. A
malformed call (bad JSON, unknown tool, no ``code``) is answered with a tool message saying what
was wrong - the model can correct itself, and the loop never crashes on model output.

    result = await chat_with_tools(messages, OpenAIChatBackend(url, "retool"), SandboxClient(url))
    result.boxed, result.num_tool_calls, result.messages
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import httpx

from recipe.retool.core.constants import TOOL_NAME, TOOL_SCHEMA
from recipe.retool.verl_plugins.interpreter import run_code_call
from recipe.retool.verl_plugins.reward import extract_answer
from sandbox.client import SandboxClient

_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


class BackendError(RuntimeError):
    """The model server failed (unreachable, HTTP error, unreadable reply)."""


# ---------------------------------------------------------------------------------------------
# Tool calls: parsing and validation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One call the model made; ``error`` (for the model to read) when it cannot run.

    ``arguments`` is the decoded JSON (None when it did not decode). A call with a name and
    decodable arguments goes back to the model as a structured ``tool_calls`` entry even when it
    is wrong (unknown tool, no ``code``); one that does not decode stays in the message text.
    """

    id: str
    name: str
    arguments: Any
    raw: str  # what the model wrote for this call (the hermes block, or the function JSON)
    error: str | None = None

    @property
    def code(self) -> str | None:
        return self.arguments["code"] if self.error is None else None

    @property
    def structured(self) -> bool:
        return bool(self.name) and self.arguments is not None


def validate_call(call_id: str, name: Any, arguments: Any, raw: str) -> ToolCall:
    """Check a call against the tool's schema; a bad one carries an error the model can read."""
    name = name if isinstance(name, str) else ""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return ToolCall(call_id, name, None, raw, f"Error: the arguments are not JSON ({exc}).")
    if name != TOOL_NAME:
        error = f"Error: unknown tool {name!r}. The only tool is `{TOOL_NAME}`."
        return ToolCall(call_id, name, arguments, raw, error)
    if not isinstance(arguments, dict):
        error = 'Error: the arguments must be a JSON object: {"code": "<python code>"}.'
        return ToolCall(call_id, name, arguments, raw, error)
    code = arguments.get("code")
    if not isinstance(code, str) or not code.strip():
        what = "is missing" if code is None else "must be a non-empty string"
        return ToolCall(call_id, name, arguments, raw, f"Error: the argument `code` {what}.")
    return ToolCall(call_id, name, arguments, raw)


def parse_hermes(text: str, id_prefix: str = "call") -> tuple[str, list[ToolCall]]:
    """Split model text into (text without the structured calls, all calls in order).

    A block is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; one cut off by the
    token limit runs to the end of the text. Blocks that do not decode stay in the text (the
    model wrote them and should see them again) and come back as calls with an ``error``.
    """
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for i, match in enumerate(_HERMES_BLOCK.finditer(text)):
        call_id = f"{id_prefix}_{i}"
        body, block = match.group(1).strip(), match.group(0)
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as exc:
            error = (
                "Error: the tool call is not valid JSON "
                f'({exc}); write <tool_call>{{"name": "{TOOL_NAME}", "arguments": '
                '{"code": "..."}}</tool_call>.'
            )
            call = ToolCall(call_id, "", None, block, error)
        else:
            if isinstance(payload, dict):
                args = payload.get("arguments", payload.get("parameters"))
                call = validate_call(call_id, payload.get("name"), args, block)
            else:
                call = validate_call(call_id, None, None, block)
        calls.append(call)
        kept.append(text[pos : match.start()])
        if not call.structured:
            kept.append(block)
        pos = match.end()
    kept.append(text[pos:])
    return "".join(kept).strip(), calls


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Per-turn sampling. Defaults: the ReTool paper's evaluation (temperature 1.0, top_p 0.7)."""

    temperature: float = 1.0
    top_p: float = 0.7
    max_tokens: int = 8192  # per assistant turn


@dataclass(frozen=True)
class ModelTurn:
    """One assistant turn: its text (without well-formed tool calls) and its tool calls."""

    content: str
    tool_calls: list[ToolCall]
    finish_reason: str | None = None  # "stop", "length", "tool_calls", ...


class ChatBackend(Protocol):
    async def complete(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]], sampling: Sampling
    ) -> ModelTurn: ...


class OpenAIChatBackend:
    """An OpenAI-compatible chat server (vLLM ``--tool-call-parser hermes``, or any other).

    ``base_url`` may end in ``/v1`` or not. Redirects are followed: Modal answers a web request
    that runs past 150 s with a 303 to a result URL.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 1800.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url = base_url.rstrip("/")
        self.url = (url if url.endswith("/v1") else url + "/v1") + "/chat/completions"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            timeout=timeout_s, headers=headers, follow_redirects=True, transport=transport
        )
        self._turns = 0

    async def complete(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]], sampling: Sampling
    ) -> ModelTurn:
        body = {
            "model": self.model,
            "messages": messages,
            "tools": tools,
            "tool_choice": "auto",
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        try:
            resp = await self._http.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            raise BackendError(f"{self.url}: HTTP {resp.status_code}: {resp.text[:500]}")
        try:
            choice = resp.json()["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"{self.url}: unreadable reply: {resp.text[:500]}") from exc
        self._turns += 1
        prefix = f"call_{self._turns}"
        content = message.get("content") or ""
        structured = message.get("tool_calls") or []
        if structured:
            calls = [
                validate_call(
                    tc.get("id") or f"{prefix}_{i}",
                    (tc.get("function") or {}).get("name"),
                    (tc.get("function") or {}).get("arguments"),
                    json.dumps(tc.get("function") or {}, ensure_ascii=False),
                )
                for i, tc in enumerate(structured)
            ]
            return ModelTurn(content.strip(), calls, choice.get("finish_reason"))
        text, calls = parse_hermes(content, prefix)  # no tool parser on the server
        return ModelTurn(text, calls, choice.get("finish_reason"))

    async def aclose(self) -> None:
        await self._http.aclose()


class HFChatBackend:
    """A Hugging Face causal LM on the CPU: chat template with the tool, generate, parse hermes.

    ``max_new_tokens`` caps every turn (a tiny random model would otherwise run to the limit).
    Generation runs in a worker thread, one request at a time.
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, max_new_tokens: int = 512, seed: int = 0
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self._lock = asyncio.Lock()
        self._turns = 0

    @staticmethod
    def _for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Qwen2.5's template renders ``arguments | tojson``: give it objects, not strings."""
        out = []
        for message in messages:
            calls = message.get("tool_calls")
            if calls:
                message = {**message, "tool_calls": [_decoded_call(c) for c in calls]}
            out.append(message)
        return out

    def _generate(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], s: Sampling):
        import torch

        prompt = self.tokenizer.apply_chat_template(
            self._for_template(messages), tools=tools, add_generation_prompt=True, tokenize=False
        )
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        kwargs: dict[str, Any] = {
            "max_new_tokens": min(s.max_tokens, self.max_new_tokens),
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        torch.manual_seed(self.seed + self._turns)
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        new = out[0, ids.shape[1] :].tolist()
        finished = bool(new) and new[-1] == self.tokenizer.eos_token_id
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return text, "stop" if finished else "length"

    async def complete(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]], sampling: Sampling
    ) -> ModelTurn:
        async with self._lock:
            self._turns += 1
            text, finish = await asyncio.to_thread(self._generate, messages, tools, sampling)
        content, calls = parse_hermes(text, f"call_{self._turns}")
        return ModelTurn(content, calls, "tool_calls" if calls else finish)


def _decoded_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        with contextlib.suppress(json.JSONDecodeError):
            fn["arguments"] = json.loads(fn["arguments"])
    return {**call, "function": fn}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeSettings:
    """How calls run in the sandbox (the training tool's defaults)."""

    run_timeout: float = 30.0
    memory_limit_mb: int = 1024
    output_cap_chars: int = 4096


@dataclass(frozen=True)
class ToolCallRecord:
    """One tool call as it happened: what ran, what the model read back, how the sandbox fared."""

    id: str
    turn: int
    code: str | None
    output: str
    status: str  # sandbox status, or InvalidCall for a malformed call that never ran
    run_status: str | None
    latency_s: float
    timed_out: bool = False
    truncated: bool = False
    error: str | None = None  # why a malformed call was not run


@dataclass
class ChatResult:
    answer: str  # the final assistant message's text
    boxed: str | None  # the final answer, as the reward extracts it
    messages: list[dict[str, Any]]  # the whole conversation, input included
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    num_turns: int = 0  # assistant turns (model calls)
    stop_reason: str = "stop"  # stop | length | max_turns
    wall_s: float = 0.0

    @property
    def num_tool_calls(self) -> int:
        return len(self.tool_calls)

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "boxed": self.boxed,
            "stop_reason": self.stop_reason,
            "num_turns": self.num_turns,
            "num_tool_calls": self.num_tool_calls,
            "tool_calls": [asdict(c) for c in self.tool_calls],
            "trace": self.messages,
            "wall_s": round(self.wall_s, 3),
        }


def _assistant_message(turn: ModelTurn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": turn.content}
    structured = [c for c in turn.tool_calls if c.structured]
    if structured:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.name,
                    "arguments": json.dumps(c.arguments, ensure_ascii=False),
                },
            }
            for c in structured
        ]
    return message


async def _run_call(
    call: ToolCall, turn: int, sandbox: SandboxClient, settings: CodeSettings
) -> ToolCallRecord:
    if call.error is not None:
        return ToolCallRecord(call.id, turn, None, call.error, "InvalidCall", None, 0.0,
                              error=call.error)  # fmt: skip
    run = await run_code_call(
        sandbox,
        call.code,
        run_timeout=settings.run_timeout,
        memory_limit_mb=settings.memory_limit_mb,
        output_cap_chars=settings.output_cap_chars,
    )
    return ToolCallRecord(
        call.id, turn, call.code, run.text, run.status, run.run_status, round(run.latency_s, 6),
        timed_out=run.timed_out, truncated=run.truncated,
    )  # fmt: skip


async def chat_with_tools(
    messages: Sequence[dict[str, Any]],
    backend: ChatBackend,
    sandbox: SandboxClient,
    *,
    max_turns: int = 16,
    sampling: Sampling | None = None,
    code_settings: CodeSettings | None = None,
    tools: Sequence[dict[str, Any]] = (TOOL_SCHEMA,),
) -> ChatResult:
    """Run the conversation until the model answers without a tool call, or ``max_turns``.

    ``max_turns`` counts assistant turns. When the last allowed turn still asks for the tool,
    the loop stops there (``stop_reason="max_turns"``) without running that call, as verl's
    agent loop does. Raises :class:`BackendError` only when the model server fails; sandbox
    failures and malformed calls become tool messages.
    """
    if max_turns < 1:
        raise ValueError("max_turns must be at least 1")
    sampling = sampling or Sampling()
    code_settings = code_settings or CodeSettings()
    history = [dict(m) for m in messages]
    records: list[ToolCallRecord] = []
    assistant_texts: list[str] = []
    stop_reason = "max_turns"
    start = time.perf_counter()
    turns = 0
    for turn in range(1, max_turns + 1):
        reply = await backend.complete(history, tools=list(tools), sampling=sampling)
        turns = turn
        history.append(_assistant_message(reply))
        assistant_texts.append(reply.content)
        if not reply.tool_calls:
            stop_reason = "length" if reply.finish_reason == "length" else "stop"
            break
        if turn == max_turns:
            break
        done = await asyncio.gather(
            *(_run_call(c, turn, sandbox, code_settings) for c in reply.tool_calls)
        )
        for record in done:
            records.append(record)
            history.append(
                {"role": "tool", "tool_call_id": record.id, "name": TOOL_NAME,
                 "content": record.output}
            )  # fmt: skip
    answer = assistant_texts[-1] if assistant_texts else ""
    return ChatResult(
        answer=answer,
        boxed=extract_answer("\n".join(assistant_texts)),
        messages=history,
        tool_calls=records,
        num_turns=turns,
        stop_reason=stop_reason,
        wall_s=time.perf_counter() - start,
    )
