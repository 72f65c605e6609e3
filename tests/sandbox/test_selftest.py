"""The start-up self-test: each check passes in the secure modes and fails where it must.

Every test runs a real zygote (``ZygotePool``) and sends the test's calls through it, as the
start path does. ``none`` (no isolation at all) is the mode that fails each check, one at a time;
``bwrap-userns`` as root (one uid and one ``/tmp`` for every call) fails ``leftover``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from recipe.retool.core import paths
from sandbox import selftest
from sandbox.isolation import Isolation, detect
from sandbox.pool import ZygotePool
from sandbox.selftest import SelfTestFailed, self_test
from sandbox.settings import Settings
from sandbox.startup import start_isolated
from tests.sandbox.conftest import REPO

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the isolating modes need root")
NEEDS_BWRAP = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
SETTINGS = Settings(slots=2, preload="math", allow_insecure=True)


async def pool_in(mode: str, settings: Settings = SETTINGS) -> ZygotePool:
    iso = detect(Settings(**{**settings.__dict__, "isolation": mode}))
    pool = ZygotePool(settings, iso)
    await pool.start()
    return pool


@pytest.fixture
async def none_pool() -> AsyncIterator[ZygotePool]:
    pool = await pool_in("none")
    try:
        yield pool
    finally:
        await pool.close()


async def failing(pool: ZygotePool, *checks: str, settings: Settings = SETTINGS) -> str:
    with pytest.raises(SelfTestFailed) as err:
        await self_test(pool.run, settings, slots=settings.slots, checks=checks)
    assert err.value.check == checks[0]
    return str(err.value)


@NEEDS_BWRAP
async def test_bwrap_passes_every_check() -> None:
    pool = await pool_in("bwrap")
    try:
        report = await self_test(pool.run, SETTINGS, slots=SETTINGS.slots)
    finally:
        await pool.close()
    assert report.passed == selftest.CHECKS
    # this host's own non-loopback address was among the listeners the calls could not reach
    assert any(t.startswith(a) for a in selftest.host_addresses() for t in report.targets)


async def test_mount_a_calls_files_seen_by_the_parent_fail(none_pool) -> None:
    before = set(Path("/dev/shm").glob("selftest-*"))
    message = await failing(none_pool, "mount")
    assert message.startswith("self-test failed: mount: /")
    assert message.endswith(", written by a call, is visible outside it")
    assert set(Path("/dev/shm").glob("selftest-*")) == before  # the test took its files back


async def test_network_the_hosts_own_address_and_the_clusters_fail(none_pool) -> None:
    if not selftest.host_addresses():
        pytest.skip("this host has no non-loopback address")
    message = await failing(none_pool, "network")
    assert message.startswith("self-test failed: network: a call reached ")
    with socket.socket() as ray_head:  # a "cluster address" handed in by the launcher
        ray_head.bind(("127.0.0.1", 0))
        ray_head.listen()
        port = ray_head.getsockname()[1]
        settings = Settings(**{**SETTINGS.__dict__, "selftest_targets": f"127.0.0.1:{port}"})
        assert f"127.0.0.1:{port}" in await failing(none_pool, "network", settings=settings)


async def test_hidden_volume_paths_fail(none_pool, monkeypatch) -> None:
    volume = Path(tempfile.mkdtemp(prefix="sandbox-volume-", dir="/var/tmp"))
    try:
        monkeypatch.setattr(selftest, "HIDDEN_PATHS", (*selftest.HIDDEN_PATHS, str(volume)))
        assert (
            await failing(none_pool, "hidden") == f"self-test failed: hidden: a call sees {volume}"
        )
    finally:
        volume.rmdir()


@pytest.fixture
def process_with_a_secret() -> Iterator[int]:
    """A process of this host with a secret in its environment (as the trainer has)."""
    proc = subprocess.Popen(["sleep", "120"], env={"HF_TOKEN": "hf_fake_4242"})
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


async def test_secrets_a_readable_environment_with_one_fails(none_pool, process_with_a_secret):
    message = await failing(none_pool, "secrets")
    assert message.startswith("self-test failed: secrets: a call sees /proc/")
    assert re.search(selftest.SECRET_NAME, message.rsplit(": ", 1)[1], re.IGNORECASE)


@NEEDS_BWRAP
async def test_the_secure_mode_hides_the_same_secret_and_volume(process_with_a_secret, monkeypatch):
    volume = Path(tempfile.mkdtemp(prefix="sandbox-volume-", dir="/var/tmp"))
    monkeypatch.setattr(selftest, "HIDDEN_PATHS", (*selftest.HIDDEN_PATHS, str(volume)))
    pool = await pool_in("bwrap")
    try:
        report = await self_test(pool.run, SETTINGS, slots=2, checks=("hidden", "secrets"))
    finally:
        await pool.close()
        volume.rmdir()
    assert report.passed == ("hidden", "secrets")


@NEEDS_BWRAP
async def test_leftover_one_tmp_for_every_call_fails() -> None:
    """bwrap-userns as root: no per-run tmpfs, so a file in /tmp stays for the next call."""
    pool = await pool_in("bwrap-userns")
    try:
        message = await failing(pool, "leftover")
    finally:
        await pool.close()
    assert ", left by one call, is there for another" in message


async def test_a_failing_mode_is_refused_and_the_next_tried(monkeypatch) -> None:
    """The start path: a mode that probes fine but fails its self-test is not served; the error
    names each mode and its failing check (here: every mode but none fails its probe)."""
    from sandbox import isolation

    real = isolation.run_probe

    def probe(iso: Isolation, settings: Settings) -> dict | None:  # pretend only none starts
        return real(iso, settings) if iso.mode == "none" else {"probe_error": "not here"}

    monkeypatch.setattr(isolation, "run_probe", probe)
    with pytest.raises(isolation.IsolationUnavailable) as err:
        await start_isolated(Settings(**{**SETTINGS.__dict__, "isolation": "auto"}))
    assert "bwrap: not here" in str(err.value) and "none" not in str(err.value)
    forced = Settings(**{**SETTINGS.__dict__, "isolation": "none"})
    pool = await start_isolated(forced)  # by name only; its failure is logged, not hidden
    try:
        assert pool.selftest is None and pool.describe()["selftest"] is None
    finally:
        await pool.close()


def test_every_server_start_runs_it() -> None:
    """``python -m sandbox run``: the mode's line and the self-test's, before the call's output."""
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox", "run", "--code", "print(6 * 7)"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "SANDBOX_PRELOAD": "math", "SANDBOX_SLOTS": "2"},
    )
    assert proc.returncode == 0 and proc.stdout == "42\n", proc.stderr[-2000:]
    assert "self-test passed: mount, network, hidden, secrets, leftover" in proc.stderr


def test_the_hidden_paths_are_the_volumes_mount_paths() -> None:
    """One list inside the sandbox package (it runs without recipe/), kept equal to paths.py."""
    mounts = {str(paths.DATA_MOUNT), str(paths.MODELS_MOUNT), str(paths.CHECKPOINTS_MOUNT)}
    assert mounts <= set(selftest.HIDDEN_PATHS) and "/__modal" in selftest.HIDDEN_PATHS


def test_targets_parse_and_refuse_garbage() -> None:
    assert selftest.parse_targets("10.0.0.5:6379, [fd00::1]:6379") == [
        ("10.0.0.5", 6379),
        ("fd00::1", 6379),
    ]
    with pytest.raises(ValueError, match="expected host:port"):
        selftest.parse_targets("10.0.0.5")


@NEEDS_BWRAP
def test_a_development_mode_by_name_starts_and_says_it_failed() -> None:
    """``--isolation bwrap-userns --allow-insecure`` (a laptop without root): it runs, and its
    log says which check it fails; auto, the nodes and the pool never take it."""
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox", "run", "--isolation", "bwrap-userns",
         "--allow-insecure", "--code", "print(1)"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "SANDBOX_PRELOAD": "math", "SANDBOX_SLOTS": "2"},
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "1\n", proc.stderr[-2000:]
    assert "bwrap-userns (by name, development only) starts anyway: self-test failed: leftover" in (
        proc.stderr
    )
