"""Turn a ``RunCodeRequest`` into a worker request, and the worker's reply into a response.

Everything a client can get wrong is checked here, before a slot is taken, and raised as
:class:`BadRequest` (HTTP 4xx with the reason). Status rules follow SandboxFusion: a time-out or a
non-zero exit is ``Failed``; a fault of the sandbox itself is ``SandboxError``.
"""

from __future__ import annotations

import base64
import binascii
import math
import posixpath
from typing import Any

from sandbox.pool import SandboxFault, ZygotePool
from sandbox.schemas import (
    SUPPORTED_LANGUAGES,
    CommandRunResult,
    CommandRunStatus,
    RunCodeRequest,
    RunCodeResponse,
    RunStatus,
)
from sandbox.settings import Settings


class BadRequest(ValueError):
    """The request is invalid; ``status_code`` is the HTTP status to answer with."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def check_path(path: str) -> None:
    """Allow relative paths and absolute paths under /tmp; reject any escape (``..``, NUL)."""
    if not path or "\x00" in path or len(path) > 4096:
        raise BadRequest(f"invalid file path {path!r}")
    norm = posixpath.normpath(path)
    if posixpath.isabs(norm):
        if not norm.startswith("/tmp/"):
            raise BadRequest(f"absolute file paths must be under /tmp/: {path!r}")
    elif norm == "." or norm.startswith(".."):
        raise BadRequest(f"file path escapes the working directory: {path!r}")


def check_layout(paths: list[str], code_file: str) -> None:
    """Reject files the worker could not write: over the code file, a path that is both a file
    and a directory, a name over 255 bytes."""
    rel = {
        posixpath.relpath(posixpath.normpath(p), "/tmp")
        if p.startswith("/")
        else posixpath.normpath(p)
        for p in paths
    }
    for path in rel:
        if path == code_file:
            raise BadRequest(f"files may not replace the code file {code_file!r}")
        if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in path.split("/")):
            raise BadRequest(f"a file name is longer than 255 bytes: {path[:80]!r}...")
        parent = posixpath.dirname(path)
        while parent:
            if parent in rel:
                raise BadRequest(f"{parent!r} is both a file and a directory in files")
            parent = posixpath.dirname(parent)


class Executor:
    """Validates and runs requests on a :class:`ZygotePool`."""

    def __init__(self, settings: Settings, pool: ZygotePool) -> None:
        self.settings = settings
        self.pool = pool

    def to_worker_request(self, req: RunCodeRequest) -> dict[str, Any]:
        s = self.settings
        language = req.language.strip().lower()
        if language not in SUPPORTED_LANGUAGES:
            raise BadRequest(
                f"unsupported language {req.language!r}; this sandbox runs "
                f"{', '.join(SUPPORTED_LANGUAGES)}"
            )
        if "\x00" in req.code:
            raise BadRequest("code contains a NUL byte")
        if len(req.code.encode("utf-8", "surrogatepass")) > s.max_code_bytes:
            raise BadRequest(f"code is larger than {s.max_code_bytes} bytes", 413)
        if req.stdin is not None and len(req.stdin.encode("utf-8", "surrogatepass")) > (
            s.max_stdin_bytes
        ):
            raise BadRequest(f"stdin is larger than {s.max_stdin_bytes} bytes", 413)
        if not math.isfinite(req.run_timeout) or req.run_timeout > s.max_run_timeout_s:
            raise BadRequest(f"run_timeout must be in (0, {s.max_run_timeout_s}] seconds")
        # SandboxFusion applies a limit only when memory_limit_MB > 0 (so 0 or -1 mean "none"
        # there); here any value <= 0 means the server default: a run is never unlimited.
        memory_mb = s.memory_mb if req.memory_limit_MB <= 0 else req.memory_limit_MB
        memory_mb = min(memory_mb, s.max_memory_mb)
        total = 0
        for path, content in req.files.items():
            check_path(path)
            if content:
                try:
                    total += len(base64.b64decode(content, validate=True))
                except (binascii.Error, ValueError) as exc:
                    raise BadRequest(f"files[{path!r}] is not valid base64") from exc
        check_layout(list(req.files), "main.sh" if language == "bash" else "main.py")
        if total > s.max_files_bytes:
            raise BadRequest(f"files total more than {s.max_files_bytes} bytes", 413)
        for path in req.fetch_files:
            check_path(path)
        for text in (req.code, req.stdin or ""):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise BadRequest("code and stdin must be valid UTF-8 text") from exc
        return {
            "language": "bash" if language == "bash" else "python",
            "code": req.code,
            "stdin": req.stdin,
            "files": req.files,
            "fetch_files": req.fetch_files,
            "run_timeout": req.run_timeout,
            "limits": s.run_limits(req.run_timeout, memory_mb),
        }

    async def run(self, req: RunCodeRequest) -> RunCodeResponse:
        """Raises BadRequest or pool.Saturated; a sandbox fault becomes a SandboxError response."""
        work = self.to_worker_request(req)
        try:
            reply = await self.pool.run(work)
        except SandboxFault as exc:
            return RunCodeResponse(
                status=RunStatus.sandbox_error,
                message=str(exc),
                executor_pod_name=self.settings.pod_name,
            )
        run = CommandRunResult(
            status=CommandRunStatus(reply["status"]),
            execution_time=reply["execution_time"],
            return_code=reply["return_code"],
            stdout=reply["stdout"],
            stderr=reply["stderr"],
        )
        ok = run.status == CommandRunStatus.finished and run.return_code == 0
        return RunCodeResponse(
            status=RunStatus.success if ok else RunStatus.failed,
            message="",
            compile_result=None,
            run_result=run,
            executor_pod_name=self.settings.pod_name,
            files=reply.get("files") or {},
        )
