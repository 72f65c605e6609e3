"""The sandbox under gVisor, the kernel Modal runs containers on, here as Debian's ``runsc``
(gVisor of 2022-12, ``apt-get install runsc``) started as root: ``runsc --network=none do``.

That gVisor starts no mode but ``none`` (docs/sandbox-security.md, "Isolation on gVisor"):
bubblewrap 0.8 stops at /proc/sys/kernel/overflowuid, and ``unshare(CLONE_NEWNS)`` is accepted
but a mount made after it shows in every process, so runs would share one /tmp. What must hold
there: the server says so in one line (no traceback) and refuses (``auto`` never takes ``none``),
and the planted-file test passes (only ``none`` starts, and only it reads the files).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sandbox.conftest import MODES_ENV, REPO

RUNSC = shutil.which("runsc")
IN_GVISOR = Path("/proc/sentry-meminfo").exists()  # a file only gVisor's /proc has
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or RUNSC is None or IN_GVISOR,
    reason="needs root, runsc (apt-get install runsc) and a host that is not gVisor already",
)


def in_gvisor(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``argv`` (after this interpreter) inside ``runsc --network=none do``, in the repo."""
    return subprocess.run(
        [RUNSC, "--network=none", "do", sys.executable, *argv],
        cwd=REPO,
        env={**os.environ, "SANDBOX_PRELOAD": "math", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_modes_that_cannot_start_under_gvisor_say_why_in_one_line() -> None:
    run = ("-m", "sandbox", "run", "--code", "print(1)")
    proc = in_gvisor(*run, "--isolation", "unshare", "--allow-insecure")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "error: no isolation mode works here (unshare: [Errno 1] mounts made in a new mount "
        "namespace show outside it)"
    )
    proc = in_gvisor(*run)  # auto: only none would start, and auto never takes it
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: no isolation mode works here (bwrap")
    assert "overflowuid" in proc.stderr  # why bwrap did not start, in the log


def test_planted_files_under_gvisor() -> None:
    test = "tests/sandbox/test_isolation.py::test_no_mode_but_none_reads_files_outside_the_sandbox"
    proc = in_gvisor("-m", "pytest", test, "-q", "-p", "no:cacheprovider", env={MODES_ENV: "none"})
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr
