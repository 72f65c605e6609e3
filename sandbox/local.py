"""Start an HTTP server as a subprocess on a free 127.0.0.1 port and wait until it answers.

The one way the smoke run, the benchmarks and the tests bring up a sandbox (ours, the naive
baseline, or a stub): ``GET /v1/ping`` must answer 200 before anyone sends code. The server's
stderr still reaches ours as it comes; its last lines also explain a server that did not start.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parents[1]
# What a server inherits from the caller's environment: the caller may hold HF_TOKEN,
# WANDB_API_KEY or cloud keys, and in the weak isolation modes (non-root operators) user code can
# read the server's /proc/<pid>/environ. Anything else must be passed explicitly (``env``).
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ", "PYTHONPATH")
INHERITED_PREFIX = "SANDBOX_"


class ServerDidNotStart(RuntimeError):
    """The server exited or did not answer /v1/ping in time."""


class StderrTail:
    """Copy a child's stderr to our fd 2 line by line, as the child writing there itself would,
    keeping the last lines: a server that exits at start says why on stderr (a bad option, an
    interpreter that is not there), and that belongs in the one line the caller reports."""

    def __init__(self, stream: IO[bytes], keep: int = 20) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                os.write(2, raw)
                self.lines.append(raw.decode(errors="replace").rstrip())

    def last(self, n: int = 3, wait_s: float = 2.0) -> str:
        """The last ``n`` non-blank lines, joined into one; waits up to ``wait_s`` for the stream
        to end (an exited child's last words may still be in the pipe)."""
        self._thread.join(wait_s)
        shown = [line.strip() for line in self.lines if line.strip()][-n:]
        return " | ".join(shown) if shown else "(nothing on stderr)"


def program(argv: Sequence[str]) -> str:
    """What ran, as a reader names it: ``python3 -m sandbox serve``, not the interpreter's full
    path or the options after it."""
    words = [Path(argv[0]).name]
    for arg in argv[1:]:
        if arg.startswith("--") or any(ch.isspace() for ch in arg):
            break
        words.append(arg)
    return " ".join(words)


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
    proc = subprocess.Popen(list(argv), cwd=REPO, env=merged, stderr=subprocess.PIPE)
    stderr = StderrTail(proc.stderr)
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/v1/ping", timeout=1).status_code == 200:
                return proc
        if proc.poll() is not None:
            raise ServerDidNotStart(
                f"{program(argv)} exited with code {proc.returncode}; stderr: {stderr.last()}"
            )
        if time.monotonic() > deadline:
            stop(proc)
            raise ServerDidNotStart(
                f"{program(argv)} did not answer /v1/ping in {wait_s:.0f} s; "
                f"stderr: {stderr.last()}"
            )
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


@contextlib.contextmanager
def run_code_url(url: str | None) -> Iterator[str]:
    """``url`` when given (a deployed sandbox), else the project's own sandbox started on loopback
    for the duration: the ``/run_code`` URL a tool config points at."""
    if url:
        yield url
        return
    with sandbox_service("--log-level", "warning") as base:
        yield f"{base}/run_code"
