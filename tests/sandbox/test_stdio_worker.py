"""The worker each pool sandbox runs: its line protocol, under the image's plain interpreter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from sandbox.selftest import worker_request
from sandbox.settings import Settings
from tests.sandbox.conftest import REPO

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None, reason="the worker's modes need root"
)
SETTINGS = Settings(slots=2)
# As in a sandbox: the system python (no venv: stdlib and the sandbox package only), no secrets.
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(REPO), "SANDBOX_PRELOAD": "math"}


def worker(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        ["/usr/bin/python3", "-m", "sandbox.stdio_worker", "--slots", "2", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**ENV, **(env or {})},
        cwd="/",
    )


def send(proc: subprocess.Popen, call_id: int, code: str) -> None:
    line = json.dumps({"id": call_id, "request": worker_request(SETTINGS, code, "")})
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()


def test_calls_in_replies_out_matched_by_id_in_any_order() -> None:
    proc = worker()
    try:
        hello = json.loads(proc.stdout.readline())
        assert hello["ready"] and hello["isolation"]["selftest"][-1] == "leftover", hello
        send(proc, 1, "import time; time.sleep(1.0); print('slow')")
        send(proc, 2, "print('fast')")
        first, second = (json.loads(proc.stdout.readline()) for _ in range(2))
        assert (first["id"], first["reply"]["stdout"]) == (2, "fast\n")  # did not wait for 1
        assert (second["id"], second["reply"]["stdout"]) == (1, "slow\n")
        send(proc, 3, "print('x' * 10, end='')\nimport sys; sys.exit(4)")
        third = json.loads(proc.stdout.readline())
        assert third["reply"]["return_code"] == 4 and third["reply"]["stdout"] == "x" * 10
        proc.stdin.close()  # EOF: it ends, its zygote with it
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_worker_nobody_calls_ends_by_itself() -> None:
    """A pool killed hard leaves its sandboxes' workers idle: each exits, and Modal's
    idle_timeout then ends the sandbox."""
    proc = worker("--idle-exit", "1")
    try:
        assert json.loads(proc.stdout.readline())["ready"]
        started = time.monotonic()
        assert proc.wait(30) == 0 and time.monotonic() - started < 20
    finally:
        proc.kill()
        proc.wait()


def test_it_never_runs_calls_in_mode_none() -> None:
    proc = worker(env={"SANDBOX_ISOLATION": "none"})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert json.loads(out) == {
        "ready": False,
        "error": "isolation none is never used for the pool's calls",
    }


def test_a_mode_that_fails_its_self_test_is_its_one_line() -> None:
    proc = worker(env={"SANDBOX_ISOLATION": "bwrap-userns"})
    out, _ = proc.communicate(timeout=120)
    status = json.loads(out)
    assert proc.returncode == 3 and status["ready"] is False
    assert status["error"].startswith(
        "no isolation mode works here (bwrap-userns: self-test failed: "
    )
