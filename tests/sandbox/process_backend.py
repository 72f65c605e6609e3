"""A pool backend for tests whose sandbox starts with its first ``exec``: each ``exec`` is a
process that a given prefix puts in the sandbox (``runsc do``, a harness container, ...)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from sandbox.local_backend import LocalProcess


class PrefixSandbox:
    """``exec(*argv)`` runs ``prefix(argv)`` here; ``terminate`` kills what it started."""

    def __init__(self, prefix: Callable[[Sequence[str]], list[str]], cwd: Path | None) -> None:
        self.id = f"test-{uuid.uuid4().hex[:8]}"
        self.prefix, self.cwd = prefix, cwd
        self.processes: list[LocalProcess] = []

    async def exec(self, *argv: str) -> LocalProcess:
        proc = await asyncio.create_subprocess_exec(
            *self.prefix(argv), cwd=self.cwd, start_new_session=True,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self.processes.append(LocalProcess(proc))
        return self.processes[-1]

    async def terminate(self) -> None:
        for process in self.processes:
            if process.proc.returncode is None:
                process.proc.kill()
            await process.proc.wait()


class PrefixBackend:
    """Makes :class:`PrefixSandbox` es (``make_prefix()`` for each); lists none."""

    def __init__(
        self,
        name: str,
        worker_argv: Sequence[str],
        make_prefix: Callable[[], Callable[[Sequence[str]], list[str]]],
        cwd: Path | None = None,
    ) -> None:
        self.name, self.worker_argv = name, tuple(worker_argv)
        self.make_prefix, self.cwd = make_prefix, cwd

    async def create(self, spec) -> PrefixSandbox:
        return PrefixSandbox(self.make_prefix(), self.cwd)

    async def list(self, tags) -> list:
        return []
