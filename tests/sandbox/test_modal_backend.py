"""The Modal adapter, checked against modal 1.6.4's real signatures (no Modal account here).

A stand-in ``modal`` module records every call the adapter makes and binds it to the real
function's ``inspect.signature`` (a wrong name, a missing or extra argument fails the test); what
the calls *do* is delegated to this machine's own sandboxes (``LocalBackend``), so the pool runs
through the adapter end to end, its worker answering over the stand-in ``exec``'s streams.
What this cannot show: Modal's behaviour behind those calls (docs/sandbox-security.md lists it).
"""

from __future__ import annotations

import inspect
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import modal
import pytest
from modal.io_streams import StreamWriter

from sandbox.backends import TAG_KEY, SandboxSpec
from sandbox.fleet import Fleet, FleetConfig
from sandbox.local_backend import LocalBackend
from sandbox.modal_backend import DOCKERFILE, POOL_APP_NAME, REPO, ModalBackend
from sandbox.selftest import worker_request
from sandbox.settings import Settings


class Checked:
    """One of modal's functions: ``.aio`` (or a plain call) binds to the real signature first."""

    def __init__(self, log: list, name: str, real: Any, impl: Any, method: bool = False) -> None:
        self.log, self.name, self.impl, self.method = log, name, impl, method
        self.signature = inspect.signature(real)

    def _bind(self, args: tuple, kwargs: dict) -> None:
        self.signature.bind(*(("self",) if self.method else ()), *args, **kwargs)  # raises
        self.log.append((self.name, args, kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._bind(args, kwargs)
        return self.impl(*args, **kwargs)

    def aio(self, *args: Any, **kwargs: Any) -> Any:
        self._bind(args, kwargs)
        return self.impl(*args, **kwargs)  # a coroutine or an async generator, as modal's


class Stream:
    """stdout/stderr of a stand-in ContainerProcess: async iteration over byte chunks."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.reader.read(65536)
        if not chunk:
            raise StopAsyncIteration
        return chunk


class Stdin:
    def __init__(self, log: list, writer) -> None:
        self.writer = writer
        self.write = Checked(log, "stdin.write", StreamWriter.write, writer.write, method=True)
        self.drain = Checked(log, "stdin.drain", StreamWriter.drain, writer.drain, method=True)


class FakeModal:
    """The part of ``modal`` the adapter uses, on LocalBackend."""

    def __init__(self, registry: Path) -> None:
        self.calls: list = []
        self.local = LocalBackend(registry)

        class App:
            lookup = Checked(self.calls, "App.lookup", modal.App.lookup, self._lookup)

        class Image:
            from_dockerfile = Checked(
                self.calls, "Image.from_dockerfile", modal.Image.from_dockerfile, self._image
            )

        class Sandbox:
            create = Checked(self.calls, "Sandbox.create", modal.Sandbox.create, self._create)
            list = Checked(self.calls, "Sandbox.list", modal.Sandbox.list, self._list)

        self.App, self.Image, self.Sandbox = App, Image, Sandbox

    async def _lookup(self, name: str, **kwargs: Any) -> Any:
        return type("AppHandle", (), {"app_id": f"ap-{name}"})()

    def _image(self, path: Path, **kwargs: Any) -> dict:
        return {"dockerfile": Path(path), **kwargs}

    def _wrap(self, box) -> Any:
        calls = self.calls

        async def exec_(program: str, *argv: str, **kwargs: Any) -> Any:
            # the image's `python` (python:3.11-slim) is this machine's system python3
            process = await box.exec("/usr/bin/python3" if program == "python" else program, *argv)
            proc = process.proc
            return type(
                "ContainerProcess",
                (),
                {"stdin": Stdin(calls, proc.stdin), "stdout": Stream(proc.stdout),
                 "stderr": Stream(proc.stderr)},
            )()  # fmt: skip

        async def terminate(**kwargs: Any) -> None:
            await box.terminate()

        handle = type("SandboxHandle", (), {})()
        handle.object_id = f"sb-{box.id}"
        handle.exec = Checked(calls, "sb.exec", modal.Sandbox.exec, exec_, method=True)
        handle.terminate = Checked(
            calls, "sb.terminate", modal.Sandbox.terminate, terminate, method=True
        )
        return handle

    async def _create(self, *args: Any, **kw: Any) -> Any:
        spec = SandboxSpec(tags=kw["tags"], timeout_s=kw["timeout"])
        return self._wrap(await self.local.create(spec))

    async def _list(self, *, app_id: str, tags: dict) -> Any:
        for box in await self.local.list(tags):
            yield self._wrap(box)

    def named(self, name: str) -> list[dict]:
        return [kwargs for called, _, kwargs in self.calls if called == name]


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None,
    reason="the calls are carried out on local sandboxes: root and bubblewrap",
)


async def test_the_pool_runs_through_the_adapter_with_modals_own_signatures(tmp_path) -> None:
    fake = FakeModal(tmp_path / "registry")
    name = f"test-{uuid.uuid4().hex[:8]}"
    backend = ModalBackend(modal_module=fake, runtime="gvisor")
    left = await fake.local.create(SandboxSpec(tags={TAG_KEY: name}))  # a killed run's
    pool = Fleet(backend, FleetConfig(name=name, sandboxes=1, slots=2, cpu=2.0, memory_mb=4096))
    await pool.start()
    try:
        reply = await pool.run(worker_request(Settings(), "print(6 * 7)", ""))
    finally:
        await pool.close()
    assert reply["stdout"] == "42\n"
    assert not left.alive()

    assert fake.named("App.lookup")[0] == {"create_if_missing": True}
    assert next(a for called, a, _ in fake.calls if called == "App.lookup") == (POOL_APP_NAME,)
    created = fake.named("Sandbox.create")
    assert created, "no sandbox was created"
    for kwargs in created:
        assert kwargs["block_network"] is True
        assert not {"secrets", "volumes", "network_file_systems", "env"} & set(kwargs)
        assert not {"encrypted_ports", "unencrypted_ports", "h2_ports", "gpu"} & set(kwargs)
        assert kwargs["tags"] == {TAG_KEY: name} and kwargs["runtime"] == "gvisor"
        assert (kwargs["cpu"], kwargs["memory"]) == ((2.0, 8.0), (4096, 4096))  # request, limit
        assert kwargs["timeout"] > kwargs["idle_timeout"] > 0
        assert kwargs["image"]["dockerfile"] == REPO / DOCKERFILE and (REPO / DOCKERFILE).is_file()
        assert kwargs["image"]["context_dir"] == REPO
    assert fake.named("Sandbox.list")[0] == {
        "app_id": f"ap-{POOL_APP_NAME}",
        "tags": {TAG_KEY: name},
    }
    execs = [args for called, args, _ in fake.calls if called == "sb.exec"]
    assert execs and all(args[:3] == ("python", "-m", "sandbox.stdio_worker") for args in execs)
    assert fake.named("sb.exec")[0] == {"text": False, "workdir": "/app"}
    # every sandbox made was ended: the ones listed at start, and the pool's own at close
    assert len(fake.named("sb.terminate")) >= len(created) + 1


def test_the_real_client_has_what_the_adapter_calls() -> None:
    """``.aio`` exists where the adapter awaits it; ``stdin.write`` is a plain call."""
    for fn in (modal.App.lookup, modal.Sandbox.create, modal.Sandbox.list, modal.Sandbox.exec,
               modal.Sandbox.terminate, StreamWriter.drain):  # fmt: skip
        assert hasattr(fn, "aio"), fn
    assert not hasattr(StreamWriter.write, "aio")
    params = inspect.signature(modal.Sandbox.create).parameters
    assert params["block_network"].default is False  # off unless the adapter turns it on
    assert "outbound_cidr_allowlist" in params  # cidr_allowlist is the deprecated name
