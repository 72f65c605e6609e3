"""The serving command on a GPU: ``vllm serve`` as serve.py starts it, behind the chat API, with
the key in vLLM's environment and every tool call run in the local sandbox."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from recipe.retool.serving.chat_api import create_app
from recipe.retool.serving.tool_chat import OpenAIChatBackend
from recipe.retool.serving.vllm_server import (
    API_KEY_ENV,
    SERVED_MODEL_NAME,
    vllm_command,
    wait_until_serving,
)
from sandbox.client import SandboxClient
from sandbox.local import free_port

KEY = "gpu-test-key"


@pytest.mark.gpu
async def test_serving_command_answers_chat_through_vllm_and_the_sandbox(
    vllm_model_dir: Path, local_endpoint: str, tmp_path: Path
):
    port = free_port()
    serve = vllm_command(
        vllm_model_dir, fallback_tokenizer=vllm_model_dir, max_model_len=2048, port=port,
        host="127.0.0.1",
    )  # fmt: skip
    command = [*serve, "--gpu-memory-utilization", "0.3", "--enforce-eager"]
    assert KEY not in " ".join(command)
    log = (tmp_path / "vllm.log").open("w")
    server = subprocess.Popen(
        command, env={**os.environ, API_KEY_ENV: KEY}, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, timeout_s=600, alive=lambda: server.poll() is None)
        assert httpx.get(f"{base}/v1/models").status_code == 401  # the key is required
        models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert [m["id"] for m in models.json()["data"]] == [SERVED_MODEL_NAME]

        def backend() -> OpenAIChatBackend:
            return OpenAIChatBackend(base, SERVED_MODEL_NAME, api_key=KEY)

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
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
