"""Sandboxes on this machine, with Modal's verbs: the pool's backend in tests and benchmarks.

Each sandbox is a real container, as far as the pool can tell: a bubblewrap process tree with
its own mount, pid, network (only ``lo``), IPC and UTS namespaces, an empty environment, and a
root made of the host's system directories read-only (``isolation.root_layout``), the
``sandbox`` package at ``/app/sandbox`` (what ``images/sandbox.Dockerfile`` copies there) and
private ``/tmp``, ``/var/tmp``, ``/dev/shm``: no project, no data, no GPU devices, no secrets.
``exec`` enters those namespaces with ``nsenter`` as root, as Modal's ``exec`` runs as root in
its container, so the worker there builds its own per-call sandbox inside, as it must on Modal.

Like a Modal Sandbox, it outlives the process that made it (a new session, not our child once we
die): a registry directory of one JSON file per sandbox lets :meth:`LocalBackend.list` find by
tag what a killed pool left behind. ``timeout_s`` is enforced (the container's first process
sleeps that long, and the namespace dies with it); ``cpu``, ``memory_mb`` and ``idle_timeout_s``
are taken and not enforced (Modal enforces them; the worker's own ``--idle-exit`` still ends an
unused worker). Needs root and bubblewrap, as the node sandbox does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.backends import SandboxSpec
from sandbox.isolation import layout_args, root_layout

SANDBOX_PACKAGE = Path(__file__).resolve().parent
DEFAULT_REGISTRY = Path("/tmp/retool-local-sandboxes")
SANDBOX_ENV = ("PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8")  # and nothing else
STREAM_LIMIT = 256 * 1024 * 1024  # one reply line may carry 32 MiB of fetched files, base64
START_TIMEOUT_S = 30.0
LAST_WORDS_S = 2.0  # how long an ended command's stderr may take to arrive
# The container's first process: says it runs (so its root is complete), then lives that long.
SLEEP = "__import__('time').sleep"


class LocalSandboxError(RuntimeError):
    """bubblewrap could not make the container; the message carries its stderr."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat), None if it is gone:
    with the pid, it names one process for good (a pid alone may be reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class LocalProcess:
    """``nsenter`` running one command in a container; stderr kept as its last lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._stderr: deque[str] = deque(maxlen=20)
        self.drained = asyncio.ensure_future(self._keep_stderr())

    async def _keep_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self._stderr.append(raw.decode(errors="replace").rstrip())

    async def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    async def readline(self) -> bytes:
        assert self.proc.stdout is not None
        return await self.proc.stdout.readline()

    async def last_words(self) -> str:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.drained), LAST_WORDS_S)
        shown = [line for line in self._stderr if line.strip()][-3:]
        return " | ".join(shown) if shown else "(nothing on stderr)"


@dataclass
class LocalSandbox:
    id: str
    pid: int  # host pid of the container's first process (pid 1 of its pid namespace)
    started: str  # its start time: a reused pid is not ours
    registry: Path
    tags: Mapping[str, str]
    bwrap: asyncio.subprocess.Process | None = None  # ours to reap, when we made it
    processes: list[LocalProcess] = field(default_factory=list)  # what exec started

    def alive(self) -> bool:
        return _start_time(self.pid) == self.started

    async def exec(self, *argv: str) -> LocalProcess:
        if not self.alive():
            raise LocalSandboxError(f"sandbox {self.id} is not running")
        enter = ["nsenter", f"--target={self.pid}", "--mount", "--uts", "--ipc", "--net", "--pid"]
        proc = await asyncio.create_subprocess_exec(
            *enter,
            "--root",
            "--wd",
            "--",
            "/usr/bin/env",
            "-i",
            *SANDBOX_ENV,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=STREAM_LIMIT,
            start_new_session=True,  # it runs in the sandbox, not in our process group
        )
        self.processes.append(LocalProcess(proc))
        return self.processes[-1]

    async def terminate(self) -> None:
        """SIGKILL the container's pid 1: the kernel kills everything in its pid namespace."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        (self.registry / f"{self.id}.json").unlink(missing_ok=True)
        if self.bwrap is not None:
            await self.bwrap.wait()
        for process in self.processes:  # they died with the namespace: reap them
            await process.proc.wait()
            await process.drained


class LocalBackend:
    """Makes :class:`LocalSandbox` containers (root and bubblewrap needed)."""

    name = "local"
    worker_argv = ("/usr/bin/python3", "-m", "sandbox.stdio_worker")  # cwd /app, as in the image

    def __init__(self, registry: Path = DEFAULT_REGISTRY, python: str = "/usr/bin/python3") -> None:
        self.registry = registry
        self.python = python

    def container_argv(self, spec: SandboxSpec, info_fd: int) -> list[str]:
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise LocalSandboxError("the local sandbox backend needs bubblewrap (bwrap on PATH)")
        return [
            bwrap,
            *("--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"),
            *("--unshare-cgroup-try", "--new-session", "--clearenv", "--hostname", "sandbox"),
            *layout_args(root_layout(self.python)),
            *("--ro-bind", str(SANDBOX_PACKAGE), "/app/sandbox"),
            *("--proc", "/proc", "--dev", "/dev"),
            *("--tmpfs", "/tmp", "--tmpfs", "/var/tmp", "--tmpfs", "/dev/shm", "--chdir", "/app"),
            *("--info-fd", str(info_fd), "--"),
            *(self.python, "-c", f"print('ready', flush=True); {SLEEP}({int(spec.timeout_s)})"),
        ]

    async def create(self, spec: SandboxSpec) -> LocalSandbox:
        self.registry.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.container_argv(spec, write_fd),
                pass_fds=(write_fd,),
                start_new_session=True,  # not in our process group: it outlives us, as Modal's
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        finally:
            os.close(write_fd)
        with os.fdopen(read_fd, "rb") as info_file:
            raw = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(None, info_file.read), START_TIMEOUT_S
            )
        if not raw:
            _, err = await proc.communicate()
            raise LocalSandboxError(f"bubblewrap did not start: {err.decode().strip()[-300:]}")
        # bubblewrap names the pid before the root is built: entering it now could find no /usr
        said = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        if said != b"ready\n":
            _, err = await proc.communicate()
            raise LocalSandboxError(f"the container did not start: {err.decode().strip()[-300:]}")
        pid = json.loads(raw)["child-pid"]
        started = _start_time(pid)
        if started is None:
            raise LocalSandboxError("the container ended at once")
        box = LocalSandbox(f"local-{uuid.uuid4().hex[:12]}", pid, started, self.registry,
                           dict(spec.tags), proc)  # fmt: skip
        entry = {"id": box.id, "pid": pid, "started": started, "tags": box.tags}
        entry["created"] = time.time()
        (self.registry / f"{box.id}.json").write_text(json.dumps(entry))
        return box

    async def list(self, tags: Mapping[str, str]) -> list[LocalSandbox]:
        found = []
        for path in sorted(self.registry.glob("*.json")) if self.registry.is_dir() else []:
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            box = LocalSandbox(entry["id"], entry["pid"], entry["started"], self.registry,
                               entry["tags"])  # fmt: skip
            if not box.alive():
                path.unlink(missing_ok=True)  # ended by its timeout: nothing to find
            elif all(box.tags.get(k) == v for k, v in tags.items()):
                found.append(box)
        return found
