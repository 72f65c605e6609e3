"""The OpenAI-compatible vLLM server for one checkpoint: its command, waiting until it serves, and
the command of the app in front of it.

vLLM listens on loopback only: its own key guards only ``/v1`` (``/invocations``, ``/tokenize``,
``/metrics``, ``/docs`` answer anyone, vLLM #58144), so the public port is the project's app
(``chat_api.py --proxy``), which requires the key on every route but ``/health`` and relays the
rest to vLLM.

Kept apart from the Modal app (``serve.py``) so that the same command runs, and is tested, on any
GPU box: ``tests/recipe/serving/test_vllm_server_gpu.py`` starts it next to the chat API and the
sandbox. It runs as ``python -m vllm.entrypoints.cli.main``, the module behind vLLM's ``vllm``
script, with the interpreter that runs this code, so it needs no console script on ``PATH``
(offline bundles install packages without one).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SERVED_MODEL_NAME = "retool"
# The public port (the app) and vLLM's, on 127.0.0.1 behind it.
PUBLIC_PORT = 8000
VLLM_PORT = 8001
LOOPBACK = "127.0.0.1"
# The deployer's serving key (serve.py), read by the public app (chat_api.py).
SERVE_API_KEY_ENV = "RETOOL_SERVE_API_KEY"
# vLLM reads its API key from this variable and then requires `Authorization: Bearer <key>`; in
# the environment the key stays out of `ps` and /proc/<pid>/cmdline, where `--api-key` shows it.
API_KEY_ENV = "VLLM_API_KEY"


def vllm_command(
    model_dir: Path,
    *,
    fallback_tokenizer: Path,
    max_model_len: int,
    port: int = VLLM_PORT,
    host: str = LOOPBACK,
) -> list[str]:
    """``vllm serve`` for ``model_dir`` with the hermes tool parser; ``fallback_tokenizer`` (the
    base model) where the checkpoint was saved without its tokenizer."""
    command = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir),
        "--served-model-name", SERVED_MODEL_NAME,
        "--host", host, "--port", str(port),
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--max-model-len", str(max_model_len),
        "--generation-config", "vllm",  # sampling defaults are the request's, not the checkpoint's
    ]  # fmt: skip
    if not (model_dir / "tokenizer_config.json").is_file():
        command += ["--tokenizer", str(fallback_tokenizer)]
    return command


def app_command(upstream: str, *, sandbox_url: str, port: int = PUBLIC_PORT) -> list[str]:
    """The public app (``chat_api.py``) on every interface at ``port``: ``/chat`` with the tool
    loop, and every other route relayed to the vLLM server at ``upstream``. It reads the key from
    its environment (:data:`SERVE_API_KEY_ENV`), never from its arguments."""
    return [
        sys.executable, "-m", "recipe.retool.serving.chat_api", "--openai-url", upstream,
        "--model-name", SERVED_MODEL_NAME, "--proxy", "--sandbox-url", sandbox_url,
        "--host", "0.0.0.0", "--port", str(port),
    ]  # fmt: skip


def wait_until_serving(
    base_url: str, *, timeout_s: float, alive: Callable[[], bool] = lambda: True
) -> None:
    """Block until ``GET /health`` answers 200 (vLLM answers it without a key). ``alive`` says
    whether the server process still runs, so a crash fails at once instead of at the timeout."""
    import httpx  # here: serve.py imports this module where `pip install modal` is all there is

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"vLLM exited before serving at {base_url}")
        try:
            if httpx.get(f"{base_url}/health", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2.0)
    raise TimeoutError(f"vLLM did not serve at {base_url} within {timeout_s:.0f} s")


def front_when_serving(
    upstream: str,
    *,
    sandbox_url: str,
    timeout_s: float,
    alive: Callable[[], bool] = lambda: True,
    port: int = PUBLIC_PORT,
) -> subprocess.Popen:
    """Once vLLM serves at ``upstream``, start the public app in front of it (:func:`app_command`)
    and return its process. Until then nothing listens on the public port, so a platform that
    routes requests once the port opens (Modal's ``web_server``) sends none to a loading model."""
    wait_until_serving(upstream, timeout_s=timeout_s, alive=alive)
    return subprocess.Popen(app_command(upstream, sandbox_url=sandbox_url, port=port))
