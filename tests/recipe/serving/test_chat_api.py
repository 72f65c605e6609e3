"""POST /chat through httpx's ASGI transport: the loop end to end, auth, and 4xx/5xx errors."""

from __future__ import annotations

import json

import httpx
import pytest

from recipe.retool.serving.chat_api import create_app
from recipe.retool.serving.tool_chat import BackendError, HFChatBackend
from sandbox.client import SandboxClient
from tests.recipe.serving.test_tool_chat import ScriptedBackend, fake_sandbox, hermes

QUESTION = {"role": "user", "content": "What is 2**10? Answer in \\boxed{}."}


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://chat")


async def test_chat_runs_the_tool_loop_against_the_real_sandbox(local_endpoint):
    made = []

    def factory():
        made.append(ScriptedBackend([hermes("2**10"), "It is \\boxed{1024}."]))
        return made[-1]

    app = create_app(factory, SandboxClient(local_endpoint))
    async with client_for(app) as http:
        resp = await http.post("/chat", json={"messages": [QUESTION], "max_turns": 4})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["boxed"] == "1024" and body["answer"] == "It is \\boxed{1024}."
        assert (body["num_turns"], body["num_tool_calls"], body["stop_reason"]) == (2, 1, "stop")
        (call,) = body["tool_calls"]
        assert call["code"] == "2**10" and call["output"] == "1024" and call["status"] == "Success"
        assert [m["role"] for m in body["trace"]] == ["user", "assistant", "tool", "assistant"]
        assert (await http.get("/health")).json() == {"status": "ok"}
        assert (await http.post("/chat", json={"messages": [QUESTION]})).status_code == 200
    assert len(made) == 1  # the backend is built once, on the first request


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": []},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "system", "content": "be brief"}]},
        {"messages": [QUESTION, {"role": "assistant", "content": "Hmm"}]},
        {"messages": [QUESTION], "max_turns": 0},
        {"messages": [QUESTION], "max_turns": 1000},
        {"messages": [QUESTION], "temperature": -1},
        {"messages": [QUESTION], "top_p": 0},
        {"messages": [QUESTION], "max_tokens": 0},
        {"messages": [QUESTION], "stream": True},
        {"messages": [{"role": "user", "content": "hi", "colour": "red"}]},
        {"messages": "What is 2+2?"},
    ],
)
async def test_bad_requests_are_422_and_never_reach_the_model(body):
    backend = ScriptedBackend(["unused"])
    sandbox, _ = fake_sandbox()
    async with client_for(create_app(lambda: backend, sandbox)) as http:
        resp = await http.post("/chat", json=body)
    assert resp.status_code == 422, resp.text
    assert backend.seen == []


async def test_not_json_is_422():
    sandbox, _ = fake_sandbox()
    async with client_for(create_app(lambda: ScriptedBackend([]), sandbox)) as http:
        resp = await http.post("/chat", content=b"{", headers={"content-type": "application/json"})
    assert resp.status_code == 422


async def test_api_key_is_required_when_set():
    sandbox, _ = fake_sandbox()
    app = create_app(lambda: ScriptedBackend(["\\boxed{1}"]), sandbox, api_key="sekrit")
    body = {"messages": [QUESTION]}
    async with client_for(app) as http:
        assert (await http.post("/chat", json=body)).status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert (await http.post("/chat", json=body, headers=wrong)).status_code == 401
        right = {"authorization": "Bearer sekrit"}
        resp = await http.post("/chat", json=body, headers=right)
        assert resp.status_code == 200 and resp.json()["boxed"] == "1"
        assert (await http.get("/health")).status_code == 200


async def test_model_server_failure_is_502():
    class Down:
        async def complete(self, messages, *, tools, sampling):
            raise BackendError("http://vllm: HTTP 503: loading")

    sandbox, _ = fake_sandbox()
    async with client_for(create_app(Down, sandbox)) as http:
        resp = await http.post("/chat", json={"messages": [QUESTION]})
    assert resp.status_code == 502 and "HTTP 503" in resp.json()["detail"]


async def test_continuing_a_trace_with_tool_turns_is_accepted():
    backend = ScriptedBackend(["\\boxed{4}"])
    sandbox, _ = fake_sandbox()
    call = {"id": "c1", "type": "function",
            "function": {"name": "code_interpreter", "arguments": '{"code": "2+2"}'}}  # fmt: skip
    messages = [QUESTION, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "4"}]  # fmt: skip
    async with client_for(create_app(lambda: backend, sandbox)) as http:
        resp = await http.post("/chat", json={"messages": messages})
    assert resp.status_code == 200 and resp.json()["boxed"] == "4"
    assert backend.seen[0][2] == {"role": "tool", "tool_call_id": "c1", "content": "4"}


async def test_chat_with_the_tiny_hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sandbox, _ = fake_sandbox()
    app = create_app(lambda: HFChatBackend(model, tokenizer, max_new_tokens=16), sandbox)
    async with client_for(app) as http:
        resp = await http.post("/chat", json={"messages": [QUESTION], "max_turns": 2})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["trace"][0] == QUESTION and 1 <= body["num_turns"] <= 2
    json.dumps(body)


async def test_local_entry_point_serves_the_tiny_model(tiny_model_dir, local_endpoint):
    from recipe.retool.serving.chat_api import build_local_app

    app, args = build_local_app(["--hf-model", str(tiny_model_dir), "--sandbox-url",
                                 local_endpoint, "--max-new-tokens", "8"])  # fmt: skip
    assert (args.host, args.port) == ("127.0.0.1", 8001)
    async with client_for(app) as http:
        resp = await http.post("/chat", json={"messages": [QUESTION], "max_turns": 2})
    assert resp.status_code == 200, resp.text
    with pytest.raises(SystemExit):  # one model source is required
        build_local_app(["--sandbox-url", local_endpoint])
