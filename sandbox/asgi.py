"""Two ASGI gates that run before any route reads a request body (the bearer token, then a
cap), and the start-up fallback of a service that must keep answering (:class:`ServeOrRefuse`).

Why raw ASGI and not a FastAPI dependency: FastAPI reads and parses a route's pydantic body
*before* it runs the route's dependencies, so a token checked in ``Depends`` is checked after the
whole body sits in memory (six unauthenticated 60 MB requests took the sandbox from 58 MB to 783
MB of RSS). These wrappers decide from the headers alone and never call ``receive`` on a request
they refuse. Why not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs every request
through an extra task and memory streams, a measurable share of a ~1 ms sandbox request.

Both the sandbox (``sandbox/api.py``) and the serving app (``recipe/retool/serving/chat_api.py``)
stack them as ``RequireBearer(LimitBody(app))``: the token first, so a chunked body without one is
never read, not even up to the cap.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# RFC 7235's code for "the request's credentials do not satisfy the policy" on a websocket; before
# the handshake is accepted, uvicorn answers it as HTTP 403.
WS_POLICY_VIOLATION = 1008


def bearer_matches(headers: Iterable[tuple[bytes, bytes]], token: str) -> bool:
    """Whether ``Authorization: Bearer <token>`` is among raw ASGI ``headers`` (constant time;
    the scheme is case-insensitive, as RFC 7235 says)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(
                given.strip(), token.encode()
            )
    return False


class RequireBearer:
    """Refuse, from the headers alone, every HTTP or websocket request to a path outside
    ``open_paths`` that lacks ``Authorization: Bearer <token>``: 401 with ``WWW-Authenticate``
    and ``Connection: close`` (the unread body is dropped with the connection, never buffered)."""

    def __init__(self, app: ASGIApp, *, token: str, open_paths: Iterable[str], hint: str) -> None:
        if not token:
            raise ValueError("RequireBearer needs a non-empty token; leave it out to serve openly")
        self.app = app
        self.token = token
        self.open_paths = frozenset(open_paths)
        self.hint = hint  # the one-line fix shown in the 401, e.g. which variable holds the token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] not in ("http", "websocket")
            or scope["path"] in self.open_paths
            or bearer_matches(scope["headers"], self.token)
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
            return
        reply = JSONResponse(
            {"detail": f"missing or wrong bearer token ({self.hint})"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer", "Connection": "close"},
        )
        await reply(scope, receive, send)


class LimitBody:
    """Reject a body over ``max_bytes`` (413), or a ``Content-Length`` not a number (400).

    With ``Content-Length`` this is decided before reading; without one (chunked) the body is
    read here, counting, and replayed to the app only if it stays under the limit, so no size
    of body is ever held whole beyond ``max_bytes``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    reply = JSONResponse({"detail": "invalid Content-Length"}, 400)
                elif int(value) > self.max_bytes:
                    reply = self.too_large()
                else:
                    await self.app(scope, receive, send)
                    return
                await reply(scope, receive, send)
                return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # e.g. http.disconnect: let the app see it
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self.too_large()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def too_large(self) -> JSONResponse:
        return JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, 413)


class ServeOrRefuse:
    """Serve ``app``; if its start-up raises one of ``refusable`` (no isolation mode passed its
    self-test), serve ``refuse(that exception)`` instead of failing the server's start.

    Why: a Modal web function whose ASGI start-up fails is restarted, fails again, and so on (the
    deployed sandbox has ``min_containers=1``), while every client sees only timeouts. Answering
    each request with the reason instead puts that line in front of the user (the trainer's
    check, DAPO's start-up check, ``check_sandbox_connection``). The wrapped app's lifespan runs
    as usual; only its failure is turned into a completed start-up (and, later, shutdown).
    """

    def __init__(
        self,
        app: ASGIApp,
        refuse: Callable[[BaseException], ASGIApp],
        refusable: tuple[type[BaseException], ...],
    ) -> None:
        self.app = app
        self.refuse = refuse
        self.refusable = refusable
        self.refusing: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await (self.refusing or self.app)(scope, receive, send)
            return

        async def startup_never_fails(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                return  # answered below, once the reason is known
            await send(message)

        try:
            await self.app(scope, receive, startup_never_fails)
        except self.refusable as exc:
            self.refusing = self.refuse(exc)
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            await send({"type": "lifespan.shutdown.complete"})
