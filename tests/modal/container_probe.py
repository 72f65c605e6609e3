"""What a Modal container does with an app file, for one of its functions (modal 1.6.4), inside
the layout ``tests/modal/harness.py`` builds with bubblewrap: the entry file alone at
``/root/<stem>.py``, the mounted packages beside it, only the image's packages, the container's
environment, the volumes as directories at their mount paths.

    python -P /harness/container_probe.py /harness/spec.json

``-P``: the interpreter as Modal starts it (``python -m modal._container_entrypoint``: the
environment's ``PYTHONPATH`` applies), without this file's directory in front.

The order is the container entrypoint's (``_container_entrypoint.py``): the task's lifecycle
manager exists first (so ``modal.is_local()`` is already False while the module is imported,
``_runtime/execution_context.py``), then the module is imported by name with
``importlib.import_module`` (``_runtime/user_code_imports.py:509``), the function is looked up
on it and its raw body taken (``_raw_f_``); a clustered function's cluster context is set once
imported; each input runs with its function call id in the context. ``spec.json``:

- ``module``, ``function``: what the container runs (``function_def.module_name``, its tag);
- ``call_id``: the input's function call id; ``cluster``: rank and addresses, or null;
- ``web_urls``: deployed web URLs by ``app/function``; ``returns``: answers to ``.remote()``
  (see ``stand_ins.Recorder``);
- ``steps``: ``{"values": [names]}`` (module attributes; JSON, ``repr`` where JSON has none),
  ``{"call": name, "args", "kwargs"}`` (run that function's body once, or a plain function of
  the module; its return value or exit code is recorded), and
  ``{"serve": name, "port": N}`` (an ``asgi_app``: build the app the way Modal does at container
  start and serve it with uvicorn until the container is stopped);
- ``out``: where the record goes (written after every step).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def _write(out: Path, record: dict[str, Any]) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=repr))
    tmp.replace(out)


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    # `python -m` puts the working directory (the image's WORKDIR) first; the entry file is
    # imported from /root, where Modal mounts it, whatever the WORKDIR (an assumption: the
    # client's source does not say how the worker sets sys.path).
    sys.path[:0] = ["/root", str(Path.cwd())]
    sys.path.append(str(Path(__file__).parent))  # stand_ins, after the image's packages
    from modal._runtime import execution_context
    from modal._runtime.task_lifecycle_manager import _TaskLifecycleManager
    from stand_ins import Recorder

    _TaskLifecycleManager._singleton = object.__new__(_TaskLifecycleManager)
    recorder = Recorder(spec.get("returns"))
    recorder.install_calls()
    recorder.install_container_services(spec.get("web_urls", {}))
    record: dict[str, Any] = {"steps": [], "calls": recorder.calls}
    try:
        module = importlib.import_module(spec["module"])
    except BaseException as exc:
        traceback.print_exc()
        record["import_error"] = f"{type(exc).__name__}: {exc}"
        _write(out, record)
        return 1
    import modal

    record["is_local"] = modal.is_local()
    record["file"] = module.__file__
    if spec.get("cluster"):
        from modal import _cluster

        _cluster.current_cluster_context = _cluster.ClusterContext(
            cluster_id="cu-harness", fabric_ids=[], **spec["cluster"]
        )
    if spec.get("call_id"):
        execution_context._current_function_call_id.set(spec["call_id"])
    for step in spec["steps"]:
        result: dict[str, Any] = {"step": step}
        record["steps"].append(result)
        if "values" in step:
            result["values"] = {name: getattr(module, name) for name in step["values"]}
            _write(out, record)
            continue
        name = step.get("call") or step["serve"]
        body = raw_body(module, name)
        print(f"[harness] {name}: start", flush=True)
        try:
            value = body(*step.get("args", []), **step.get("kwargs", {}))
        except SystemExit as exc:
            code = exc.code
            result["exit"] = code if isinstance(code, int) else (0 if code is None else 1)
            if isinstance(code, str):
                print(code, file=sys.stderr)  # SystemExit("message"): Python prints it, exit 1
        except BaseException as exc:
            traceback.print_exc()
            result["error"] = f"{type(exc).__name__}: {exc}"
        else:
            result["exit"] = 0
            if "serve" in step:
                _write(out, record)
                serve(value, step["port"])
                return 0
            result["returned"] = value
        sys.stdout.flush()
        sys.stderr.flush()
        _write(out, record)
    _write(out, record)
    return 0


def raw_body(module: Any, name: str) -> Any:
    """A Modal function's raw body, as the container entrypoint takes it off the module (a plain
    function of the module, e.g. a helper a body calls, as it is)."""
    import modal
    from modal._utils.async_utils import synchronizer

    attribute = getattr(module, name)
    if isinstance(attribute, modal.Function):
        return synchronizer._translate_in(attribute)._raw_f_
    return attribute


def serve(app: Any, port: int) -> None:
    """An ASGI app as Modal serves it: its lifespan started once, then requests until stopped."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="info")
    uvicorn.Server(config).run()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
