"""Peak RSS of the sandbox and of the chat API under unauthenticated 60 MB requests.

Starts each server with a token/key, sends ``--requests`` concurrent POSTs of ``--mb`` MB each
without it, and prints the server's RSS before and its peak (``VmHWM``) after, as JSON. Which code
runs is whatever ``PYTHONPATH`` holds, so the same script measures before and after a change::

    PYTHONPATH=$PWD python scripts/bench_auth_rss.py                 # this checkout
    PYTHONPATH=/path/to/older/checkout python scripts/bench_auth_rss.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from recipe.retool.serving.vllm_server import wait_until_serving
from sandbox.local import free_port, sandbox_service

TOKEN = "bench-token"


def rss_kb(pid: int, field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of ``pid``, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def server_pid(port: int) -> int:
    """The pid of the process listening on ``port``."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True)
    return int(out.stdout.split("pid=")[1].split(",")[0])


def flood(url: str, n: int, size: int) -> list[int | str]:
    """``n`` concurrent unauthenticated POSTs of ``size`` bytes; their statuses (or errors)."""
    body = b"{" + b" " * (size - 2) + b"}"
    statuses: list[int | str] = []

    def one() -> None:
        try:
            headers = {"content-type": "application/json"}
            resp = httpx.post(url, content=body, headers=headers, timeout=120)
            statuses.append(resp.status_code)
        except httpx.HTTPError as exc:  # a server that closes after its 401 may reset the upload
            statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def measure(url: str, port: int, n: int, size: int) -> dict:
    pid = server_pid(port)
    before = rss_kb(pid, "VmRSS")
    statuses = flood(url, n, size)
    time.sleep(0.5)
    peak = rss_kb(pid, "VmHWM")
    return {
        "pid": pid,
        "rss_before_mb": round(before / 1024, 1),
        "rss_peak_mb": round(peak / 1024, 1),
        "growth_mb": round((peak - before) / 1024, 1),
        "statuses": sorted(map(str, statuses)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--mb", type=int, default=60)
    args = parser.parse_args()
    size = args.mb * 1024 * 1024
    results = {}
    env = {"SANDBOX_API_TOKEN": TOKEN, "SANDBOX_SLOTS": "2"}
    with sandbox_service("--allow-insecure", "--log-level", "warning", env=env) as base:
        port = int(base.rsplit(":", 1)[1])
        results["sandbox /run_code"] = measure(f"{base}/run_code", port, args.requests, size)
    port = free_port()
    argv = [sys.executable, "-m", "recipe.retool.serving.chat_api", "--openai-url",
            "http://127.0.0.1:9", "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        env={**os.environ, "RETOOL_SERVE_API_KEY": TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, timeout_s=60, alive=lambda: proc.poll() is None)
        results["chat API /chat"] = measure(f"{base}/chat", port, args.requests, size)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps({"requests": args.requests, "mb_each": args.mb, **results}, indent=2))


if __name__ == "__main__":
    main()
