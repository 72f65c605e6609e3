"""The chat endpoint: ``POST /chat`` runs the whole tool loop on the server side.

A client sends a conversation and gets back the final answer, the ``\\boxed{}`` answer as the
reward reads it, and the trace (every assistant turn, every tool call with the code that ran and
what it printed). The model and the sandbox are whatever :func:`create_app` is given, so the
Modal app (``serve.py``) passes the vLLM endpoint and the deployed sandbox, and the tests pass a
scripted model or the tiny HF model and a local sandbox.

With ``upstream`` (serve.py: the vLLM server on loopback) the same app is the public face of the
model server too: every route it does not answer itself is relayed there (``proxy.py``), so the
OpenAI routes, streaming included, are served behind the same key.

Errors: a malformed request is a 422 (FastAPI's validation body), a body over
:data:`MAX_BODY_BYTES` a 413, a missing or wrong API key a 401 on every route but ``/health``
(decided from the headers, before the body is read: ``sandbox/asgi.py``), a failing model server
a 502. A failing sandbox is not an error: the model reads ``SandboxError: ...`` as the tool's
output, as in training.

Locally, with the sandbox running (``make sandbox``)::

    python -m recipe.retool.serving.chat_api --hf-model DIR --sandbox-url http://127.0.0.1:8080
    python -m recipe.retool.serving.chat_api --openai-url http://localhost:8000 --sandbox-url ...

Add ``--proxy`` to relay the other routes to ``--openai-url`` as well (what serve.py runs).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from recipe.retool.serving.proxy import mount_proxy
from recipe.retool.serving.tool_chat import (
    BackendError,
    ChatBackend,
    CodeSettings,
    HFChatBackend,
    OpenAIChatBackend,
    Sampling,
    chat_with_tools,
)
from recipe.retool.serving.vllm_server import SERVE_API_KEY_ENV
from sandbox.asgi import LimitBody, RequireBearer
from sandbox.client import SandboxClient

MAX_TURNS_LIMIT = 32
MAX_MESSAGES = 256
# Largest request body (413 beyond): a long /chat trace or an OpenAI request fits with room; a
# client cannot make the app hold more than this per request.
MAX_BODY_BYTES = 16 * 1024 * 1024
# The one route open without the key: Modal's and a load balancer's liveness probe.
HEALTH_PATH = "/health"


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------


class Message(BaseModel):
    """An OpenAI-style chat message (tool turns included, to continue an earlier trace)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = Field("", max_length=200_000)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(
        min_length=1,
        max_length=MAX_MESSAGES,
        description="The conversation so far; it must end with a user (or tool) message.",
        examples=[[{"role": "user", "content": "What is the 10th prime? Answer in \\boxed{}."}]],
    )
    max_turns: int = Field(16, ge=1, le=MAX_TURNS_LIMIT, description="Assistant turns at most.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(0.7, gt=0.0, le=1.0)
    max_tokens: int = Field(8192, ge=1, le=32768, description="Tokens per assistant turn.")

    @model_validator(mode="after")
    def _ends_with_a_question(self) -> ChatRequest:
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("the conversation needs at least one user message")
        if self.messages[-1].role not in ("user", "tool"):
            raise ValueError("the last message must be a user (or tool) message")
        return self


class ToolCallOut(BaseModel):
    id: str
    turn: int = Field(description="The assistant turn (1-based) that made the call.")
    code: str | None = Field(description="The code as the model wrote it; null if malformed.")
    output: str = Field(description="What the model read back.")
    status: str = Field(description="Success / Failed / SandboxError / Unavailable / InvalidCall")
    run_status: str | None
    latency_s: float
    timed_out: bool
    truncated: bool
    error: str | None


class ChatResponse(BaseModel):
    answer: str = Field(description="The final assistant message.")
    boxed: str | None = Field(description="The final \\boxed{} answer, as the reward reads it.")
    stop_reason: Literal["stop", "length", "max_turns"]
    num_turns: int
    num_tool_calls: int
    tool_calls: list[ToolCallOut]
    trace: list[dict[str, Any]] = Field(description="The whole conversation, in OpenAI format.")
    wall_s: float


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_app(
    backend_factory: Callable[[], ChatBackend],
    sandbox: SandboxClient,
    *,
    api_key: str | None = None,
    code_settings: CodeSettings | None = None,
    upstream: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The chat API. ``backend_factory`` is called once, on the first request (so a Modal
    container can look the model server's URL up lazily); ``api_key``, when set, is required as
    ``Authorization: Bearer <key>`` on every route but ``/health``; ``upstream``, when set, is
    the model server every other route is relayed to."""
    state: dict[str, Any] = {}
    closers: list[Callable[[], Any]] = [sandbox.aclose]

    def backend() -> ChatBackend:
        if "backend" not in state:
            state["backend"] = backend_factory()
        return state["backend"]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for close in (getattr(state.get("backend"), "aclose", None), *closers):
            if close is not None:
                await close()

    app = FastAPI(
        title="ReTool chat",
        description="A ReTool model that runs Python in a sandbox while it reasons.",
        lifespan=lifespan,
    )

    # Outermost last: the key from the headers first, then the body's size (sandbox/asgi.py).
    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(
            RequireBearer,
            token=api_key,
            open_paths={HEALTH_PATH},
            hint="Authorization: Bearer <the key the endpoint was deployed with>",
        )

    @app.get(HEALTH_PATH)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/chat", response_model=ChatResponse)
    async def chat(request: ChatRequest) -> dict[str, Any]:
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        sampling = Sampling(request.temperature, request.top_p, request.max_tokens)
        try:
            result = await chat_with_tools(
                messages,
                backend(),
                sandbox,
                max_turns=request.max_turns,
                sampling=sampling,
                code_settings=code_settings,
            )
        except BackendError as exc:
            raise HTTPException(502, f"the model server failed: {exc}") from None
        return result.to_dict()

    if upstream:
        closers.append(mount_proxy(app, upstream))
    return app


# ---------------------------------------------------------------------------------------------
# Local runs: `python -m recipe.retool.serving.chat_api --hf-model DIR` (CPU) or `--openai-url URL`
# ---------------------------------------------------------------------------------------------


def build_local_app(argv: list[str] | None = None) -> tuple[FastAPI, argparse.Namespace]:
    """The chat API on this machine, against a local HF model or any OpenAI-compatible server."""
    parser = argparse.ArgumentParser(description="Serve POST /chat locally.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-model", type=Path, help="a Hugging Face model directory (CPU)")
    source.add_argument("--openai-url", help="an OpenAI-compatible server, e.g. vLLM's")
    parser.add_argument("--model-name", default="retool", help="model name for --openai-url")
    parser.add_argument(
        "--proxy", action="store_true", help="also relay every other route to --openai-url"
    )
    parser.add_argument("--sandbox-url", default=None, help="default: $SANDBOX_FUSION_ENDPOINT")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="per turn, --hf-model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    if args.proxy and not args.openai_url:
        parser.error("--proxy relays to --openai-url: give one")
    api_key = os.environ.get(SERVE_API_KEY_ENV) or None

    def backend() -> ChatBackend:
        if args.openai_url:
            return OpenAIChatBackend(args.openai_url, args.model_name, api_key=api_key)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.hf_model)
        tokenizer = AutoTokenizer.from_pretrained(args.hf_model)
        return HFChatBackend(model, tokenizer, max_new_tokens=args.max_new_tokens)

    upstream = args.openai_url if args.proxy else None
    app = create_app(backend, SandboxClient(args.sandbox_url), api_key=api_key, upstream=upstream)
    return app, args


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    app, args = build_local_app(argv)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
