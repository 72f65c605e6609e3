"""The public serving app in front of a fake vLLM: every route vLLM 0.24 mounts needs the key,
is relayed with it, and streams; bodies are refused before they are read, and capped."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from recipe.retool.serving.chat_api import create_app
from recipe.retool.serving.vllm_server import (
    SERVE_API_KEY_ENV,
    front_when_serving,
    wait_until_serving,
)
from sandbox.local import free_port
from tests.live_server import live_server, send_headers_then_wait
from tests.recipe.serving.test_tool_chat import ScriptedBackend, fake_sandbox

KEY = "proxy-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SIXTY_MB = 60 * 1024 * 1024

# The routes vLLM 0.24's `vllm serve` mounts (vllm/entrypoints/openai/api_server.py and the
# routers it includes: basic, models, chat_completion, completion, responses, anthropic messages,
# tokenize, pooling (embed, classify, score, rerank), sagemaker, metrics, health, dev-mode). The
# app answers `/health`, `/docs` and `/openapi.json` itself; it relays every other one.
VLLM_ROUTES = [
    ("GET", "/ping"), ("POST", "/ping"), ("GET", "/load"), ("GET", "/version"), ("GET", "/metrics"),
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
    ("POST", "/v1/responses"), ("GET", "/v1/responses/resp_1"),
    ("POST", "/v1/responses/resp_1/cancel"), ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"), ("POST", "/tokenize"), ("POST", "/detokenize"),
    ("GET", "/tokenizer_info"), ("POST", "/v1/embeddings"), ("POST", "/pooling"),
    ("POST", "/classify"), ("POST", "/score"), ("POST", "/v1/score"), ("POST", "/rerank"),
    ("POST", "/v1/rerank"), ("POST", "/v2/rerank"), ("POST", "/invocations"),
    ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/audio/translations"),
    ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/inference/v1/generate"), ("POST", "/reset_prefix_cache"), ("POST", "/sleep"),
    ("POST", "/wake_up"), ("GET", "/is_sleeping"), ("POST", "/collective_rpc"),
    ("POST", "/scale_elastic_ep"), ("POST", "/is_scaling_elastic_ep"), ("GET", "/server_info"),
]  # fmt: skip
OWN_ROUTES = [("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/chat")]


class FakeVLLM:
    """Answers any route with what it received; ``"stream": true`` gets three server-sent
    events, the last two only once the client has read the first (or after 5 s)."""

    def __init__(self) -> None:
        self.first_event_read = threading.Event()
        self.streamed_while_waiting: bool | None = None
        self.app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        self.app.add_api_route("/{path:path}", self.echo, methods=["GET", "POST", "DELETE"])

    async def echo(self, request: Request):
        body = await request.body()
        if request.method == "POST" and body.startswith(b"{") and json.loads(body).get("stream"):
            return StreamingResponse(self.events(), media_type="text/event-stream")
        return JSONResponse({
            "method": request.method, "path": request.url.path, "query": request.url.query,
            "authorization": request.headers.get("authorization"), "body_bytes": len(body),
        })  # fmt: skip

    async def events(self) -> Iterator[bytes]:
        import asyncio

        yield b'data: {"n": 1}\n\n'
        waited = await asyncio.to_thread(self.first_event_read.wait, 5.0)
        self.streamed_while_waiting = waited
        yield b'data: {"n": 2}\n\n'
        yield b"data: [DONE]\n\n"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeVLLM]:
    fake = FakeVLLM()
    with live_server(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture(scope="module")
def public(upstream: FakeVLLM) -> Iterator[str]:
    sandbox, _ = fake_sandbox()
    app = create_app(
        lambda: ScriptedBackend(["\\boxed{1}"] * 8), sandbox, api_key=KEY, upstream=upstream.url
    )
    with live_server(app) as url:
        yield url


@pytest.mark.parametrize(("method", "path"), VLLM_ROUTES + OWN_ROUTES)
def test_every_route_needs_the_key(public: str, method: str, path: str) -> None:
    body = {"json": {"messages": [{"role": "user", "content": "hi"}]}} if method == "POST" else {}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        resp = httpx.request(method, public + path, headers=headers, **body)
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.headers["www-authenticate"] == "Bearer"
    assert httpx.request(method, public + path, headers=AUTH, **body).status_code == 200


@pytest.mark.parametrize(("method", "path"), VLLM_ROUTES)
def test_vllm_routes_are_relayed_with_query_key_and_body(public: str, method: str, path: str):
    content = b'{"prompt": "hi"}' if method == "POST" else b""
    resp = httpx.request(method, f"{public}{path}?a=1&b=two", headers=AUTH, content=content)
    assert resp.json() == {
        "method": method, "path": path, "query": "a=1&b=two",
        "authorization": f"Bearer {KEY}", "body_bytes": len(content),
    }  # fmt: skip


def test_health_is_the_only_open_route_and_is_the_apps_own(public: str) -> None:
    resp = httpx.get(f"{public}/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


def test_a_streamed_completion_arrives_event_by_event(public: str, upstream: FakeVLLM) -> None:
    body = {"model": "retool", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    events = []
    with httpx.stream("POST", f"{public}/v1/chat/completions", json=body, headers=AUTH) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line:
                events.append(line)
                upstream.first_event_read.set()
    assert events == ['data: {"n": 1}', 'data: {"n": 2}', "data: [DONE]"]
    assert upstream.streamed_while_waiting is True  # the first event came before the rest existed


def test_a_down_model_server_is_a_502(upstream: FakeVLLM) -> None:
    sandbox, _ = fake_sandbox()
    app = create_app(lambda: ScriptedBackend([]), sandbox, api_key=KEY,
                     upstream="http://127.0.0.1:9")  # fmt: skip
    with live_server(app) as url:
        resp = httpx.get(f"{url}/v1/models", headers=AUTH)
    assert resp.status_code == 502 and "the model server failed" in resp.json()["detail"]


@pytest.mark.parametrize(
    "length", [{"Content-Length": str(SIXTY_MB)}, {}], ids=["sized", "chunked"]
)
@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions", "/invocations"])
def test_no_key_is_refused_before_the_body_is_read(public: str, path: str, length) -> None:
    assert send_headers_then_wait(public, path, length) == 401


def test_an_authenticated_body_over_the_cap_is_413(public: str) -> None:
    too_big = {"Content-Length": str(SIXTY_MB), **AUTH}
    assert send_headers_then_wait(public, "/v1/completions", too_big) == 413
    chunked = httpx.post(f"{public}/v1/completions", headers=AUTH,
                         content=iter([b"x" * (1 << 20)] * 17))  # fmt: skip
    assert chunked.status_code == 413


def test_the_container_starts_the_app_in_front_once_vllm_serves(upstream: FakeVLLM, monkeypatch):
    """What serve.py's GPU container runs, with the fake vLLM: the app's own process, on its
    own port, keyed from the environment, relaying to vLLM."""
    monkeypatch.setenv(SERVE_API_KEY_ENV, KEY)
    port = free_port()
    app = front_when_serving(upstream.url, sandbox_url="http://127.0.0.1:9/run_code",
                             timeout_s=30, port=port)  # fmt: skip
    try:
        public = f"http://127.0.0.1:{port}"
        wait_until_serving(public, timeout_s=60, alive=lambda: app.poll() is None)
        assert KEY not in " ".join(app.args)  # the key stays out of `ps`
        assert httpx.get(f"{public}/invocations").status_code == 401
        resp = httpx.post(f"{public}/invocations", headers=AUTH, json={"prompt": "hi"})
        assert resp.json()["path"] == "/invocations"
    finally:
        app.terminate()
        app.wait(timeout=30)
