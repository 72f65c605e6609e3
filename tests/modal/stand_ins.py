"""Modal's servers, replaced by recorders: what the client probe and the container probe share.

Only these calls reach Modal's servers from the code under test: running or deploying an app,
``Function.remote``/``spawn``, ``FunctionCall.from_id``/``get``, ``Function.from_name`` (a
deployed web URL) and ``Volume.reload``/``commit``. Everything else, argument parsing, imports,
function bodies, runs as it would. Only the standard library and modal are imported here: this
runs in the client venv (``pip install modal`` alone) and in the emulated containers.
"""

from __future__ import annotations

import contextlib
from typing import Any


def translate_in(obj: Any) -> Any:
    """The implementation object behind one of modal's synchronized wrappers."""
    from modal._utils.async_utils import synchronizer

    return synchronizer._translate_in(obj)


class Recorder:
    """What the server would have been asked, in order, and the scripted answers.

    ``returns[name]`` is what ``name.remote()`` returns, ``returns["name.get"]`` what waiting on
    a spawned call of ``name`` does; ``{"raise": "message"}`` raises ``RuntimeError(message)``
    there, as a failed remote call surfaces in the caller."""

    def __init__(self, returns: dict[str, Any] | None = None) -> None:
        self.returns = returns or {}
        self.calls: list[dict[str, Any]] = []
        self.spawned: dict[str, Any] = {}

    def answer(self, key: str) -> Any:
        value = self.returns.get(key)
        if isinstance(value, dict) and set(value) == {"raise"}:
            raise RuntimeError(value["raise"])
        return value

    def install_calls(self) -> None:
        """``Function.remote``/``spawn`` and ``FunctionCall.from_id`` record, then answer."""
        import modal

        recorder = self

        class Call:
            def __init__(self, tag: str, number: int) -> None:
                self.tag, self.object_id = tag, f"fc-harness{number:02d}"

            def get(self, timeout: float | None = None) -> Any:
                recorder.calls.append({"function": self.tag, "how": "get", "id": self.object_id})
                return recorder.answer(f"{self.tag}.get")

        def record(how: str, fn: Any, args: tuple, kwargs: dict) -> str:
            tag = translate_in(fn)._tag
            self.calls.append({"function": tag, "how": how, "args": list(args), "kwargs": kwargs})
            return tag

        def remote(fn: Any, *args: Any, **kwargs: Any) -> Any:
            return self.answer(record("remote", fn, args, kwargs))

        def spawn(fn: Any, *args: Any, **kwargs: Any) -> Call:
            call = Call(record("spawn", fn, args, kwargs), len(self.spawned) + 1)
            self.spawned[call.object_id] = call
            return call

        def from_id(call_id: str, client: Any = None) -> Call:
            self.calls.append({"function": "FunctionCall", "how": "from_id", "id": call_id})
            return self.spawned[call_id]

        modal.Function.remote = remote
        modal.Function.spawn = spawn
        modal.FunctionCall.from_id = staticmethod(from_id)

    def install_app_runs(self) -> None:
        """``modal run`` / ``modal deploy`` record the app instead of creating it on a server."""
        import modal.cli.run as cli_run

        @contextlib.contextmanager
        def run_app(app: Any, **kwargs: Any):
            self.calls.append({"function": app.name, "how": "run_app", "kwargs": kwargs})
            translate_in(app)._app_id = "ap-harness"
            yield app

        def deploy_app(app: Any, name: str = "", **kwargs: Any) -> Any:
            self.calls.append({"function": name, "how": "deploy_app"})
            return type("Deployed", (), {"app_id": "ap-harness", "app_logs_url": ""})()

        cli_run.run_app = run_app
        cli_run.deploy_app = deploy_app

    def install_container_services(self, web_urls: dict[str, str]) -> None:
        """In a container: deployed apps' web URLs by ``app/function`` name (an app missing there
        is not deployed: ``NotFoundError``, as the server answers), and volumes whose reload and
        commit are recorded (the volume is the local directory at its mount path)."""
        import modal
        from modal.exception import NotFoundError

        recorder = self

        class Deployed:
            def __init__(self, app_name: str, name: str) -> None:
                self.key = f"{app_name}/{name}"

            def get_web_url(self) -> str:
                recorder.calls.append({"function": self.key, "how": "get_web_url"})
                if self.key not in web_urls:
                    raise NotFoundError(f"App '{self.key.split('/')[0]}' not found")
                return web_urls[self.key]

        def from_name(app_name: str, name: str, **kwargs: Any) -> Deployed:
            return Deployed(app_name, name)

        def volume_op(how: str):
            def op(volume: Any, *args: Any, **kwargs: Any) -> None:
                self.calls.append({"function": translate_in(volume)._name, "how": how})

            return op

        modal.Function.from_name = staticmethod(from_name)
        modal.Volume.reload = volume_op("reload")
        modal.Volume.commit = volume_op("commit")
