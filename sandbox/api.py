"""FastAPI app: ``POST /run_code`` (SandboxFusion's contract), ``GET /v1/ping``, OpenAPI at /docs.

HTTP status policy (why these codes):
- 200 for every executed request, whatever the user's code did, and for ``SandboxError``
  (as SandboxFusion does; its client retries a SandboxError).
- 4xx for a bad request (422 invalid, 413 too large): retrying cannot help, so no client retries.
- 504 when saturated (queue full, or no slot within ``queue_timeout_s``), with ``Retry-After``.
  504 is the *only* status verl's ``call_sandbox_api`` retries, and the sandbox-fusion
  client retries any non-200, so 504 makes both back off and retry. Requests first queue
  (bounded wait) rather than being rejected.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandbox.executor import BadRequest, Executor
from sandbox.isolation import Isolation, detect
from sandbox.pool import Saturated, ZygotePool
from sandbox.schemas import RunCodeRequest, RunCodeResponse, RunStatus
from sandbox.settings import Settings

log = logging.getLogger("sandbox.api")


def model_response(model: RunCodeResponse) -> Response:
    """Serialize in pydantic-core directly: the model is already valid, so FastAPI's
    ``response_model`` round trip (validate again, then encode) is skipped; the OpenAPI schema
    still comes from ``response_model``."""
    return Response(model.model_dump_json(), media_type="application/json")


class LimitBody:
    """Reject a body over ``max_bytes`` (413), or a ``Content-Length`` not a number (400).

    With ``Content-Length`` this is decided before reading; without one (chunked) the body is
    read here, counting, and replayed to the app only if it stays under the limit, so no size
    of body is ever held whole beyond ``max_bytes``. Plain ASGI, not ``@app.middleware("http")``:
    Starlette's BaseHTTPMiddleware runs every request through an extra task and memory streams,
    a measurable share of a ~1 ms request.
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


def create_app(settings: Settings | None = None, isolation: Isolation | None = None) -> FastAPI:
    """Build the app; the zygote pool starts in the lifespan (isolation detected if not given)."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        iso = isolation or detect(settings)
        pool = ZygotePool(settings, iso)
        await pool.start()
        app.state.pool = pool
        app.state.executor = Executor(settings, pool)
        app.state.isolation = iso
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(
        title="retool-modal sandbox",
        version="0.1.0",
        description="Secure, warm-pool, SandboxFusion-compatible code execution.",
        lifespan=lifespan,
    )

    app.add_middleware(LimitBody, max_bytes=settings.max_request_bytes)

    @app.get("/v1/ping", summary="Liveness check", response_model=str)
    async def ping() -> str:
        return "pong"

    def authorize(request: Request) -> None:
        """Bearer-token check (constant time) when the service has a token."""
        if not settings.api_token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), settings.api_token.encode()
        ):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token (Authorization: Bearer $SANDBOX_API_TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.post(
        "/run_code",
        dependencies=[Depends(authorize)],
        response_model=RunCodeResponse,
        summary="Run code in the sandbox",
        responses={
            401: {"description": "The service has a token and the request lacks it"},
            413: {"description": "Code, stdin or files over the documented size"},
            422: {"description": "Invalid request (e.g. unsupported language)"},
            504: {"description": "Saturated: retry after Retry-After seconds"},
        },
    )
    async def run_code(body: RunCodeRequest, request: Request) -> Response:
        executor: Executor = request.app.state.executor
        try:
            return model_response(await executor.run(body))
        except BadRequest as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)
        except Saturated as exc:
            return JSONResponse(
                {"detail": f"sandbox saturated: {exc}"},
                status_code=504,
                headers={"Retry-After": "1"},
            )
        except Exception as exc:  # a bug here must not become a 500 the clients won't retry
            log.exception("sandbox fault")
            return model_response(
                RunCodeResponse(
                    status=RunStatus.sandbox_error,
                    message=f"{type(exc).__name__}: {exc}",
                    executor_pod_name=settings.pod_name,
                )
            )

    return app
