"""The client side of ``modal run FILE::fn ARGS`` / ``modal deploy FILE``, as modal 1.6.4's own CLI
runs it, with only Modal's servers replaced. Runs in a venv that holds nothing but
``pip install modal==1.6.4`` (``tests/modal/harness.py`` makes it), with ``python -I`` and the
repository as the working directory, as the ``modal`` console script runs: so an app file that
needs more than modal and the standard library on the client fails here as it fails for a user.

    python -I client_probe.py SPEC.json

``SPEC`` is JSON:

- ``{"mode": "describe", "file": F, "out": PATH}``: import ``F`` the way the CLI does
  (``cli/import_refs.import_file_or_module``), then write to ``PATH`` what Modal would create
  from it: every function's resources, the environment its container gets from the function's
  own secrets (``Secret.from_dict`` / ``env=``: values Modal sends from here), its image (the
  Dockerfile, ``Image.env`` variables, and every file ``add_local_*`` and the entry-file mount
  put in the container, with the path they get there), and the local entry points.
- ``{"mode": "cli", "argv": [...], "returns": {...}, "out": PATH}``: run ``modal.__main__.main``
  with ``argv`` (e.g. ``["run", "recipe/x.py::train", "--", "a=1"]``). What would reach a
  server is recorded instead: the app's run or deploy, and every ``.remote()``, ``.spawn()`` and
  ``FunctionCall.get()`` with its arguments; ``returns[name]`` is what ``name.remote()`` returns
  (``returns["name.get"]`` what waiting on its spawned call does; ``{"raise": "message"}``
  raises ``RuntimeError(message)`` there, as a failed remote call surfaces). The record and the
  exit code go to ``PATH``.

Only the standard library and modal are imported here.
"""

from __future__ import annotations

import inspect
import json
import shlex
import sys
from pathlib import Path
from typing import Any


def _walk_image(image: Any) -> dict[str, Any]:
    """The image's build, base first: its Dockerfile, ``ENV`` lines, mounted files.

    modal 1.6.4 keeps no list of an image's layers before it is built: each layer is a lazy
    object whose loader closes over its inputs (``_image.py``: ``from_dockerfile``'s ``path``,
    ``_from_args``' ``dockerfile_function``, the mount layer's ``mount``), and ``_deps()`` names
    its base images and mounts. This walks those, as ``_load`` would."""
    from modal.mount import _select_files

    found: dict[str, Any] = {"dockerfile": None, "env": {}, "files": []}
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        kind = type(obj).__name__
        if kind == "_Mount":
            for local, remote in _select_files(list(obj.entries)):
                found["files"].append([str(local), str(remote)])
            return
        if kind != "_Image":
            return
        closure = inspect.getclosurevars(obj._load).nonlocals if obj._load else {}
        for dep in obj._deps() if obj._deps else []:  # base images first
            visit(dep)
        if "path" in closure and "dockerfile_image" in closure:  # Image.from_dockerfile
            found["dockerfile"] = str(Path(closure["path"]).resolve())
        make = closure.get("dockerfile_function")
        if make is not None and "base_images" in closure:
            for command in make("2025.06").commands:
                if command.startswith("ENV "):
                    key, _, value = command[4:].partition("=")
                    found["env"][key] = shlex.split(value)[0] if value else ""

    visit(image)
    return found


def describe(file: str) -> dict[str, Any]:
    import modal
    from modal.cli.import_refs import ImportRef, import_file_or_module
    from modal.mount import _select_files
    from modal.secret import _local_secret_env

    module = import_file_or_module(ImportRef(file, False, "", "deploy"), base_cmd="modal deploy")
    apps = [obj for obj in vars(module).values() if isinstance(obj, modal.App)]
    functions: dict[str, Any] = {}
    entrypoints: list[str] = []
    for app in apps:
        from modal._utils.async_utils import synchronizer

        state = synchronizer._translate_in(app)._local_state
        entrypoints += list(state.local_entrypoints)
        for name, fn in state.functions.items():
            info = fn._function_info
            source = fn._source_info
            spec = fn._spec
            image = _walk_image(spec.image) if spec.image is not None else {}
            for mount in source.get_entrypoint_mount().values():
                image.setdefault("files", []).extend(
                    [str(a), str(b)] for a, b in _select_files(list(mount.entries))
                )
            web = fn._webhook_config
            functions[name] = {
                "module": source.module_name,
                "source_type": source._type.name,
                "gpus": [list(g) for g in info.gpus],
                "cpu": info.cpu,
                "memory_mib": info.memory_mib,
                "timeout": info.timeout,
                "max_retries": info.max_retries,
                "cluster_size": info.cluster_info.size if info.cluster_info else None,
                "volumes": {p: v.name for p, v in info.volumes.items()},
                "read_only": {p: v.read_only for p, v in info.volumes.items()},
                "secrets": list(info.secrets),
                "secret_env": _local_secret_env(spec.secrets),
                "web": int(web.type) if web is not None else 0,
                "web_port": int(web.web_server_port) if web is not None else 0,
                "image": image,
            }
    return {
        "module": module.__name__,
        "package": module.__package__,
        "apps": [app.name for app in apps],
        "functions": functions,
        "entrypoints": entrypoints,
    }


def run_cli(argv: list[str], recorder: Any) -> int:
    from modal.__main__ import main

    recorder.install_calls()
    recorder.install_app_runs()
    sys.argv = ["modal", *argv]
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    if spec["mode"] == "describe":
        out.write_text(json.dumps(describe(spec["file"]), indent=1, default=str))
        return 0
    sys.path.append(str(Path(__file__).parent))  # stand_ins, after everything a user has
    from stand_ins import Recorder

    recorder = Recorder(spec.get("returns", {}))
    code = run_cli(spec["argv"], recorder)
    sys.stdout.flush()
    sys.stderr.flush()
    record = {"exit": code, "calls": recorder.calls}
    out.write_text(json.dumps(record, indent=1, default=str))
    return code


if __name__ == "__main__":
    raise SystemExit(_main())
