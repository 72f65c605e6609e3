"""The long-lived worker inside each Modal Sandbox: calls in on stdin, replies out on stdout.

``python -m sandbox.stdio_worker [--slots N] [--idle-exit S]`` is the one command the pool
(``sandbox/fleet.py``) ``exec``\\ s in a sandbox. It starts the project's zygote the way every
server does (``sandbox/startup.py``: the strongest mode that passes its self-test *inside this
sandbox*, never ``none``), then serves many calls, each on a slot of its own: a per-run
unprivileged uid, every process of that uid killed and the scratch wiped after the call, and the
namespaces the self-test showed to work. Why stdio and not the HTTP server: a sandbox made with
``block_network`` takes no connection, and ``exec``'s streams need none (docs/benchmarks.md,
"Modal Sandbox pool", measures both hops).

Protocol, one JSON object per line (JSON escapes every newline inside a value):

- first line out: ``{"ready": true, "isolation": {...}}`` (what ``GET /v1/isolation`` shows), or
  ``{"ready": false, "error": "<one line>"}`` and exit 3;
- in: ``{"id": N, "request": <worker request>}`` (``sandbox.executor`` builds them);
- out: ``{"id": N, "reply": <worker reply>}`` or ``{"id": N, "error": "<why>"}`` (a fault of the
  sandbox, never of the user's code), in any order.

It exits at EOF on stdin, and by itself after ``--idle-exit`` seconds without a call, so a
sandbox whose pool was killed hard goes idle and Modal's ``idle_timeout`` ends it. Standard
library and the ``sandbox`` core only: it runs under the image's plain interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from typing import Any

from sandbox.isolation import IsolationUnavailable
from sandbox.pool import SandboxFault, Saturated
from sandbox.settings import Settings, SettingsError
from sandbox.startup import IsolatedPool, start_isolated

log = logging.getLogger("sandbox.stdio_worker")
IDLE_EXIT_S = 600.0


class Worker:
    """Reads calls, runs each on the pool as it comes, writes replies as they finish."""

    def __init__(self, pool: IsolatedPool, out: asyncio.StreamWriter) -> None:
        self.pool = pool
        self.out = out
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._write_lock:
            self.out.write(json.dumps(message).encode() + b"\n")
            await self.out.drain()

    async def handle(self, call: dict[str, Any]) -> None:
        try:
            reply = await self.pool.run(call["request"])
        except (SandboxFault, Saturated) as exc:
            await self.send({"id": call["id"], "error": str(exc)})
            return
        await self.send({"id": call["id"], "reply": reply})

    async def serve(self, reader: asyncio.StreamReader, idle_exit_s: float) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), idle_exit_s)
            except TimeoutError:
                log.info("no call for %.0f s: exiting", idle_exit_s)
                break
            if not line:
                break
            call = json.loads(line)
            task = asyncio.ensure_future(self.handle(call))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def _pipes(limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Stdin as a stream, and the protocol's stdout, which nothing else may write: fd 1 itself
    then points at stderr, so a stray print (ours or a child's) cannot corrupt a reply line."""
    loop = asyncio.get_running_loop()
    out_fd = os.dup(1)
    os.dup2(2, 1)
    reader = asyncio.StreamReader(limit=limit)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(out_fd, "wb")
    )
    return reader, asyncio.StreamWriter(transport, protocol, None, loop)


async def main_async(settings: Settings, idle_exit_s: float) -> int:
    reader, out = await _pipes(limit=2 * settings.max_request_bytes)
    try:
        if settings.isolation == "none":
            raise IsolationUnavailable("isolation none is never used for the pool's calls")
        pool = await start_isolated(settings, strict=True)
    except IsolationUnavailable as exc:
        out.write(json.dumps({"ready": False, "error": str(exc)}).encode() + b"\n")
        await out.drain()
        return 3
    try:
        worker = Worker(pool, out)
        await worker.send({"ready": True, "isolation": pool.describe()})
        await worker.serve(reader, idle_exit_s)
    finally:
        await pool.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.stdio_worker", description=__doc__)
    parser.add_argument("--slots", type=int, help="concurrent calls (default: SANDBOX_SLOTS)")
    parser.add_argument("--idle-exit", type=float, default=IDLE_EXIT_S, help="seconds")
    parser.add_argument("--targets", help="host:port,... no call may reach (the cluster's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env(
            slots=args.slots, allow_insecure=True, selftest_targets=args.targets
        )
    except SettingsError as exc:
        print(json.dumps({"ready": False, "error": str(exc)}), flush=True)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(settings, args.idle_exit))
    return 130


if __name__ == "__main__":
    sys.exit(main())
