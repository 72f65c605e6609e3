"""The pool of sandboxes on this machine's own containers (``LocalBackend``): real processes, real
namespaces, the real worker; what Modal would do is only the backend's part.

Each test names its pool uniquely, so reaping by tag touches only its own sandboxes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from sandbox.backends import TAG_KEY, SandboxSpec
from sandbox.fleet import REPORT_JSON, Fleet, FleetConfig, FleetUnavailable, size_for
from sandbox.local import free_port, start_server, stop
from sandbox.local_backend import LocalBackend, LocalSandbox
from sandbox.pool import SandboxFault
from sandbox.selftest import worker_request
from sandbox.settings import Settings

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None or shutil.which("nsenter") is None,
    reason="the local sandbox backend needs root, bubblewrap and nsenter",
)
SETTINGS = Settings(slots=2)
WHO = "import os, socket; print(os.getuid(), socket.gethostname(), sorted(os.listdir('/')))"


def call(code: str, stdin: str = "") -> dict:
    return worker_request(SETTINGS, code, stdin)


def config(**overrides) -> FleetConfig:
    base = {"name": f"test-{uuid.uuid4().hex[:8]}", "sandboxes": 1, "slots": 2, "cpu": 1.0}
    return FleetConfig(**{**base, **overrides})


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(registry=tmp_path / "registry")


@pytest.fixture
async def fleet(backend, tmp_path) -> AsyncIterator[Fleet]:
    pool = Fleet(backend, config(sandboxes=2), report_dir=tmp_path / "report")
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


async def until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_calls_run_in_isolated_sandboxes_each_as_a_slot_uid(fleet, backend) -> None:
    await until(lambda: len(fleet.members) == 2)
    replies = await asyncio.gather(*(fleet.run(call(WHO)) for _ in range(8)))
    seen = [r["stdout"].split(" ", 2) for r in replies]
    assert all(r["status"] == "Finished" and r["return_code"] == 0 for r in replies)
    assert {uid for uid, _, _ in seen} <= {"61000", "61001"}  # the worker's per-slot uids
    for _, host, listing in seen:  # the worker's own sandbox inside the container
        assert host == "sandbox" and "'work'" not in listing and "'root'" not in listing
    boxes = await backend.list({TAG_KEY: fleet.config.name})
    assert {b.id for b in boxes} == set(fleet.members)
    assert fleet.report()["calls"] == 8


async def test_the_report_has_latency_queue_wait_lifetimes_and_cost(fleet, tmp_path) -> None:
    await until(lambda: len(fleet.members) == 2)
    for _ in range(3):
        await fleet.run(call("print(1)"))
    await fleet.close()
    report = json.loads((tmp_path / "report" / REPORT_JSON).read_text())
    assert report["calls"] == 3 and report["failed_calls"] == 0
    assert (
        report["latency"]["p50_ms"] > 0
        and report["latency"]["p99_ms"] >= report["latency"]["p50_ms"]
    )
    assert report["queue_wait"]["p50_ms"] is not None
    assert report["cpu_hours"] > 0 and report["memory_gib_hours"] > 0
    assert report["ends"] == {"pool closed": 2} and report["lifetime_s"]["max"] > 0
    assert "| latency p50 / p99 |" in (tmp_path / "report" / "sandbox-pool.md").read_text()


async def test_a_sandbox_at_its_call_budget_is_replaced(backend) -> None:
    pool = Fleet(backend, config(call_budget=3))
    await pool.start()
    try:
        outputs = [(await pool.run(call("print(7)")))["stdout"] for _ in range(7)]
    finally:
        await pool.close()
    assert outputs == ["7\n"] * 7
    assert pool.report()["ends"].get("call budget", 0) >= 2
    assert len([r for r in pool.records if r.ready_s is not None]) >= 3


async def test_a_sandbox_near_its_lifetime_is_replaced_before_the_backend_ends_it(
    backend, monkeypatch
) -> None:
    from sandbox import fleet as fleet_module

    monkeypatch.setattr(fleet_module, "AGE_CHECK_S", 0.2)
    pool = Fleet(backend, config(max_age_s=8.0, timeout_s=60))  # ready in ~1-5 s here
    await pool.start()
    try:
        (first,) = pool.members.values()
        await until(lambda: first.record.id not in pool.members and len(pool.members) == 1)
        assert (await pool.run(call("print(9)")))["stdout"] == "9\n"
    finally:
        await pool.close()
    assert first.record.end == "age" and not first.sandbox.alive()


async def test_a_sandbox_that_dies_fails_its_calls_and_is_replaced(backend) -> None:
    pool = Fleet(backend, config())
    await pool.start()
    try:
        (member,) = pool.members.values()
        slow = asyncio.ensure_future(pool.run(call("import time; time.sleep(30)")))
        await until(lambda: member.inflight == 1)
        await asyncio.sleep(0.5)
        os.kill(member.sandbox.pid, signal.SIGKILL)  # the container's pid 1: all of it
        with pytest.raises(SandboxFault, match=r"ended|failed"):
            await slow
        await until(lambda: len(pool.members) == 1 and member.record.id not in pool.members)
        assert (await pool.run(call("print(8)")))["stdout"] == "8\n"
    finally:
        await pool.close()
    assert member.record.end.startswith("failed: its worker ended")


async def test_start_ends_what_a_killed_run_left_under_its_tag(backend) -> None:
    cfg = config()
    left = [await backend.create(cfg.spec()) for _ in range(2)]  # a hard-killed pool's
    other = await backend.create(SandboxSpec(tags={TAG_KEY: "someone-else"}))
    try:
        pool = Fleet(backend, cfg)
        await pool.start()
        await pool.close()
        assert pool.reaped == 2 and not any(box.alive() for box in left)
        assert other.alive()  # another pool's sandbox is not ours to end
        assert await backend.list({TAG_KEY: cfg.name}) == []
    finally:
        await other.terminate()


async def test_close_ends_every_sandbox_starting_ones_too(backend) -> None:
    pool = Fleet(backend, config(sandboxes=3, max_starting=3))
    await pool.start()
    await pool.close()  # the other two may still be starting
    assert _registered(backend, pool) == []
    assert await backend.list({TAG_KEY: pool.config.name}) == []


def _registered(backend: LocalBackend, pool: Fleet) -> list:
    entries = [json.loads(p.read_text()) for p in backend.registry.glob("*.json")]
    return [e for e in entries if e["tags"].get(TAG_KEY) == pool.config.name]


class Recording(LocalBackend):
    """The local backend, noting when each create starts and how many are starting at once."""

    def __init__(self, registry: Path) -> None:
        super().__init__(registry)
        self.started: list[float] = []
        self.starting = 0
        self.most_starting = 0

    async def create(self, spec: SandboxSpec) -> LocalSandbox:
        self.started.append(time.monotonic())
        self.starting += 1
        self.most_starting = max(self.most_starting, self.starting)
        try:
            box = await super().create(spec)
            await asyncio.sleep(0.5)  # "starting" lasts a while, as on Modal
            return box
        finally:
            self.starting -= 1


async def test_creates_are_rate_capped_and_few_start_at_once(tmp_path) -> None:
    backend = Recording(tmp_path / "registry")
    pool = Fleet(backend, config(sandboxes=3, max_starting=2, create_per_s=2.0, create_burst=1))
    await pool.start()
    try:
        await until(lambda: len(pool.members) == 3, timeout=120)
    finally:
        await pool.close()
    gaps = [b - a for a, b in zip(backend.started, backend.started[1:], strict=False)]
    assert len(backend.started) == 3 and min(gaps) >= 0.45, gaps  # 2 creates/s, no burst
    assert backend.most_starting <= 2


class Refusing(LocalBackend):
    """A sandbox whose worker may use only a mode that fails its self-test inside it."""

    worker_argv = ("/usr/bin/env", "SANDBOX_ISOLATION=bwrap-userns", *LocalBackend.worker_argv)


async def test_a_pool_whose_sandboxes_fail_their_self_test_is_refused(tmp_path) -> None:
    backend = Refusing(tmp_path / "registry")
    pool = Fleet(backend, config(max_failed_starts=2))
    with pytest.raises(FleetUnavailable) as err:
        await pool.start()
    assert "no sandbox of pool" in str(err.value) and "(2 tries on local)" in str(err.value)
    assert "self-test failed: leftover" in str(err.value)
    assert await backend.list({TAG_KEY: pool.config.name}) == []


def test_size_for_the_expected_concurrency() -> None:
    assert size_for(512, 16, 32) == 32
    assert size_for(513, 16, 64) == 33
    assert size_for(1, 16, 32) == 1 and size_for(10_000, 16, 32) == 32


def test_a_pool_shape_that_cannot_work_is_refused() -> None:
    with pytest.raises(ValueError, match="must be below timeout_s"):
        FleetConfig(name="x", max_age_s=7200, timeout_s=3600)


def serve_pool(name: str, report: Path) -> tuple:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "sandbox",
        "serve-pool",
        "--backend",
        "local",
        "--port",
        str(port),
    ]
    argv += ["--name", name, "--sandboxes", "2", "--slots-per-sandbox", "2", "--cpu", "1"]
    argv += ["--report", str(report), "--log-level", "warning"]
    return start_server(argv, port, wait_s=180), f"http://127.0.0.1:{port}"


def tagged(name: str) -> list:
    return asyncio.run(LocalBackend().list({TAG_KEY: name}))


def test_serve_pool_answers_as_sandboxfusion_and_sigterm_ends_its_sandboxes(tmp_path) -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    proc, base = serve_pool(name, tmp_path)
    try:
        body = {"code": "print(sum(range(10)))", "language": "python"}
        reply = httpx.post(f"{base}/run_code", json=body, timeout=60).json()
        assert reply["status"] == "Success" and reply["run_result"]["stdout"] == "45\n"
        info = httpx.get(f"{base}/v1/isolation", timeout=10).json()
        assert info["backend"] == "local" and set(info["worker_modes"]) <= {"bwrap", "unshare"}
        assert httpx.post(f"{base}/run_code", json={"code": "1"}, timeout=10).status_code == 422
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert tagged(name) == []
    assert json.loads((tmp_path / REPORT_JSON).read_text())["calls"] >= 2  # self-test + ours


def test_after_a_hard_kill_the_next_start_ends_the_sandboxes_left(tmp_path) -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    proc, _ = serve_pool(name, tmp_path)
    time.sleep(2)  # the second sandbox too
    proc.kill()  # no chance to clean up: Modal's sandboxes would go on running (and billing)
    proc.wait()
    left = tagged(name)
    assert left, "a hard kill left nothing to find"
    proc, _ = serve_pool(name, tmp_path)
    stop(proc)
    assert not any(box.alive() for box in left)
    assert json.loads((tmp_path / REPORT_JSON).read_text())["reaped_at_start"] == len(left)
