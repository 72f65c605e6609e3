"""A warm pool of sandboxes (Modal's, or this machine's) that runs the tool's calls.

A DAPO generation batch makes up to 16k tool calls (64 prompts x 16 samples x up to 16 turns),
and dynamic sampling may draw ten batches a step; a sandbox per call cannot keep up with that
(Modal: create-to-first-command median 2.7 s, p99 22 s; about 30 creates/s). So each sandbox
runs one long-lived worker (``sandbox/stdio_worker.py``) serving ``slots`` calls at once, every
call in a sandbox of its own inside it (per-call uid, killed by uid, scratch wiped), and the
pool keeps ``sandboxes`` of them warm:

- **Starting.** Creates go through a token bucket (``create_per_s``, ``create_burst``) and at
  most ``max_starting`` sandboxes start at once (some stay "starting" for minutes): a sandbox
  not ready within ``start_timeout_s`` is ended and another made. A sandbox is ready once its
  worker's first line says its mode passed the self-test inside it; a refusal is that line.
- **Recycling.** A sandbox whose worker ends or misses a reply's deadline is ended, its calls
  in flight fail as ``SandboxError`` (which the tool retries), and a new one is made. One that
  reached ``call_budget`` calls or ``max_age_s`` takes no new call, ends when its last one
  returns, and is replaced as soon as it stops taking calls.
- **Ending.** :meth:`Fleet.close` ends every sandbox, the starting ones too (the server in
  front runs it on exit and on SIGTERM). Every sandbox carries the tag ``{TAG_KEY: name}``, and
  :meth:`Fleet.start` first ends whatever carries it: what a hard-killed run left behind.
  ``timeout_s``/``idle_timeout_s`` bound what nothing ends.
- **Refusing.** ``max_failed_starts`` failures in a row before any sandbox was ready stop the
  pool with the last one's reason (the worker's self-test line, say).
- **Reporting.** :meth:`Fleet.report`: per-call latency and queue wait (p50/p99), each
  sandbox's start time, lifetime, calls and why it ended, and its cost in reserved CPU-hours
  and GiB-hours (Modal bills ``max(request, use)`` per second).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sandbox.backends import TAG_KEY, Backend, Process, Sandbox, SandboxSpec
from sandbox.pool import REPLY_GRACE_S, SandboxFault, Saturated

log = logging.getLogger("sandbox.fleet")
TRANSPORT_GRACE_S = 30.0  # beyond the worker's own grace: Modal's streams are remote
AGE_CHECK_S = 5.0
SAMPLES_KEPT = 100_000  # per-call percentiles are over the last this many calls
REPORT_JSON = "sandbox-pool.json"
REPORT_MD = "sandbox-pool.md"


class FleetUnavailable(RuntimeError):
    """No sandbox of the pool could be made ready; the message says why (one line)."""


@dataclass(frozen=True)
class FleetConfig:
    """The pool's shape and limits (``python -m sandbox serve-pool`` flags)."""

    name: str  # the tag value: the next start ends the sandboxes a killed run left under it
    sandboxes: int = 4
    slots: int = 8  # calls at once per sandbox (its worker's SANDBOX_SLOTS)
    cpu: float = 2.0  # reserved per sandbox; it may burst to cpu_limit
    cpu_limit: float = 8.0
    memory_mb: int = 8 * 1024
    timeout_s: int = 2 * 3600  # the backend ends a sandbox this old...
    max_age_s: float = 100 * 60  # ...so the pool replaces it before that
    idle_timeout_s: int = 10 * 60
    call_budget: int = 20_000
    create_per_s: float = 5.0
    create_burst: int = 10
    max_starting: int = 8
    start_timeout_s: float = 300.0
    queue_timeout_s: float = 60.0
    max_queue: int = 16_384
    max_failed_starts: int = 3
    targets: str = ""  # host:port,... each sandbox's self-test must not reach (the cluster's)

    def __post_init__(self) -> None:
        if self.sandboxes < 1 or self.slots < 1 or self.max_starting < 1:
            raise ValueError("sandboxes, slots and max_starting must be at least 1")
        if self.cpu_limit < self.cpu:
            raise ValueError(f"cpu_limit {self.cpu_limit} is below the cpu reserved {self.cpu}")
        if self.max_age_s >= self.timeout_s:
            raise ValueError(f"max_age_s {self.max_age_s} must be below timeout_s {self.timeout_s}")

    def spec(self) -> SandboxSpec:
        return SandboxSpec(
            tags={TAG_KEY: self.name},
            cpu=self.cpu,
            cpu_limit=self.cpu_limit,
            memory_mb=self.memory_mb,
            timeout_s=self.timeout_s,
            idle_timeout_s=self.idle_timeout_s,
        )


def size_for(concurrency: int, slots: int, cap: int) -> int:
    """Sandboxes for ``concurrency`` calls at once, ``slots`` per sandbox, at most ``cap``."""
    return max(1, min(cap, math.ceil(concurrency / slots)))


class RateLimit:
    """A token bucket: ``per_s`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, per_s: float, burst: int) -> None:
        self.per_s, self.burst = per_s, burst
        self.tokens, self.at = float(burst), time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_s)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.per_s)


@dataclass
class SandboxRecord:
    """One sandbox's life, for the report."""

    id: str
    created: float  # wall clock
    ready_s: float | None = None  # create -> its worker ready
    ended: float | None = None
    calls: int = 0
    end: str = ""
    mode: str = ""  # the isolation its worker took (and self-tested) inside it
    secure: bool = False

    def lifetime_s(self, now: float) -> float:
        return (self.ended or now) - self.created


@dataclass
class Member:
    """A ready sandbox and its worker."""

    sandbox: Sandbox
    process: Process
    record: SandboxRecord
    born: float  # monotonic
    pending: dict[int, asyncio.Future] = field(default_factory=dict)
    inflight: int = 0
    draining: bool = False  # takes no new call
    retiring: bool = False  # we are ending it: its stdout's end is no failure
    reader: asyncio.Task | None = None


def percentiles(values: list[float] | deque[float]) -> dict[str, float | None]:
    """p50 and p99 (nearest rank), in milliseconds."""
    ordered = sorted(values)
    if not ordered:
        return {"p50_ms": None, "p99_ms": None}
    rank = lambda q: ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
    return {"p50_ms": round(rank(0.50) * 1e3, 2), "p99_ms": round(rank(0.99) * 1e3, 2)}


class Fleet:
    """The pool: :meth:`start`, :meth:`run` (one worker request), :meth:`close`."""

    def __init__(
        self, backend: Backend, config: FleetConfig, report_dir: Path | None = None
    ) -> None:
        self.backend = backend
        self.config = config
        self.report_dir = report_dir  # close() writes REPORT_JSON and REPORT_MD there
        self.members: dict[str, Member] = {}
        self.records: list[SandboxRecord] = []
        self.latencies: deque[float] = deque(maxlen=SAMPLES_KEPT)
        self.waits: deque[float] = deque(maxlen=SAMPLES_KEPT)
        self.calls = 0
        self.failed_calls = 0
        self.reaped = 0
        self.started_at = time.time()
        self.closed_at: float | None = None
        self._ids = itertools.count(1)
        self._rate = RateLimit(config.create_per_s, config.create_burst)
        self._starting = asyncio.Semaphore(config.max_starting)
        self._launches: set[asyncio.Task] = set()
        self._background: set[asyncio.Task] = set()
        self._unready: dict[str, Sandbox] = {}  # made, its worker not ready yet: close ends them
        self._cond = asyncio.Condition()
        self._wake = asyncio.Event()
        self._first = asyncio.Event()
        self._maintainer: asyncio.Task | None = None
        self._failures = 0  # failed starts in a row
        self._ever_ready = False
        self._fatal: str | None = None
        self._closing = False
        self._waiting = 0

    # -- life ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """End what a killed run left under this pool's tag; start filling the pool; return once
        one sandbox is ready (raise :class:`FleetUnavailable` if none can be)."""
        left = await self.backend.list({TAG_KEY: self.config.name})
        for box in left:
            with contextlib.suppress(Exception):
                await box.terminate()
        self.reaped = len(left)
        if left:
            log.warning(
                "ended %d sandboxes a previous run left in pool %s", len(left), self.config.name
            )
        self._maintainer = asyncio.ensure_future(self._maintain())
        await self._first.wait()
        if self._fatal:
            await self.close()
            raise FleetUnavailable(self._fatal)
        log.info("sandbox pool %s: first sandbox ready", self.config.name)

    async def close(self) -> None:
        """End every sandbox (ready, starting, draining) and fail what is still in flight."""
        if self._closing:
            return
        self._closing = True
        tasks = [t for t in (self._maintainer, *self._launches) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(self._retire(m, "pool closed") for m in list(self.members.values())),
            *(self._end(box) for box in list(self._unready.values())),
            return_exceptions=True,
        )
        while self._background:  # ends of failed sandboxes still under way
            await asyncio.gather(*list(self._background), return_exceptions=True)
        with contextlib.suppress(Exception):  # anything of ours still running, whatever it is
            for box in await self.backend.list({TAG_KEY: self.config.name}):
                await self._end(box)
        self.closed_at = time.time()
        async with self._cond:
            self._cond.notify_all()
        log.info("%s", self.summary())
        if self.report_dir is not None:
            write_report(self.report(), self.report_dir)

    # -- calls -----------------------------------------------------------------------------------
    async def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """One worker request on a free slot of some sandbox; raises Saturated or SandboxFault."""
        if self._waiting >= self.config.max_queue:
            raise Saturated(f"queue full ({self._waiting} waiting)")
        asked = time.monotonic()
        self._waiting += 1
        try:
            member = await asyncio.wait_for(self._acquire(), self.config.queue_timeout_s)
        except TimeoutError as exc:
            raise Saturated(f"no sandbox slot free within {self.config.queue_timeout_s} s") from exc
        finally:
            self._waiting -= 1
        waited = time.monotonic() - asked
        call_id = next(self._ids)
        reply = asyncio.get_running_loop().create_future()
        member.pending[call_id] = reply
        deadline = request["run_timeout"] + REPLY_GRACE_S + TRANSPORT_GRACE_S
        try:
            line = json.dumps({"id": call_id, "request": request}).encode() + b"\n"
            await member.process.write(line)
            message = await asyncio.wait_for(asyncio.shield(reply), deadline)
        except TimeoutError:
            self.failed_calls += 1
            await self._drop(member, f"gave no reply within {deadline:.0f} s")
            raise SandboxFault(f"sandbox {member.record.id} gave no reply in time") from None
        except (OSError, ConnectionError) as exc:
            self.failed_calls += 1
            await self._drop(member, f"its worker's stdin failed ({exc})")
            raise SandboxFault(f"sandbox {member.record.id}: {exc}") from None
        except SandboxFault:
            self.failed_calls += 1
            raise
        finally:
            member.pending.pop(call_id, None)
            await self._returned(member)
        if "error" in message:
            self.failed_calls += 1
            raise SandboxFault(f"sandbox {member.record.id}: {message['error']}")
        self.calls += 1
        self.latencies.append(time.monotonic() - asked)
        self.waits.append(waited)
        return message["reply"]

    async def _acquire(self) -> Member:
        async with self._cond:
            while True:
                if self._fatal or self._closing:
                    raise SandboxFault(self._fatal or "the sandbox pool is closing")
                free = [
                    m
                    for m in self.members.values()
                    if not m.draining and m.inflight < self.config.slots
                ]
                if free:
                    member = min(free, key=lambda m: m.inflight)
                    member.inflight += 1
                    return member
                await self._cond.wait()

    async def _returned(self, member: Member) -> None:
        member.inflight -= 1
        member.record.calls += 1
        if member.record.calls >= self.config.call_budget and not member.draining:
            member.draining = True
            member.record.end = "call budget"
            self._wake.set()  # its replacement starts now
        if member.draining and member.inflight == 0 and member.record.id in self.members:
            self._later(self._retire(member, member.record.end or "drained"))
        async with self._cond:
            self._cond.notify_all()

    # -- keeping the pool full -------------------------------------------------------------------
    async def _maintain(self) -> None:
        while not self._closing and not self._fatal:
            now = time.monotonic()
            for member in list(self.members.values()):
                if not member.draining and now - member.born > self.config.max_age_s:
                    member.draining = True
                    member.record.end = "age"
                    if member.inflight == 0:
                        self._later(self._retire(member, "age"))
            active = sum(not m.draining for m in self.members.values())
            for _ in range(self.config.sandboxes - active - len(self._launches)):
                task = asyncio.ensure_future(self._launch())
                self._launches.add(task)
                task.add_done_callback(self._launches.discard)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), AGE_CHECK_S)

    async def _launch(self) -> None:
        async with self._starting:
            if self._failures and self._ever_ready:  # keep trying, but not in a tight loop
                await asyncio.sleep(min(60.0, 2.0**self._failures))
            await self._rate.take()
            record = SandboxRecord(id="(creating)", created=time.time())
            self.records.append(record)
            made: list[Sandbox] = []
            member: Member | None = None
            try:
                member = await asyncio.wait_for(
                    self._bring_up(record, made), self.config.start_timeout_s
                )
            except asyncio.CancelledError:
                record.end, record.ended = "pool closed while it started", time.time()
                raise
            except Exception as exc:
                why = str(exc) or type(exc).__name__
                if isinstance(exc, TimeoutError):
                    why = f"not ready within {self.config.start_timeout_s:.0f} s"
                self._failed_start(record, why)
            finally:
                for box in made:
                    self._unready.pop(box.id, None)
                if made and member is None:
                    record.ended = record.ended or time.time()
                    await self._end(made[0])
        if member is not None:
            self.members[record.id] = member
            member.reader = asyncio.ensure_future(self._read(member))
            self._failures = 0
            self._ever_ready = True
            self._first.set()
            log.info("sandbox %s ready in %.1f s (%s)", record.id, record.ready_s, record.mode)
            async with self._cond:
                self._cond.notify_all()
        self._wake.set()

    async def _bring_up(self, record: SandboxRecord, made: list[Sandbox]) -> Member:
        """Create a sandbox (into ``made``, so the caller ends it on any failure), start its
        worker, and read the worker's first line: ready (its self-test passed) or why not."""
        born = time.monotonic()
        creating = asyncio.ensure_future(self.backend.create(self.config.spec()))
        try:
            box = await asyncio.shield(creating)
        except asyncio.CancelledError:  # closing, or too slow: the sandbox may exist by now
            with contextlib.suppress(Exception):
                await self._end(await creating)
            raise
        made.append(box)
        record.id = box.id
        self._unready[box.id] = box
        process = await box.exec(*self._worker_argv())
        hello = await process.readline()
        status = json.loads(hello) if hello.strip() else {}
        if not status.get("ready"):
            why = status.get("error") or f"its worker ended: {await process.last_words()}"
            raise FleetUnavailable(why)
        record.ready_s = round(time.monotonic() - born, 3)
        record.mode = status["isolation"]["mode"]
        record.secure = bool(status["isolation"]["secure"])
        return Member(box, process, record, born)

    def _later(self, work: Any) -> None:
        """Run ``work`` (ending a sandbox) without holding up the call that caused it."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _worker_argv(self) -> list[str]:
        argv = [*self.backend.worker_argv, "--slots", str(self.config.slots)]
        argv += ["--idle-exit", str(self.config.idle_timeout_s)]
        return argv + (["--targets", self.config.targets] if self.config.targets else [])

    def _failed_start(self, record: SandboxRecord, why: str) -> None:
        self._failures += 1
        record.end = f"failed to start: {why}"
        log.warning("sandbox %s did not start: %s", record.id, why)
        if not self._ever_ready and self._failures >= self.config.max_failed_starts:
            self._fatal = (
                f"no sandbox of pool {self.config.name} started ({self._failures} tries on "
                f"{self.backend.name}); the last: {why}"
            )
            self._first.set()

    async def _read(self, member: Member) -> None:
        """Hand each reply line to its call; the stream's end is the worker's."""
        why = "its worker ended"
        try:
            while True:
                line = await member.process.readline()
                if not line:
                    break
                message = json.loads(line)
                waiter = member.pending.get(message.get("id"))
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
        except (OSError, ValueError) as exc:
            why = f"its worker's stdout failed ({exc})"
        if not member.retiring:  # tracked: close() waits for it
            self._later(self._drop(member, f"{why}: {await member.process.last_words()}"))

    # -- ending sandboxes ------------------------------------------------------------------------
    async def _drop(self, member: Member, why: str) -> None:
        """A sandbox that failed: its calls in flight fail, it ends, another is made."""
        if member.retiring:
            return
        log.warning("sandbox %s failed: %s", member.record.id, why)
        for waiter in member.pending.values():
            if not waiter.done():
                waiter.set_exception(SandboxFault(f"sandbox {member.record.id} {why}"))
        await self._retire(member, f"failed: {why}")

    async def _retire(self, member: Member, why: str) -> None:
        if member.retiring:
            return
        member.retiring = True
        member.draining = True
        self.members.pop(member.record.id, None)
        member.record.end = why
        member.record.ended = time.time()
        for waiter in member.pending.values():
            if not waiter.done():
                waiter.set_exception(SandboxFault(f"sandbox {member.record.id} ended ({why})"))
        await self._end(member.sandbox)
        if member.reader is not None and member.reader is not asyncio.current_task():
            member.reader.cancel()
        self._wake.set()

    async def _end(self, box: Sandbox) -> None:
        try:
            await box.terminate()
        except Exception as exc:  # already gone; the backend's timeouts bound the rest
            log.warning("ending sandbox %s: %s", box.id, exc)

    # -- what it did -----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        modes = Counter(m.record.mode for m in self.members.values())
        return {
            "backend": self.backend.name,
            "mode": f"{self.backend.name} sandboxes",
            "secure": bool(self.members) and all(m.record.secure for m in self.members.values()),
            "sandboxes": len(self.members),
            "worker_modes": dict(modes),
            "selftest": "each sandbox's worker passed it inside its sandbox before its first call",
        }

    def report(self) -> dict[str, Any]:
        now = self.closed_at or time.time()
        lifetimes = [r.lifetime_s(now) for r in self.records if r.ready_s is not None]
        made = [r for r in self.records if r.id != "(creating)"]
        return {
            "pool": asdict(self.config) | {"backend": self.backend.name},
            "calls": self.calls,
            "failed_calls": self.failed_calls,
            "latency": percentiles(self.latencies),
            "queue_wait": percentiles(self.waits),
            "sandboxes_made": len(made),
            "failed_starts": sum(r.end.startswith("failed to start") for r in self.records),
            "reaped_at_start": self.reaped,
            "ready_s": percentiles([r.ready_s for r in self.records if r.ready_s is not None]),
            "lifetime_s": {
                "mean": round(sum(lifetimes) / len(lifetimes), 1) if lifetimes else None,
                "max": round(max(lifetimes), 1) if lifetimes else None,
            },
            "ends": dict(Counter(r.end.split(":")[0] for r in self.records if r.ended)),
            "cpu_hours": round(sum(r.lifetime_s(now) for r in made) * self.config.cpu / 3600, 4),
            "memory_gib_hours": round(
                sum(r.lifetime_s(now) for r in made) * self.config.memory_mb / 1024 / 3600, 4
            ),
            "sandboxes": [asdict(r) for r in self.records],
        }

    def summary(self) -> str:
        """One line for the log: calls, latency, sandboxes and their cost."""
        rep = self.report()
        return (
            f"sandbox pool {self.config.name} ({self.backend.name}): {rep['calls']} calls "
            f"(p50 {rep['latency']['p50_ms']} ms, p99 {rep['latency']['p99_ms']} ms, "
            f"queue p99 {rep['queue_wait']['p99_ms']} ms), {rep['sandboxes_made']} sandboxes, "
            f"{rep['cpu_hours']:.3f} CPU-h and {rep['memory_gib_hours']:.3f} GiB-h reserved"
        )


def report_markdown(report: dict[str, Any]) -> str:
    """The pool's section of a run's report: what its calls cost in time and CPU."""
    pool = report["pool"]
    rows = [
        ("calls (failed)", f"{report['calls']} ({report['failed_calls']})"),
        ("latency p50 / p99", f"{report['latency']['p50_ms']} / {report['latency']['p99_ms']} ms"),
        (
            "queue wait p50 / p99",
            f"{report['queue_wait']['p50_ms']} / {report['queue_wait']['p99_ms']} ms",
        ),
        (
            "sandboxes made (failed starts)",
            f"{report['sandboxes_made']} ({report['failed_starts']})",
        ),
        (
            "start to ready p50 / p99",
            f"{report['ready_s']['p50_ms']} / {report['ready_s']['p99_ms']} ms",
        ),
        (
            "lifetime mean / max",
            f"{report['lifetime_s']['mean']} / {report['lifetime_s']['max']} s",
        ),
        ("why they ended", ", ".join(f"{k} {v}" for k, v in report["ends"].items()) or "-"),
        ("ended at start (left by a killed run)", str(report["reaped_at_start"])),
        (
            "reserved CPU-hours",
            f"{report['cpu_hours']} ({pool['cpu']} cores each, bursts to {pool['cpu_limit']})",
        ),
        ("reserved memory GiB-hours", f"{report['memory_gib_hours']}"),
    ]
    lines = [
        f"## Tool sandboxes: pool {pool['name']} ({pool['backend']})",
        "",
        f"{pool['sandboxes']} sandboxes x {pool['slots']} calls at once; call budget "
        f"{pool['call_budget']}, age limit {pool['max_age_s']:.0f} s.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], directory: Path) -> None:
    """``sandbox-pool.json`` (everything) and ``sandbox-pool.md`` (the table) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (directory / REPORT_MD).write_text(report_markdown(report))
