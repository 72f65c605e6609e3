"""Modal Sandboxes as the pool's backend (modal 1.6.4's ``modal.Sandbox``).

Each sandbox is made with ``block_network=True`` (no way in or out: the worker speaks over
``exec``'s stdin and stdout), no secrets and no volumes (none is passed, and :class:`SandboxSpec`
has no field for them), CPU and memory reserved per sandbox, ``timeout`` (its lifetime) and
``idle_timeout``, tags naming its pool, and the sandbox image built from
``images/sandbox.Dockerfile`` (which copies the ``sandbox`` package to ``/app``). ``runtime``
is Modal's choice unless set: ``"vm"`` would give a real kernel, where bubblewrap runs as on the
GPU machines (not evaluated: docs/sandbox-security.md lists it with what never ran on Modal).

Every call here is checked against modal 1.6.4's real signatures in
``tests/sandbox/test_modal_backend.py``; none of this has run against Modal (no account here).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sandbox.backends import SandboxSpec

LAST_WORDS_S = 5.0  # how long an ended command's stderr may take to arrive over the network
POOL_APP_NAME = "retool-sandbox-pool"  # the Modal app the pool's sandboxes belong to
# Where the image's Dockerfile and build context are: the repository locally, /root in a Modal
# container that mounts the sandbox package there (and the two files the build COPYs).
REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = Path("images") / "sandbox.Dockerfile"


class ModalProcess:
    """``ContainerProcess`` (bytes mode) as the pool reads it: by line."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self._chunks = proc.stdout.__aiter__()
        self._buffer = b""
        self._stderr: deque[str] = deque(maxlen=20)
        self._drain = asyncio.ensure_future(self._keep_stderr())

    async def _keep_stderr(self) -> None:
        """Read stderr as it comes (the worker logs there), keeping its last lines."""
        with contextlib.suppress(Exception):  # a stream cut by the sandbox's end
            async for chunk in self.proc.stderr:
                text = chunk.decode(errors="replace") if isinstance(chunk, bytes) else chunk
                self._stderr.extend(line for line in text.splitlines() if line.strip())

    async def write(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        await self.proc.stdin.drain.aio()

    async def readline(self) -> bytes:
        while b"\n" not in self._buffer:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += chunk if isinstance(chunk, bytes) else chunk.encode()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    async def last_words(self) -> str:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._drain), LAST_WORDS_S)
        return " | ".join(list(self._stderr)[-3:]) or "(nothing on stderr)"


class ModalSandbox:
    def __init__(self, sandbox: Any) -> None:
        self.sandbox = sandbox
        self.id = sandbox.object_id

    async def exec(self, *argv: str) -> ModalProcess:
        proc = await self.sandbox.exec.aio(*argv, text=False, workdir="/app")
        return ModalProcess(proc)

    async def terminate(self) -> None:
        await self.sandbox.terminate.aio()


class ModalBackend:
    """Makes :class:`ModalSandbox` es in the app :data:`POOL_APP_NAME`.

    ``modal_module``: the ``modal`` module, or a stand-in with its signatures (the tests')."""

    name = "modal"
    worker_argv = ("python", "-m", "sandbox.stdio_worker")  # the image's WORKDIR is /app

    def __init__(
        self,
        app_name: str = POOL_APP_NAME,
        runtime: str | None = None,
        context_dir: Path = REPO,
        modal_module: Any = None,
    ) -> None:
        self.app_name = app_name
        self.runtime = runtime
        self.context_dir = context_dir
        self.modal = modal_module or importlib.import_module("modal")
        self._app: Any = None
        self._image: Any = None

    async def app(self) -> Any:
        if self._app is None:
            self._app = await self.modal.App.lookup.aio(self.app_name, create_if_missing=True)
        return self._app

    def image(self) -> Any:
        """The sandbox image from images/, defined once (Modal builds it on first use)."""
        if self._image is None:
            self._image = self.modal.Image.from_dockerfile(
                self.context_dir / DOCKERFILE, context_dir=self.context_dir
            )
        return self._image

    async def create(self, spec: SandboxSpec) -> ModalSandbox:
        sandbox = await self.modal.Sandbox.create.aio(
            app=await self.app(),
            image=self.image(),
            tags=dict(spec.tags),
            timeout=int(spec.timeout_s),
            idle_timeout=int(spec.idle_timeout_s),
            cpu=(float(spec.cpu), float(spec.cpu_limit)),  # (request, limit)
            memory=(int(spec.memory_mb), int(spec.memory_mb)),
            block_network=True,
            workdir="/app",
            runtime=self.runtime,
        )
        return ModalSandbox(sandbox)

    async def list(self, tags: Mapping[str, str]) -> list[ModalSandbox]:
        app = await self.app()
        return [
            ModalSandbox(sandbox)
            async for sandbox in self.modal.Sandbox.list.aio(app_id=app.app_id, tags=dict(tags))
        ]
