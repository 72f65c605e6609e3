"""The server side of the warm pool: one zygote process, N slot sockets, a bounded queue.

Each slot is a long-lived worker inside the zygote (see ``zygote/``) reached over its own
UNIX socketpair, so requests never share a channel and responses cannot be mixed up. A request
waits for a free slot at most ``queue_timeout_s``; with more than ``max_queue`` waiting it is
turned away at once (:class:`Saturated`, HTTP 504, which both verl and the sandbox-fusion client
retry). A sandbox fault (a worker dying, a wedged zygote) fails only the requests in flight, with
``SandboxError``, and the zygote is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from typing import Any

from sandbox.cgroups import SlotCgroups
from sandbox.isolation import Isolation
from sandbox.settings import MiB, Settings

log = logging.getLogger("sandbox.pool")
HEADER = struct.Struct("!I")
START_TIMEOUT_S = 60.0
REPLY_GRACE_S = 10.0  # beyond run_timeout, for setup, kill sweep and fetch_files


class Saturated(RuntimeError):
    """No slot became free in time, or the queue is full."""


class SandboxFault(RuntimeError):
    """The sandbox itself failed (not the user's code)."""


class _Slot:
    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.index = index
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(request).encode()
        self.writer.write(HEADER.pack(len(body)) + body)
        await self.writer.drain()
        head = await self.reader.readexactly(HEADER.size)
        return json.loads(await self.reader.readexactly(HEADER.unpack(head)[0]))


class ZygotePool:
    """Owns the zygote; ``run()`` executes one request on a free slot."""

    def __init__(self, settings: Settings, isolation: Isolation, profile: bool = False) -> None:
        self.settings = settings
        self.profile = profile  # workers add phase timestamps to replies (scripts/profile_sandbox)
        self.isolation = isolation
        self.info: dict[str, Any] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._slots: list[_Slot] = []
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        self._waiting = 0
        self._generation = 0
        self._restart_lock = asyncio.Lock()
        self._cgroups: SlotCgroups | None = None
        self._cgroups_tried = False

    async def start(self) -> None:
        n = self.settings.slots
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(n)]
        child_fds = [child.fileno() for _, child in pairs]
        if not self._cgroups_tried and self.isolation.drop_uid:
            self._cgroups_tried = True
            self._cgroups = SlotCgroups.create(n)
        cgroup_fds = [list(pair) for pair in self._cgroups.fds] if self._cgroups else None
        cfg = {
            "fds": child_fds,
            "base_uid": self.settings.base_uid,
            "preload": self.settings.preload.split(","),
            **self.isolation.zygote_cfg(),
            "mountns": self.isolation.mountns,
            "drop_uid": self.isolation.drop_uid,
            "seccomp": bool(self.isolation.probe.get("seccomp")),
            # modes without a mount namespace: one per server (not shared with another's slots)
            "scratch_root": f"/tmp/sandbox-scratch-{os.getpid()}",
            "scratch_bytes": self.settings.scratch_mb * MiB,
            "profile": self.profile,
            "cgroups": cgroup_fds,
        }
        self._proc = await asyncio.create_subprocess_exec(
            *self.isolation.zygote_argv(json.dumps(cfg)),
            env=self.isolation.zygote_env(),
            pass_fds=child_fds + [fd for pair in cgroup_fds or [] for fd in pair],
            stdin=asyncio.subprocess.DEVNULL,
        )
        for _, child in pairs:
            child.close()
        slots = []
        for i, (parent, _) in enumerate(pairs):
            reader, writer = await asyncio.open_connection(sock=parent, limit=1 << 20)
            slots.append(_Slot(i, reader, writer))
        try:
            line = await asyncio.wait_for(slots[0].reader.readline(), START_TIMEOUT_S)
            self.info = json.loads(line)
        except (TimeoutError, ValueError) as exc:
            await self.close()
            raise SandboxFault(f"zygote did not start: {exc!r}") from exc
        self._slots = slots
        self._free = asyncio.Queue()
        for slot in slots:
            self._free.put_nowait(slot)
        self._generation += 1
        log.info("zygote ready: %d slots, %s", n, self.info)

    async def close(self, final: bool = True) -> None:
        for slot in self._slots:
            slot.writer.close()
        self._slots = []
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None
        if final and self._cgroups is not None:
            self._cgroups.close()
            self._cgroups, self._cgroups_tried = None, False

    async def _restart(self, generation: int) -> None:
        async with self._restart_lock:
            if generation != self._generation:
                return  # someone else already restarted it
            log.error("restarting the zygote (generation %d)", generation)
            await self.close(final=False)
            await self.start()

    @property
    def queued(self) -> int:
        return self._waiting

    async def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one worker request; raises Saturated or SandboxFault, never for user-code errors."""
        if self._waiting >= self.settings.max_queue:
            raise Saturated(f"queue full ({self._waiting} waiting)")
        self._waiting += 1
        try:
            slot = await asyncio.wait_for(self._free.get(), self.settings.queue_timeout_s)
        except TimeoutError as exc:
            raise Saturated(f"no free slot within {self.settings.queue_timeout_s} s") from exc
        finally:
            self._waiting -= 1
        # Shielded: even if the HTTP handler is cancelled, the exchange completes and the slot is
        # returned in a consistent state (never with a reply still unread).
        task = asyncio.ensure_future(self._use(slot, request))
        return await asyncio.shield(task)

    async def _use(self, slot: _Slot, request: dict[str, Any]) -> dict[str, Any]:
        generation = self._generation
        healthy = False
        try:
            reply = await asyncio.wait_for(
                slot.exchange(request), request["run_timeout"] + REPLY_GRACE_S
            )
            healthy = True
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise SandboxFault(f"slot {slot.index} failed: {exc!r}") from exc
        finally:
            if healthy and generation == self._generation:
                self._free.put_nowait(slot)
            else:
                with contextlib.suppress(Exception):
                    await self._restart(generation)
        if reply.get("error"):
            raise SandboxFault(f"slot {slot.index}: {reply['error']}")
        return reply
