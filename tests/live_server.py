"""An ASGI app served by uvicorn in a background thread, on a free loopback port, for tests that
need real sockets: streaming responses, slow request bodies (httpx's ASGI transport buffers
both)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from sandbox.local import free_port


@contextlib.contextmanager
def live_server(app, *, wait_s: float = 20.0) -> Iterator[str]:
    """Serve ``app`` for the duration; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + wait_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def send_headers_then_wait(
    url: str,
    path: str,
    headers: dict[str, str],
    *,
    first_bytes: int = 65536,
    timeout_s: float = 10.0,
) -> int:
    """POST to ``path`` a body announced by ``headers`` (a ``Content-Length``, or chunked where
    they give none), send only its first ``first_bytes``, then read the answer's status. A server
    that reads the body before answering never answers within ``timeout_s``: ``TimeoutError``.
    """  # fmt: skip
    host, port = url.removeprefix("http://").split(":")
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    chunked = not any(k.lower() == "content-length" for k in headers)
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    body = b"x" * first_bytes
    if chunked:
        body = f"{first_bytes:x}\r\n".encode() + body + b"\r\n"
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(head + body)
        status_line = sock.makefile("rb").readline().decode()
    return int(status_line.split()[1])
