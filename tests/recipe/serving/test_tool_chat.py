"""The serving tool loop: hermes parsing, the loop on scripted/HF/OpenAI backends, real sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from recipe.retool.core.constants import TOOL_NAME, TOOL_SCHEMA
from recipe.retool.serving.tool_chat import (
    BackendError,
    HFChatBackend,
    ModelTurn,
    OpenAIChatBackend,
    Sampling,
    chat_with_tools,
    parse_hermes,
)
from sandbox.client import SandboxClient

QUESTION = [{"role": "user", "content": "What is 5!? Put the answer in \\boxed{}."}]


def hermes(code: str, name: str = TOOL_NAME) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': {'code': code}})}\n</tool_call>"


class ScriptedBackend:
    """Replays model texts (parsed as a hermes model's output) and records what it was sent."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = list(texts)
        self.seen: list[list[dict[str, Any]]] = []

    async def complete(self, messages, *, tools, sampling) -> ModelTurn:
        assert tools == [TOOL_SCHEMA]
        self.seen.append(json.loads(json.dumps(messages)))
        text = self.texts[min(len(self.seen), len(self.texts)) - 1]
        content, calls = parse_hermes(text, f"call_{len(self.seen)}")
        return ModelTurn(content, calls, "tool_calls" if calls else "stop")


def fake_sandbox(handler=None) -> tuple[SandboxClient, list[dict]]:
    """A SandboxClient whose /run_code is an in-process function (records the payloads)."""
    seen: list[dict] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        if handler is not None:
            return handler(request)
        run = {"status": "Finished", "stdout": "ok\n", "stderr": "", "return_code": 0}
        return httpx.Response(200, json={"status": "Success", "message": "", "run_result": run})

    client = SandboxClient("http://fake:1", max_retries=1, backoff_base_s=0.0,
                           transport=httpx.MockTransport(record))  # fmt: skip
    return client, seen


# --- parsing -------------------------------------------------------------------------------------


def test_parse_hermes_takes_calls_out_of_the_text():
    text = "Let me compute.\n" + hermes("print(1)") + "\n" + hermes("x = 2\nx")
    content, calls = parse_hermes(text, "c")
    assert content == "Let me compute."
    assert [c.id for c in calls] == ["c_0", "c_1"]
    assert [c.code for c in calls] == ["print(1)", "x = 2\nx"]
    assert all(c.error is None and c.structured for c in calls)


@pytest.mark.parametrize(
    ("block", "error", "stays_in_text"),
    [
        ("<tool_call>{not json}</tool_call>", "not valid JSON", True),
        ("<tool_call>[1, 2]</tool_call>", "unknown tool ''", True),
        (hermes("print(1)", name="python"), "unknown tool 'python'", False),
        ('<tool_call>{"name": "code_interpreter", "arguments": {}}</tool_call>',
         "`code` is missing", False),
        ('<tool_call>{"name": "code_interpreter", "arguments": {"code": 3}}</tool_call>',
         "`code` must be a non-empty string", False),
        ('<tool_call>{"name": "code_interpreter", "arguments": "nope"}</tool_call>',
         "arguments are not JSON", True),
        ('<tool_call>{"name": "code_interpreter", "arguments": {"code": "1+', "not valid JSON",
         True),  # cut off by the token limit
    ],
)  # fmt: skip
def test_malformed_calls_carry_an_error(block, error, stays_in_text):
    content, (call,) = parse_hermes("text " + block)
    assert call.error is not None and error in call.error
    assert call.code is None
    assert (block in content) == stays_in_text


def test_parameters_key_is_accepted_as_arguments():
    _, (call,) = parse_hermes('<tool_call>{"name": "code_interpreter", "parameters": '
                              '{"code": "1"}}</tool_call>')  # fmt: skip
    assert call.error is None and call.code == "1"


# --- the loop ------------------------------------------------------------------------------------


async def test_tool_call_runs_in_the_real_sandbox_then_the_model_answers(local_endpoint):
    backend = ScriptedBackend(
        ["I will compute it.\n" + hermes("import math\nmath.factorial(5)"),
         "The interpreter says 120.\n<answer>\\boxed{120}</answer>"]
    )  # fmt: skip
    result = await chat_with_tools(QUESTION, backend, SandboxClient(local_endpoint))
    assert result.boxed == "120"
    assert result.answer == "The interpreter says 120.\n<answer>\\boxed{120}</answer>"
    assert (result.num_turns, result.num_tool_calls, result.stop_reason) == (2, 1, "stop")
    (call,) = result.tool_calls
    assert call.output == "120" and call.status == "Success" and call.run_status == "Finished"
    assert call.latency_s > 0 and call.code == "import math\nmath.factorial(5)"
    roles = [m["role"] for m in result.messages]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assistant = result.messages[1]
    assert assistant["content"] == "I will compute it."
    assert assistant["tool_calls"][0]["function"]["name"] == TOOL_NAME
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"])["code"].startswith("im")
    tool = result.messages[2]
    assert tool["tool_call_id"] == assistant["tool_calls"][0]["id"] and tool["content"] == "120"
    assert backend.seen[1] == result.messages[:3]  # the model saw its call and the output
    json.dumps(result.to_dict())  # serialisable as the API's response


async def test_malformed_calls_become_tool_messages_and_never_reach_the_sandbox():
    sandbox, seen = fake_sandbox()
    first = "\n".join(
        ["<tool_call>{oops}</tool_call>", hermes("print(1)", name="python"),
         '<tool_call>{"name": "code_interpreter", "arguments": {}}</tool_call>']
    )  # fmt: skip
    backend = ScriptedBackend([first, "Sorry. \\boxed{7}"])
    result = await chat_with_tools(QUESTION, backend, sandbox)
    assert seen == []
    assert result.boxed == "7" and result.num_tool_calls == 3
    assert all(c.status == "InvalidCall" and c.error for c in result.tool_calls)
    tool_messages = [m for m in result.messages if m["role"] == "tool"]
    assert "not valid JSON" in tool_messages[0]["content"]
    assert "unknown tool 'python'" in tool_messages[1]["content"]
    assert "`code` is missing" in tool_messages[2]["content"]
    # the undecodable call stays in the text; the other two are structured tool calls
    assert "{oops}" in result.messages[1]["content"]
    assert [c["function"]["name"] for c in result.messages[1]["tool_calls"]] == [
        "python",
        TOOL_NAME,
    ]


async def test_max_turns_stops_without_running_the_last_call():
    sandbox, seen = fake_sandbox()
    backend = ScriptedBackend([hermes("print('again')")])
    result = await chat_with_tools(QUESTION, backend, sandbox, max_turns=3)
    assert (result.num_turns, result.num_tool_calls, result.stop_reason) == (3, 2, "max_turns")
    assert len(seen) == 2 and result.boxed is None
    assert result.messages[-1]["role"] == "assistant" and result.messages[-1]["tool_calls"]
    with pytest.raises(ValueError, match="max_turns"):
        await chat_with_tools(QUESTION, backend, sandbox, max_turns=0)


async def test_sandbox_outage_is_a_tool_message_not_a_crash():
    sandbox, seen = fake_sandbox(lambda r: httpx.Response(503, text="busy"))
    backend = ScriptedBackend([hermes("print(1)"), "\\boxed{1}"])
    result = await chat_with_tools(QUESTION, backend, sandbox)
    assert len(seen) == 2  # one retry
    (call,) = result.tool_calls
    assert call.status == "Unavailable" and call.output.startswith("SandboxError")
    assert result.boxed == "1"


async def test_sandbox_settings_reach_the_request():
    from recipe.retool.serving.tool_chat import CodeSettings

    sandbox, seen = fake_sandbox()
    backend = ScriptedBackend([hermes("x = 1\nx"), "done"])
    settings = CodeSettings(run_timeout=5, memory_limit_mb=256)
    await chat_with_tools(QUESTION, backend, sandbox, code_settings=settings)
    assert seen[0]["code"] == "x = 1\nprint(x)"
    assert (seen[0]["run_timeout"], seen[0]["memory_limit_MB"]) == (5, 256)


# --- HF backend on the tiny model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(
        tiny_model_dir
    )


async def test_hf_backend_on_the_tiny_model_returns_a_well_formed_result(tiny):
    model, tokenizer = tiny
    sandbox, _ = fake_sandbox()
    backend = HFChatBackend(model, tokenizer, max_new_tokens=24)
    result = await chat_with_tools(QUESTION, backend, sandbox, max_turns=2)
    assert 1 <= result.num_turns <= 2
    assert result.stop_reason in {"stop", "length", "max_turns"}
    assert result.messages[0] == QUESTION[0] and result.messages[1]["role"] == "assistant"
    assert isinstance(result.answer, str)
    json.dumps(result.to_dict())


class ScriptedModel:
    """``model.generate`` that appends pre-written text: the real template and tokenizer run."""

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.tokenizer, self.texts, self.prompts = tokenizer, list(texts), []

    def generate(self, input_ids, attention_mask=None, **kwargs):
        import torch

        self.prompts.append(self.tokenizer.decode(input_ids[0]))
        text = self.texts[len(self.prompts) - 1]
        new = [*self.tokenizer.encode(text, add_special_tokens=False), self.tokenizer.eos_token_id]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


async def test_hf_backend_renders_tools_and_tool_turns_with_the_chat_template(tiny):
    _, tokenizer = tiny
    model = ScriptedModel(tokenizer, [hermes("print(6 * 7)"), "So \\boxed{42}"])
    sandbox, _ = fake_sandbox(
        lambda r: httpx.Response(200, json={"status": "Success", "run_result": {
            "status": "Finished", "stdout": "42\n", "stderr": "", "return_code": 0}})
    )  # fmt: skip
    result = await chat_with_tools(QUESTION, HFChatBackend(model, tokenizer), sandbox)
    assert result.boxed == "42" and result.tool_calls[0].output == "42"
    first, second = model.prompts
    assert "# Tools" in first and '"name": "code_interpreter"' in first
    assert first.endswith("<|im_start|>assistant\n")
    # the call is rendered back as hermes JSON (arguments as an object), the output as a response
    assert '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(6 * 7)"}}' in (
        second
    )
    assert "<tool_response>\n42\n</tool_response>" in second


# --- OpenAI-compatible backend against a fake server ---------------------------------------------


class FakeOpenAI:
    """An OpenAI-compatible /v1/chat/completions that replays messages and records requests."""

    def __init__(self, replies: list[dict[str, Any]], status: int = 200) -> None:
        self.replies, self.status, self.requests = list(replies), status, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        self.requests.append(json.loads(request.content))
        if self.status != 200:
            return httpx.Response(self.status, text="engine dead")
        message = self.replies[min(len(self.requests), len(self.replies)) - 1]
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        body = {"id": "x", "object": "chat.completion", "model": "retool",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}]}  # fmt: skip
        return httpx.Response(200, json=body)


def openai_backend(server: FakeOpenAI, url: str = "http://vllm.test") -> OpenAIChatBackend:
    return OpenAIChatBackend(url, "retool", api_key="k", transport=httpx.MockTransport(server))


async def test_openai_backend_with_structured_tool_calls():
    call = {
        "id": "chatcmpl-tool-1",
        "type": "function",
        "function": {"name": TOOL_NAME, "arguments": json.dumps({"code": "print(2+2)"})},
    }
    server = FakeOpenAI([{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "assistant", "content": "\\boxed{4}"}])  # fmt: skip
    sandbox, seen = fake_sandbox()
    backend = openai_backend(server, "http://vllm.test/v1/")
    result = await chat_with_tools(QUESTION, backend, sandbox, sampling=Sampling(0.6, 0.9, 100))
    assert seen[0]["code"] == "print(2+2)"
    assert result.boxed == "4" and result.tool_calls[0].id == "chatcmpl-tool-1"
    first, second = server.requests
    assert first["model"] == "retool" and first["tools"] == [TOOL_SCHEMA]
    assert (first["temperature"], first["top_p"], first["max_tokens"]) == (0.6, 0.9, 100)
    assert second["messages"][1]["tool_calls"][0]["id"] == "chatcmpl-tool-1"
    assert second["messages"][2] == {"role": "tool", "tool_call_id": "chatcmpl-tool-1",
                                     "name": TOOL_NAME, "content": "ok"}  # fmt: skip
    await backend.aclose()


async def test_openai_backend_parses_raw_hermes_text_when_the_server_has_no_tool_parser():
    server = FakeOpenAI([{"role": "assistant", "content": "Compute:\n" + hermes("print(3)")},
                         {"role": "assistant", "content": "\\boxed{3}"}])  # fmt: skip
    sandbox, seen = fake_sandbox()
    result = await chat_with_tools(QUESTION, openai_backend(server), sandbox)
    assert seen[0]["code"] == "print(3)" and result.boxed == "3"
    sent = server.requests[1]["messages"][1]
    assert sent["content"] == "Compute:" and sent["tool_calls"][0]["function"]["name"] == TOOL_NAME


async def test_openai_backend_sends_the_key_and_follows_modal_redirects():
    seen: list[tuple[str, str | None]] = []
    reply = FakeOpenAI([{"role": "assistant", "content": "\\boxed{1}"}])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.headers.get("authorization")))
        if request.method == "POST":  # Modal: a request past 150 s gets a 303 to its result URL
            return httpx.Response(303, headers={"location": "/v1/chat/completions?__modal=1"})
        return reply(httpx.Request("POST", request.url, json={}))

    backend = OpenAIChatBackend("http://vllm.test", "retool", api_key="sekrit",
                                transport=httpx.MockTransport(handler))  # fmt: skip
    sandbox, _ = fake_sandbox()
    result = await chat_with_tools(QUESTION, backend, sandbox)
    assert result.boxed == "1"
    assert seen == [("POST", "Bearer sekrit"), ("GET", "Bearer sekrit")]


async def test_openai_backend_server_error_raises_backend_error():
    sandbox, _ = fake_sandbox()
    with pytest.raises(BackendError, match="HTTP 500"):
        await chat_with_tools(QUESTION, openai_backend(FakeOpenAI([], status=500)), sandbox)
