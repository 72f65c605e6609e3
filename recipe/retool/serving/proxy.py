"""Relay every route the serving app does not answer itself to the vLLM server on loopback.

vLLM checks its own key only under ``/v1`` (``/invocations``, ``/tokenize``, ``/metrics``,
``/docs``... answer anyone, vLLM #58144), so vLLM listens on 127.0.0.1 and the public port is the
project's app: its bearer gate (``sandbox/asgi.py``) runs first, then this relay. The relay is a
catch-all, not a list of vLLM's routes, so a route a later vLLM adds is behind the key too.

Bodies stream both ways without being held whole: the request body goes up as the client sends
it (already capped by ``LimitBody``), and the answer comes back chunk by chunk, so a
``"stream": true`` completion reaches the client as vLLM writes each server-sent event.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

# Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection, not the message: never relayed.
# ``host`` names this app, and ``content-length``/``content-encoding`` are recomputed by httpx on
# the way up; on the way down the body is relayed as received, so both are kept.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade"}
)  # fmt: skip
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


def _request_headers(request: Request) -> list[tuple[str, str]]:
    return [
        (name, value)
        for name, value in request.headers.items()
        if name not in _HOP_BY_HOP and name != "host"
    ]


def _response_headers(upstream: httpx.Response) -> dict[str, str]:
    return {
        name: value for name, value in upstream.headers.items() if name.lower() not in _HOP_BY_HOP
    }


def mount_proxy(
    app: FastAPI, upstream_url: str, *, timeout_s: float = 1800.0
) -> Callable[[], Awaitable[None]]:
    """Add a catch-all route to ``app`` that relays the request to ``upstream_url`` (the client's
    ``Authorization`` header included, so a vLLM started with the same key accepts it); returns
    the closer of its connection pool, for the app's lifespan. Register it after the app's own
    routes: Starlette matches routes in order."""
    client = httpx.AsyncClient(
        base_url=upstream_url.rstrip("/"), timeout=httpx.Timeout(timeout_s, connect=10.0)
    )

    async def relay(request: Request) -> Response:
        upstream_request = client.build_request(
            request.method,
            request.url.path,
            params=request.url.query,
            headers=_request_headers(request),
            content=request.stream(),
        )
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse(
                {"detail": f"the model server failed: {type(exc).__name__}: {exc}"}, 502
            )
        return StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            headers=_response_headers(upstream),
            background=BackgroundTask(upstream.aclose),
        )

    app.add_api_route("/{path:path}", relay, methods=METHODS, include_in_schema=False)
    return client.aclose
