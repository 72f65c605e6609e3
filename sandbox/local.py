"""Start an HTTP server as a subprocess on a free 127.0.0.1 port and wait until it answers.

The one way the smoke run, the benchmarks and the tests bring up a sandbox (ours, the naive
baseline, or a stub): ``GET /v1/ping`` must answer 200 before anyone sends code.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
# What a server inherits from the caller's environment: the caller may hold HF_TOKEN,
# WANDB_API_KEY or cloud keys, and in the weak isolation modes (non-root operators) user code can
# read the server's /proc/<pid>/environ. Anything else must be passed explicitly (``env``).
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ", "PYTHONPATH")
INHERITED_PREFIX = "SANDBOX_"


class ServerDidNotStart(RuntimeError):
    """The server exited or did not answer /v1/ping in time."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def claim_port(port: int) -> int:
    """``port`` if nothing listens on 127.0.0.1:``port``; else one line saying so. Without this
    check a server already there would answer the ping for the one that failed to bind.
    SO_REUSEADDR, as uvicorn binds: closed connections lingering in TIME_WAIT do not count."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ServerDidNotStart(f"127.0.0.1:{port} is taken ({exc.strerror})") from None
    return port


def start_server(
    argv: Sequence[str],
    port: int,
    *,
    env: Mapping[str, str | None] | None = None,
    wait_s: float = 60,
) -> subprocess.Popen:
    """Run ``argv`` (which must listen on ``port``) with the repo importable; wait for its ping.

    The server gets an allow-list of this process's environment (:data:`INHERITED_ENV`, and
    ``SANDBOX_*`` settings) plus ``env``, where a ``None`` value removes a variable.
    """
    inherited = {
        key: value
        for key, value in os.environ.items()
        if key in INHERITED_ENV or key.startswith(INHERITED_PREFIX)
    }
    merged = {**inherited, **(env or {})}
    merged = {key: value for key, value in merged.items() if value is not None}
    # The repo first, and whatever else the caller's imports need (an offline site dir, say).
    merged["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), merged.get("PYTHONPATH")]))
    proc = subprocess.Popen(list(argv), cwd=REPO, env=merged)
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/v1/ping", timeout=1).status_code == 200:
                return proc
        if proc.poll() is not None:
            raise ServerDidNotStart(f"{argv[-1]} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            stop(proc)
            raise ServerDidNotStart(f"{' '.join(argv)} did not answer /v1/ping in {wait_s:.0f} s")
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def sandbox_service(
    *extra_args: str,
    env: Mapping[str, str | None] | None = None,
    wait_s: float = 60,
    port: int | None = None,
) -> Iterator[str]:
    """``python -m sandbox serve`` on ``port`` (default: a free one) for the duration; yields its
    base URL."""
    import sys

    port = free_port() if port is None else claim_port(port)
    argv = [sys.executable, "-m", "sandbox", "serve", "--port", str(port), *extra_args]
    proc = start_server(argv, port, env=env, wait_s=wait_s)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
