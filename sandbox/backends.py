"""What the pool of sandboxes (``sandbox/fleet.py``) needs of a place that makes sandboxes.

Two implement it: Modal Sandboxes (``sandbox/modal_backend.py``) and real containers on this
machine (``sandbox/local_backend.py``), so the pool, its worker, its recycling and the self-test
run in tests without a Modal account, on the same interface: ``create`` / ``exec`` /
``terminate`` / ``list`` by tag, which are Modal's own verbs.

A :class:`SandboxSpec` has no field for secrets, volumes or network access: a pool's sandboxes
get none of them, by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

TAG_KEY = "retool-pool"  # every sandbox of a pool carries {TAG_KEY: <pool name>}


@dataclass(frozen=True)
class SandboxSpec:
    """One pool's sandboxes: their limits and tags. No secrets, no volumes, no network."""

    tags: Mapping[str, str] = field(default_factory=dict)
    cpu: float = 2.0  # cores reserved (and billed at least) per sandbox
    cpu_limit: float = 8.0  # the most it may use (a burst above ``cpu`` is billed too)
    memory_mb: int = 8 * 1024  # reserved, and its hard limit
    timeout_s: int = 2 * 3600  # the backend ends a sandbox this old, whatever runs in it
    idle_timeout_s: int = 600  # ... and one with nothing running for this long


class Process(Protocol):
    """A command running in a sandbox, with its stdin and stdout as byte streams."""

    async def write(self, data: bytes) -> None: ...

    async def readline(self) -> bytes:
        """One line of stdout with its newline; ``b""`` once it ended."""
        ...

    async def last_words(self) -> str:
        """Its last lines on stderr (waiting a moment for them once it ended), for the one line
        that says why it ended."""
        ...


class Sandbox(Protocol):
    id: str

    async def exec(self, *argv: str) -> Process: ...

    async def terminate(self) -> None: ...


class Backend(Protocol):
    name: str
    # The command that starts ``sandbox/stdio_worker.py`` in this backend's image.
    worker_argv: Sequence[str]

    async def create(self, spec: SandboxSpec) -> Sandbox: ...

    async def list(self, tags: Mapping[str, str]) -> list[Sandbox]:
        """The running sandboxes carrying at least ``tags``, whoever made them."""
        ...
