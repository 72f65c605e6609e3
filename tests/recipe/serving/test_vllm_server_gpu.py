"""The serving command on a GPU: ``vllm serve`` as serve.py starts it (loopback, the key in its
environment), with the project's app in front of it and every tool call run in the local sandbox.

Runs on a GPU box with only torch, vLLM, verl, fastapi, uvicorn and httpx: no Modal, and the
auth test is synchronous (no pytest-asyncio needed). ``RETOOL_SERVE_AUTH_REPORT=<path>`` makes
the auth test write what each route answered, as ``docs/gpu-runs/serve_auth_<gpu>.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from recipe.retool.serving.chat_api import create_app
from recipe.retool.serving.tool_chat import OpenAIChatBackend
from recipe.retool.serving.vllm_server import (
    API_KEY_ENV,
    LOOPBACK,
    SERVED_MODEL_NAME,
    vllm_command,
    wait_until_serving,
)
from sandbox.client import SandboxClient
from sandbox.local import free_port
from tests.live_server import live_server

KEY = "gpu-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPORT_ENV = "RETOOL_SERVE_AUTH_REPORT"
# The routes vLLM leaves open even with its key (vLLM #58144), and the app's one open route.
PROBES = [
    ("POST", "/invocations", {"model": SERVED_MODEL_NAME, "prompt": "2+2=", "max_tokens": 4}),
    ("POST", "/tokenize", {"model": SERVED_MODEL_NAME, "prompt": "2+2="}),
    ("GET", "/metrics", None),
    ("GET", "/docs", None),
    ("GET", "/health", None),
]


@pytest.fixture(scope="module")
def vllm_url(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM as serve.py starts it: on loopback, its key in its environment."""
    port = free_port()
    serve = vllm_command(vllm_model_dir, fallback_tokenizer=vllm_model_dir, max_model_len=2048,
                         port=port)  # fmt: skip
    command = [*serve, "--gpu-memory-utilization", "0.3", "--enforce-eager"]
    assert KEY not in " ".join(command) and f"--host {LOOPBACK}" in " ".join(command)
    log = (tmp_path_factory.mktemp("vllm") / "vllm.log").open("w")
    server = subprocess.Popen(
        command, env={**os.environ, API_KEY_ENV: KEY}, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://{LOOPBACK}:{port}"
    try:
        wait_until_serving(base, timeout_s=600, alive=lambda: server.poll() is None)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@pytest.mark.gpu
def test_every_probed_route_needs_the_key_through_the_app(vllm_url: str) -> None:
    app = create_app(lambda: OpenAIChatBackend(vllm_url, SERVED_MODEL_NAME, api_key=KEY),
                     SandboxClient("http://127.0.0.1:9/run_code"), api_key=KEY,
                     upstream=vllm_url)  # fmt: skip
    rows = []
    with live_server(app) as public:
        for method, path, body in PROBES:
            without = httpx.request(method, public + path, json=body, timeout=120)
            with_key = httpx.request(method, public + path, json=body, headers=AUTH, timeout=120)
            rows.append({"route": f"{method} {path}", "without_key": without.status_code,
                         "with_key": with_key.status_code})  # fmt: skip
    if report := os.environ.get(REPORT_ENV):
        Path(report).write_text(json.dumps({"routes": rows}, indent=2) + "\n")
    expected = [{"route": f"{m} {p}", "without_key": 200 if p == "/health" else 401,
                 "with_key": 200} for m, p, _ in PROBES]  # fmt: skip
    assert rows == expected


@pytest.mark.gpu
async def test_serving_command_answers_chat_through_vllm_and_the_sandbox(
    vllm_url: str, local_endpoint: str
):
    assert httpx.get(f"{vllm_url}/v1/models").status_code == 401  # vLLM's own key, under /v1
    models = httpx.get(f"{vllm_url}/v1/models", headers=AUTH)
    assert [m["id"] for m in models.json()["data"]] == [SERVED_MODEL_NAME]

    def backend() -> OpenAIChatBackend:
        return OpenAIChatBackend(vllm_url, SERVED_MODEL_NAME, api_key=KEY)

    app = create_app(backend, SandboxClient(local_endpoint))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://chat") as http:
        question = {"role": "user", "content": "Compute 12 * 34 + 5."}
        resp = await http.post(
            "/chat", json={"messages": [question], "max_turns": 2, "max_tokens": 64}
        )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["trace"][0] == question and 1 <= body["num_turns"] <= 2
