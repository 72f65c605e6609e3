"""FastAPI app: ``POST /run_code`` (SandboxFusion's contract), ``GET /v1/ping``, OpenAPI at /docs.

HTTP status policy (why these codes):
- 200 for every executed request, whatever the user's code did, and for ``SandboxError``
  (as SandboxFusion does; its client retries a SandboxError).
- 4xx for a bad request (422 invalid, 413 too large): retrying cannot help, so no client retries.
- 401 when the service has a token and the request lacks it, decided from the headers before
  the body is read (``sandbox/asgi.py``); only ``/v1/ping`` is open.
- 504 when saturated (queue full, or no slot within ``queue_timeout_s``), with ``Retry-After``.
  504 is the *only* status verl's ``call_sandbox_api`` retries, and the sandbox-fusion
  client retries any non-200, so 504 makes both back off and retry. Requests first queue
  (bounded wait) rather than being rejected.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sandbox.asgi import LimitBody, RequireBearer
from sandbox.executor import BadRequest, Executor
from sandbox.isolation import Isolation
from sandbox.pool import Saturated
from sandbox.schemas import RunCodeRequest, RunCodeResponse, RunStatus
from sandbox.settings import Settings
from sandbox.startup import CallPool, start_isolated

log = logging.getLogger("sandbox.api")
# The one route open without the token (a liveness probe); every other one needs it.
PING_PATH = "/v1/ping"
ISOLATION_PATH = "/v1/isolation"


def model_response(model: RunCodeResponse) -> Response:
    """Serialize in pydantic-core directly: the model is already valid, so FastAPI's
    ``response_model`` round trip (validate again, then encode) is skipped; the OpenAPI schema
    still comes from ``response_model``."""
    return Response(model.model_dump_json(), media_type="application/json")


def create_app(
    settings: Settings | None = None,
    isolation: Isolation | None = None,
    pool: CallPool | None = None,
) -> FastAPI:
    """Build the app. Its calls run on ``pool`` when given (already started: the self-tested
    zygote of ``python -m sandbox serve``, or the Modal Sandbox pool of ``serve-pool``), else on
    a zygote the lifespan starts in the first mode that passes its self-test (``isolation``
    only, when given; ``sandbox/startup.py``). The lifespan closes it either way."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        running = pool or await start_isolated(settings, isolation)
        app.state.pool = running
        app.state.executor = Executor(settings, running)
        try:
            yield
        finally:
            await running.close()

    app = FastAPI(
        title="retool-modal sandbox",
        version="0.1.0",
        description="Secure, warm-pool, SandboxFusion-compatible code execution.",
        lifespan=lifespan,
    )

    # Outermost last: the token is checked from the headers before any body byte is read, then
    # the size (sandbox/asgi.py says why neither can be a FastAPI dependency).
    app.add_middleware(LimitBody, max_bytes=settings.max_request_bytes)
    if settings.api_token:
        app.add_middleware(
            RequireBearer,
            token=settings.api_token,
            open_paths={PING_PATH},
            hint="Authorization: Bearer $SANDBOX_API_TOKEN",
        )

    @app.get(PING_PATH, summary="Liveness check", response_model=str)
    async def ping() -> str:
        return "pong"

    @app.get(ISOLATION_PATH, summary="How calls are isolated here, and what the self-test showed")
    async def isolation_info(request: Request) -> dict:
        return request.app.state.pool.describe()

    @app.post(
        "/run_code",
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
