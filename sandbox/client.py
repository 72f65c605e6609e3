"""The one HTTP client for a SandboxFusion-compatible ``/run_code`` endpoint.

Used by the ReTool tool (``recipe/retool/verl_plugins/tools.py``), the CLI, the tests and the
benchmark, so retry, back-off and concurrency rules live in exactly one place.

Rules:
- A failure of the *user's code* (exception, time-out, non-zero exit) is a normal result: it comes
  back as a :class:`RunResult` and never raises.
- A failure of the *transport or the service* (connection refused, HTTP 429/5xx, ``SandboxError``)
  is retried with exponential back-off and full jitter. Only when retries are exhausted does the
  client raise :class:`SandboxUnavailable`. HTTP 4xx other than 429 means the request itself is bad:
  retrying cannot help, so it raises :class:`SandboxRequestError` at once.
- At most ``max_concurrency`` requests are in flight per client (a semaphore), so a burst of tool
  calls queues here instead of overrunning the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from sandbox.environ import TOKEN_ENV

DEFAULT_ENDPOINT = "http://127.0.0.1:8080"
ENDPOINT_ENV = "SANDBOX_FUSION_ENDPOINT"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

_T = TypeVar("_T")


class SandboxUnavailable(RuntimeError):
    """The service could not run the code after all retries (transport or sandbox fault)."""


class SandboxRequestError(ValueError):
    """The service rejected the request as invalid (HTTP 4xx other than 429); not retried.
    ``status_code`` tells a refused token (401) from a bad request."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class RunResult:
    """One execution, flattened from SandboxFusion's ``RunCodeResponse``.

    ``status`` is the top-level ``Success``/``Failed``/``SandboxError``; ``run_status`` is the run
    phase's ``Finished``/``Error``/``TimeLimitExceeded`` (``None`` if the code never ran).
    """

    status: str
    run_status: str | None
    stdout: str
    stderr: str
    return_code: int | None
    execution_time: float | None
    message: str
    latency_s: float
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """True when the code ran to completion with exit code 0."""
        return self.status == "Success"

    @property
    def timed_out(self) -> bool:
        return self.run_status == "TimeLimitExceeded"

    @classmethod
    def from_response(cls, raw: dict[str, Any], latency_s: float) -> RunResult:
        run = raw.get("run_result") or {}
        compile_ = raw.get("compile_result") or {}
        # A compile failure (compiled languages) has no run phase: surface the compiler's output.
        phase = run or compile_
        return cls(
            status=str(raw.get("status", "SandboxError")),
            run_status=run.get("status"),
            stdout=phase.get("stdout") or "",
            stderr=phase.get("stderr") or "",
            return_code=phase.get("return_code"),
            execution_time=phase.get("execution_time"),
            message=str(raw.get("message") or ""),
            latency_s=latency_s,
            raw=raw,
        )


def normalize_endpoint(endpoint: str | None) -> str:
    """Return the full ``.../run_code`` URL for a base URL or a URL already ending in it."""
    url = (endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url if url.endswith("/run_code") else url + "/run_code"


class SandboxClient:
    """Async client with retries and bounded concurrency; ``run_code_sync`` for sync callers."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        max_concurrency: int = 64,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 8.0,
        transport: httpx.AsyncBaseTransport | None = None,
        api_token: str | None = None,
    ) -> None:
        self.url = normalize_endpoint(endpoint)
        # The service's bearer token (SANDBOX_API_TOKEN), sent with every request when set.
        token = os.environ.get(TOKEN_ENV, "") if api_token is None else api_token
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._transport = transport  # tests inject httpx.MockTransport here
        # httpx clients and semaphores bind to one event loop; keep one per loop so the sync
        # wrapper (its own loop in a thread) and async callers can share one SandboxClient.
        self._per_loop: dict[int, tuple[httpx.AsyncClient, asyncio.Semaphore]] = {}
        self._lock = threading.Lock()
        self._sync_loop: asyncio.AbstractEventLoop | None = None
        self._sync_thread: threading.Thread | None = None

    # -- internals -------------------------------------------------------------------------------
    def _state(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        key = id(loop)
        with self._lock:
            state = self._per_loop.get(key)
            if state is None:
                limits = httpx.Limits(
                    max_connections=self.max_concurrency,
                    max_keepalive_connections=self.max_concurrency,
                )
                http = httpx.AsyncClient(
                    timeout=self.timeout_s,
                    limits=limits,
                    transport=self._transport,
                    headers=self._headers,
                )
                state = (http, asyncio.Semaphore(self.max_concurrency))
                self._per_loop[key] = state
        return state

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        """Full-jitter exponential back-off; honours a server ``Retry-After`` as a floor."""
        delay = random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))
        if retry_after:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), self.backoff_max_s))
        return delay

    @staticmethod
    def build_payload(
        code: str,
        *,
        language: str = "python",
        run_timeout: float = 10,
        memory_limit_mb: int = -1,
        stdin: str | None = None,
        files: dict | None = None,
        fetch_files: list | None = None,
    ) -> dict[str, Any]:
        return {
            "code": code,
            "language": language,
            "compile_timeout": 10,
            "run_timeout": run_timeout,
            "memory_limit_MB": memory_limit_mb,
            "stdin": stdin,
            "files": dict(files or {}),
            "fetch_files": list(fetch_files or []),
        }

    # -- public API ------------------------------------------------------------------------------
    async def run_code(
        self,
        code: str,
        *,
        language: str = "python",
        run_timeout: float = 10,
        memory_limit_mb: int = -1,
        stdin: str | None = None,
        files: dict | None = None,
        fetch_files: list | None = None,
    ) -> RunResult:
        """Run ``code`` and return its result; raises only :class:`SandboxUnavailable` or
        :class:`SandboxRequestError`, never for a failure of the code itself."""
        payload = self.build_payload(
            code,
            language=language,
            run_timeout=run_timeout,
            memory_limit_mb=memory_limit_mb,
            stdin=stdin,
            files=files,
            fetch_files=fetch_files,
        )
        http, sem = self._state()
        last_error = "no attempt made"
        async with sem:
            for attempt in range(self.max_retries + 1):
                retry_after: str | None = None
                start = time.perf_counter()
                try:
                    resp = await http.post(self.url, json=payload)
                except httpx.HTTPError as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                else:
                    latency = time.perf_counter() - start
                    if resp.status_code == 200:
                        try:
                            raw = resp.json()
                        except ValueError:
                            last_error = f"HTTP 200 with a non-JSON body: {resp.text[:200]!r}"
                        else:
                            result = RunResult.from_response(raw, latency)
                            if result.status != "SandboxError":
                                return result
                            last_error = f"SandboxError: {result.message}"
                    elif resp.status_code in RETRY_STATUS:
                        last_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                        retry_after = resp.headers.get("retry-after")
                    else:
                        raise SandboxRequestError(
                            f"{self.url} rejected the request: HTTP {resp.status_code}: "
                            f"{resp.text[:500]}",
                            resp.status_code,
                        )
                if attempt < self.max_retries:
                    await asyncio.sleep(self._backoff(attempt, retry_after))
        raise SandboxUnavailable(
            f"{self.url} failed after {self.max_retries + 1} attempts; last error: {last_error}"
        )

    def _run_sync(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine on a private background loop (works inside or outside a running loop)."""
        with self._lock:
            if self._sync_loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="sandbox-client", daemon=True
                )
                thread.start()
                self._sync_loop, self._sync_thread = loop, thread
            loop = self._sync_loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def run_code_sync(
        self,
        code: str,
        *,
        language: str = "python",
        run_timeout: float = 10,
        memory_limit_mb: int = -1,
        stdin: str | None = None,
        files: dict | None = None,
        fetch_files: list | None = None,
    ) -> RunResult:
        """Blocking twin of :meth:`run_code` for sync callers (CLI, verl reward functions)."""
        return self._run_sync(
            self.run_code(
                code,
                language=language,
                run_timeout=run_timeout,
                memory_limit_mb=memory_limit_mb,
                stdin=stdin,
                files=files,
                fetch_files=fetch_files,
            )
        )

    async def aclose(self) -> None:
        """Close the HTTP connections owned by the current loop (and the sync helper's)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            mine = self._per_loop.pop(id(loop), None)
            sync_loop, self._sync_loop = self._sync_loop, None
        if mine is not None:
            await mine[0].aclose()
        if sync_loop is not None and sync_loop is not loop:
            state = self._per_loop.pop(id(sync_loop), None)
            if state is not None:
                asyncio.run_coroutine_threadsafe(state[0].aclose(), sync_loop).result()
            sync_loop.call_soon_threadsafe(sync_loop.stop)

    def close(self) -> None:
        """Sync close for sync callers (closes the background loop's connections)."""
        with self._lock:
            sync_loop, self._sync_loop = self._sync_loop, None
        if sync_loop is not None:
            state = self._per_loop.pop(id(sync_loop), None)
            if state is not None:
                asyncio.run_coroutine_threadsafe(state[0].aclose(), sync_loop).result()
            sync_loop.call_soon_threadsafe(sync_loop.stop)
