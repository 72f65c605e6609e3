"""The pool's worker in the sandbox image's own layout, through tests/modal's container-faithful
harness: ``images/sandbox.Dockerfile``'s Python and exactly its pip set at ``/usr/local``, its
``COPY`` lines at ``/app``, its ``WORKDIR`` and ``ENV``, Modal's container environment, nothing
of the repository or the host's home. The pool starts a sandbox there with the very command the
Modal adapter ``exec``s (``ModalBackend.worker_argv``); its worker must pass its self-test inside
and serve calls. What this cannot show: Modal's gVisor (tests/sandbox/test_gvisor_selftest.py
has a 2022 one) and its API (tests/sandbox/test_modal_backend.py binds the calls).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from sandbox.fleet import Fleet, FleetConfig
from sandbox.local_backend import LocalProcess
from sandbox.modal_backend import DOCKERFILE, REPO, ModalBackend
from sandbox.selftest import worker_request
from sandbox.settings import Settings
from tests.modal import harness

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("bwrap") is None, reason="needs root and bubblewrap"
    ),
]
# What the harness reads of a function's description, for a container of the sandbox image
# alone (a pool sandbox has no app file, no mounts, no volumes, no secrets).
IMAGE_ONLY = {
    "functions": {
        "pool-sandbox": {
            "image": {"dockerfile": str(REPO / DOCKERFILE), "files": [], "env": {}},
            "volumes": [],
            "secret_env": {},
            "module": "",
        }
    }
}


class ImageSandbox:
    """A container of the sandbox image; each ``exec`` is a process in that layout."""

    def __init__(self, workspace: Path) -> None:
        self.id = f"image-{uuid.uuid4().hex[:8]}"
        self.container = harness.Container(IMAGE_ONLY, "pool-sandbox", workspace)
        self.run_dir = Path(tempfile.mkdtemp(prefix="pool-", dir=workspace))
        (self.run_dir / "harness").mkdir()
        self.processes: list[LocalProcess] = []

    async def exec(self, *argv: str) -> LocalProcess:
        proc = await asyncio.create_subprocess_exec(
            *self.container.bwrap(self.run_dir), *argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self.processes.append(LocalProcess(proc))
        return self.processes[-1]

    async def terminate(self) -> None:
        for process in self.processes:
            if process.proc.returncode is None:
                process.proc.kill()
            await process.proc.wait()


class ImageBackend:
    name = "image"
    worker_argv = ModalBackend.worker_argv  # what the Modal adapter execs, word for word

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace

    async def create(self, spec) -> ImageSandbox:
        return ImageSandbox(self.workspace)

    async def list(self, tags) -> list:
        return []


async def test_the_worker_starts_in_the_sandbox_image_and_serves(tmp_path: Path) -> None:
    pool = Fleet(ImageBackend(tmp_path), FleetConfig(name="image", slots=2, start_timeout_s=240))
    await pool.start()
    try:
        (member,) = pool.members.values()
        code = "import numpy, sympy, os; print(int(numpy.sum(numpy.arange(5))), os.getuid())"
        reply = await pool.run(worker_request(Settings(), code, ""))
    finally:
        await pool.close()
    total, uid = reply["stdout"].split()
    assert total == "10" and uid in ("61000", "61001"), reply  # a slot's own unprivileged uid
    assert member.record.mode in ("bwrap", "bwrap-ownnet", "unshare")
