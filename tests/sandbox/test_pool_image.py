"""The pool's worker in the sandbox image's own layout, through tests/modal's container-faithful
harness: ``images/sandbox.Dockerfile``'s Python and exactly its pip set at ``/usr/local``, its
``COPY`` lines at ``/app``, its ``WORKDIR`` and ``ENV``, Modal's container environment, nothing
of the repository or the host's home. The pool starts a sandbox there with the very command the
Modal adapter ``exec``s (``ModalBackend.worker_argv``); its worker must pass its self-test inside
and serve calls. What this cannot show: Modal's gVisor (tests/sandbox/test_gvisor_selftest.py
has a 2022 one) and its API (tests/sandbox/test_modal_backend.py binds the calls).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from sandbox.fleet import Fleet, FleetConfig
from sandbox.modal_backend import DOCKERFILE, REPO, ModalBackend
from sandbox.selftest import worker_request
from sandbox.settings import Settings
from tests.modal import harness
from tests.sandbox.process_backend import PrefixBackend

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


def image_container(workspace: Path):
    """A fresh container of the sandbox image (the harness's layout); its commands' prefix."""
    container = harness.Container(IMAGE_ONLY, "pool-sandbox", workspace)
    run_dir = Path(tempfile.mkdtemp(prefix="pool-", dir=workspace))
    (run_dir / "harness").mkdir()
    return lambda argv: [*container.bwrap(run_dir), *argv]


async def test_the_worker_starts_in_the_sandbox_image_and_serves(tmp_path: Path) -> None:
    # the command the Modal adapter execs, word for word
    backend = PrefixBackend("image", ModalBackend.worker_argv, lambda: image_container(tmp_path))
    pool = Fleet(backend, FleetConfig(name="image", slots=2, start_timeout_s=240))
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
