"""The refusal paths on a real gVisor (Debian's ``runsc``, 2022-12): the self-test and the pool.

That gVisor is the case the self-test exists for: ``unshare(CLONE_NEWNS)`` returns 0 there and
shares every mount anyway. A zygote that took per-run mount namespaces on ``unshare``'s word
would give every call the same ``/tmp``; the self-test's ``mount`` check sees it and refuses,
whatever the return code said. And a pool whose sandboxes run on that gVisor never gets a
ready sandbox: each worker's self-test refuses every mode, and the pool stops with that line.
"""

from __future__ import annotations

import json
import sys

import pytest

from sandbox.fleet import Fleet, FleetConfig, FleetUnavailable
from sandbox.local_backend import LocalBackend
from tests.sandbox.conftest import REPO
from tests.sandbox.process_backend import PrefixBackend
from tests.sandbox.test_gvisor import RUNSC, in_gvisor, pytestmark  # noqa: F401 (skip rules)

TRUSTING_UNSHARE = """
import asyncio
from sandbox.isolation import Isolation
from sandbox.pool import ZygotePool
from sandbox.selftest import SelfTestFailed, self_test
from sandbox.settings import Settings

class TrustsUnshare(Isolation):
    '''Per-run mount namespaces on unshare's word: it returns 0 on this gVisor.'''

    @property
    def mountns(self):
        return True

    @property
    def drop_uid(self):
        return True

async def main():
    settings = Settings(slots=1, preload="math")
    pool = ZygotePool(settings, TrustsUnshare("none", "/usr/bin/python3"))
    await pool.start()
    try:
        await self_test(pool.run, settings, slots=1)
        print("passed")
    except SelfTestFailed as exc:
        print(exc)
    finally:
        await pool.close()

asyncio.run(main())
"""


def test_the_mount_check_does_not_trust_unshares_return_code() -> None:
    proc = in_gvisor("-c", TRUSTING_UNSHARE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("self-test failed: mount: /"), proc.stdout + proc.stderr[-2000:]
    assert last.endswith(", written by a call, is visible outside it")


def test_none_by_name_runs_but_says_its_self_test_failed() -> None:
    proc = in_gvisor("-m", "sandbox", "run", "--isolation", "none", "--allow-insecure",
                     "--code", "print(42)")  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "42\n", proc.stderr[-2000:]
    assert "isolation none (by name, development only) starts anyway: self-test failed: " in (
        proc.stderr
    )


def test_the_pools_worker_refuses_in_one_line() -> None:
    proc = in_gvisor("-m", "sandbox.stdio_worker", "--slots", "1")
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 3 and status["ready"] is False, proc.stderr[-2000:]
    assert status["error"].startswith("no isolation mode works here (bwrap: ")
    assert "mounts made in a new mount namespace show outside it" in status["error"]


def in_runsc(argv) -> list[str]:
    """A gVisor container per command: the worker's ``python3`` is this interpreter there."""
    program = sys.executable if argv[0].endswith("python3") else argv[0]
    return [RUNSC, "--network=none", "do", program, *argv[1:]]


async def test_a_pool_on_this_gvisor_is_refused_with_the_workers_line() -> None:
    backend = PrefixBackend("runsc", LocalBackend.worker_argv, lambda: in_runsc, cwd=REPO)
    pool = Fleet(backend, FleetConfig(name="gvisor", max_failed_starts=2, slots=1))
    with pytest.raises(FleetUnavailable) as err:
        await pool.start()
    message = str(err.value)
    assert message.startswith("no sandbox of pool gvisor started (2 tries on runsc); the last: ")
    assert "no isolation mode works here (bwrap: " in message
