"""Every route of a real ``vllm serve`` behind the project's public app, with and without the key:
the record ``docs/gpu-runs/serve_auth_<gpu>.json`` keeps for a lent GPU machine.

    python scripts/serve_auth_record.py --out docs/gpu-runs/serve_auth_h100.json [--model DIR]

It starts what ``serve.py`` starts: vLLM on loopback with its key in its environment
(``vllm_server.vllm_command``), then, once vLLM serves, the public app in front of it
(``vllm_server.front_when_serving``: ``chat_api --proxy``, the key in its environment). The
routes are the ones this vLLM mounts, read from its own ``/openapi.json``, plus what is mounted
outside that document (``/metrics``, ``/docs``, ``/redoc``, ``/openapi.json``) and the app's own
routes. Each is asked three times: through the app without the key and with it, and straight at
vLLM without the key (what the app is there to close). Routes that change
the server's state (sleep, pause, scaling, adapters...) are sent only without the key. Exit 1 when
any route but ``/health`` answers through the app without the key with anything but 401.
Default model: the learning curve's small random-init Qwen2, built in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recipe.retool.serving.chat_api import HEALTH_PATH  # noqa: E402
from recipe.retool.serving.vllm_server import (  # noqa: E402
    API_KEY_ENV,
    LOOPBACK,
    SERVE_API_KEY_ENV,
    SERVED_MODEL_NAME,
    front_when_serving,
    vllm_command,
)
from sandbox.local import free_port, stop  # noqa: E402

KEY = "serve-auth-record-key"
# Routes whose authenticated call would change the server for the routes asked after them.
STATEFUL = re.compile(r"sleep|wake|pause|resume|scale|lora|collective|reset|shutdown|abort|start_")
# Mounted outside the OpenAPI document: vLLM's Prometheus app, and FastAPI's docs of either app.
UNLISTED = [("GET", "/metrics"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json")]
BODY = {"model": SERVED_MODEL_NAME, "prompt": "2+2=", "max_tokens": 4,
        "messages": [{"role": "user", "content": "2+2="}], "input": "2+2="}  # fmt: skip


def routes_of(openapi: dict) -> list[tuple[str, str]]:
    """``(METHOD, path)`` for every operation of an OpenAPI document, path parameters filled."""
    found = []
    for path, operations in openapi.get("paths", {}).items():
        concrete = re.sub(r"\{[^}]+\}", "x1", path)
        for method in operations:
            if method.upper() in {"GET", "POST", "PUT", "PATCH", "DELETE"}:
                found.append((method.upper(), concrete))
    return found


def ask(base: str, method: str, path: str, key: str | None) -> int | str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"json": BODY} if method in {"POST", "PUT", "PATCH"} else {}
    try:
        return httpx.request(method, base + path, headers=headers, timeout=60, **body).status_code
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}"


def record(model: Path) -> dict:
    vllm_port, app_port = free_port(), free_port()
    upstream = f"http://{LOOPBACK}:{vllm_port}"
    command = vllm_command(model, fallback_tokenizer=model, max_model_len=2048, port=vllm_port)
    command += ["--gpu-memory-utilization", "0.3", "--enforce-eager"]
    os.environ[SERVE_API_KEY_ENV] = KEY  # the app reads it from its environment, as on Modal
    with contextlib.ExitStack() as stack:
        vllm = subprocess.Popen(command, env={**os.environ, API_KEY_ENV: KEY})
        stack.callback(stop, vllm)
        app = front_when_serving(upstream, sandbox_url="http://127.0.0.1:9/run_code",
                                 timeout_s=600, alive=lambda: vllm.poll() is None,
                                 port=app_port)  # fmt: skip
        stack.callback(stop, app)
        public = f"http://127.0.0.1:{app_port}"
        _wait(public)
        vllm_openapi = httpx.get(f"{upstream}/openapi.json", timeout=30)
        app_openapi = httpx.get(f"{public}/openapi.json", headers=_auth(), timeout=30)
        routes = sorted(
            {*routes_of(vllm_openapi.json()), *UNLISTED, *routes_of(app_openapi.json())},
            key=lambda r: (bool(STATEFUL.search(r[1])), r[1], r[0]),  # stateful ones last
        )
        rows = []
        for method, path in routes:
            row = {
                "route": f"{method} {path}",
                "without_key": ask(public, method, path, None),
                "with_key": (
                    "not sent (changes the server)"
                    if STATEFUL.search(path)
                    else ask(public, method, path, KEY)
                ),
                "vllm_direct_without_key": ask(upstream, method, path, None),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        version = httpx.get(f"{public}/version", headers=_auth(), timeout=30).json()
    return {
        "vllm": version.get("version"),
        "vllm_openapi_without_key": vllm_openapi.status_code,
        "routes": rows,
    }


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _wait(base: str, timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + HEALTH_PATH, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the public app did not answer {HEALTH_PATH} at {base}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None, help="an HF model directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from recipe.retool.data.tiny_model import build
            from recipe.retool.workflows.learning_curve.settings import MODEL_SPEC

            model = build(Path(tmp) / "model", MODEL_SPEC)
        result = record(model)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    open_ = [r["route"] for r in result["routes"]
             if r["without_key"] != 401 and not r["route"].endswith(f" {HEALTH_PATH}")]  # fmt: skip
    print(
        f"{len(result['routes'])} routes; open without the key through the app: {open_ or 'none'}"
    )
    return 1 if open_ else 0


if __name__ == "__main__":
    sys.exit(main())
