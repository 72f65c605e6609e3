"""Static checks of the Dockerfiles, compose.yaml and the Modal app files (no Docker engine needed).

Each ``*_problems`` function returns a list of human-readable problems, empty when all is well, so
a test can assert both that the real files are clean and that a broken file is reported.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
import shlex
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

# Variables a RUN may use without declaring them: set by every base image or by Docker itself.
ALWAYS_SET = {"PATH", "HOME", "HOSTNAME", "PWD"} | {
    name
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
    for name in (proxy, proxy.lower())
}
# Instructions whose arguments Docker expands at build time (RUN: the shell does, also at build).
EXPANDED = {"ADD", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "STOPSIGNAL", "USER", "VOLUME"}
EXPANDED |= {"WORKDIR", "ARG", "RUN"}
_VAR = re.compile(r"(?<!\\)\$(?:\{([A-Za-z_]\w*)|([A-Za-z_]\w*))")
_SHELL_ASSIGN = re.compile(r"(?:^|[\s;&|(])([A-Za-z_]\w*)=|\bfor\s+([A-Za-z_]\w*)\s+in\b")


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line where the instruction starts
    keyword: str  # upper case
    args: str  # continuation lines joined, comment lines dropped


def parse(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile (backslash continuations joined, comments skipped)."""
    out: list[Instruction] = []
    start, parts = 0, []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines even inside a continued instruction
        if not parts:
            start = number
        continued = line.endswith("\\")
        parts.append(line[:-1].strip() if continued else line)
        if not continued:
            keyword, _, args = " ".join(parts).partition(" ")
            out.append(Instruction(start, keyword.upper(), args.strip()))
            parts = []
    return out


def _words(args: str) -> list[str]:
    if args.startswith("["):
        return [str(w) for w in json.loads(args)]
    return shlex.split(args)


def copy_sources(ins: Instruction) -> list[str]:
    """Sources a COPY/ADD takes from the build context ([] for ``--from=`` and URLs)."""
    words = _words(ins.args)
    flags = [w for w in words if w.startswith("--")]
    if any(f.startswith("--from=") for f in flags):
        return []
    paths = [w for w in words if not w.startswith("--")][:-1]
    return [p for p in paths if not re.match(r"^(https?://|git@)", p)]


def _names(keyword: str, args: str) -> set[str]:
    """Names an ARG or ENV instruction declares."""
    if keyword == "ENV" and "=" not in args.split(maxsplit=1)[0]:
        return {args.split(maxsplit=1)[0]}  # legacy ``ENV NAME value``
    return {word.split("=", 1)[0] for word in shlex.split(args)}


def declared_args(instructions: Iterable[Instruction]) -> set[str]:
    """Every ARG name in the file, before or after FROM (what a ``--build-arg`` may set)."""
    return {n for ins in instructions if ins.keyword == "ARG" for n in _names("ARG", ins.args)}


def undeclared_variable_problems(instructions: list[Instruction]) -> list[str]:
    """Variables used at build time that no earlier ARG/ENV in scope declares.

    An ARG before the first FROM is visible only to FROM lines; each stage starts empty.
    """
    problems = []
    global_args: set[str] = set()
    scope: set[str] | None = None  # None: before the first FROM
    for ins in instructions:
        if ins.keyword not in EXPANDED:
            continue
        text = ins.args
        local: set[str] = set()
        if ins.keyword == "RUN":
            text = re.sub(r"'[^']*'", "''", text)  # the shell expands nothing in single quotes
            local = {a or b for a, b in _SHELL_ASSIGN.findall(text)}
        visible = global_args if ins.keyword == "FROM" or scope is None else scope
        for a, b in _VAR.findall(text):
            name = a or b
            if name not in visible | local | ALWAYS_SET:
                problems.append(f"line {ins.line}: {ins.keyword} uses ${name}, not declared")
        if ins.keyword == "FROM":
            scope = set()
        elif ins.keyword in ("ARG", "ENV"):
            (global_args if scope is None else scope).update(_names(ins.keyword, ins.args))
    return problems


def _tracked(context: Path) -> set[Path] | None:
    """Files git tracks under ``context`` (relative to it), or None outside a repository."""
    proc = subprocess.run(
        ["git", "-C", str(context), "ls-files", "-z", "--full-name", "."],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    top = subprocess.run(
        ["git", "-C", str(context), "rev-parse", "--show-toplevel"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    root = Path(top)
    return {(root / p).relative_to(context.resolve()) for p in proc.stdout.split("\0") if p}


def dockerignore_for(dockerfile: Path, context: Path) -> Path | None:
    """The ignore file BuildKit and Modal use: ``<Dockerfile>.dockerignore``, else the context's."""
    for candidate in (
        dockerfile.with_name(dockerfile.name + ".dockerignore"),
        context / ".dockerignore",
    ):
        if candidate.is_file():
            return candidate
    return None


def copy_source_problems(dockerfile: Path, context: Path) -> list[str]:
    """COPY/ADD sources that are missing from the context or that .dockerignore drops.

    For a copied directory every file in it counts (only git-tracked ones inside a repository:
    caches like __pycache__ are meant to be ignored).
    """
    import modal  # its .dockerignore matcher: the one Modal's image builds apply

    ignore_file = dockerignore_for(dockerfile, context)
    ignored: Callable[[Path], bool] = (
        modal.FilePatternMatcher(*ignore_file.read_text().splitlines())
        if ignore_file
        else (lambda _path: False)
    )
    tracked = _tracked(context)
    problems = []
    for ins in parse(dockerfile.read_text()):
        if ins.keyword not in ("COPY", "ADD"):
            continue
        for source in copy_sources(ins):
            rel = source.lstrip("/") or "."
            matches = sorted(context.glob(rel)) if any(c in rel for c in "*?[") else []
            if not matches and (context / rel).exists():
                matches = [context / rel]
            if not matches:
                problems.append(f"{dockerfile.name} line {ins.line}: {source!r} not in {context}")
                continue
            for match in matches:
                files = [match] if match.is_file() else [p for p in match.rglob("*") if p.is_file()]
                for file in files:
                    path = file.relative_to(context)
                    if (tracked is None or path in tracked) and ignored(path):
                        problems.append(
                            f"{dockerfile.name} line {ins.line}: {path} is excluded by "
                            f"{ignore_file.name if ignore_file else ''}"
                        )
    return problems


# ---- compose ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    service: str
    context: Path
    dockerfile: Path
    args: tuple[str, ...]


def compose_builds(compose_file: Path) -> list[Build]:
    """The ``build:`` of every service, with paths resolved as compose resolves them."""
    spec = yaml.safe_load(compose_file.read_text())
    builds = []
    for name, service in spec.get("services", {}).items():
        build = service.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (compose_file.parent / build.get("context", ".")).resolve()
        dockerfile = (context / build.get("dockerfile", "Dockerfile")).resolve()
        args = build.get("args") or {}
        names = args.keys() if isinstance(args, dict) else (a.split("=", 1)[0] for a in args)
        builds.append(Build(name, context, dockerfile, tuple(names)))
    return builds


def build_problems(builds: Iterable[Build]) -> list[str]:
    """Missing Dockerfiles, and build args the Dockerfile does not declare (silently unused)."""
    problems = []
    for b in builds:
        if not b.dockerfile.is_file():
            problems.append(f"service {b.service}: no Dockerfile at {b.dockerfile}")
            continue
        declared = declared_args(parse(b.dockerfile.read_text()))
        for arg in b.args:
            if arg not in declared:
                problems.append(f"service {b.service}: build arg {arg} is no ARG of {b.dockerfile}")
    return problems


def mount_targets(service: dict[str, Any]) -> set[PurePosixPath]:
    """Container paths of a service's volumes (short ``src:dst[:mode]`` or long syntax)."""
    targets = set()
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            targets.add(PurePosixPath(volume["target"]))
        else:
            parts = volume.split(":")
            targets.add(PurePosixPath(parts[1] if len(parts) > 1 else parts[0]))
    return targets


# ---- Modal app files ----------------------------------------------------------------------------


class _Unresolvable(ValueError):
    pass


def _evaluate(node: ast.expr, names: dict[str, Any], module: Path) -> Any:
    """The value of the few path expressions the app files use (``REPO / "images" / ...``)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id == "__file__":
            return str(module)
        if node.id in names:
            return names[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return _evaluate(node.left, names, module) / _evaluate(node.right, names, module)
    if isinstance(node, ast.Attribute) and node.attr in ("parent", "parents"):
        return getattr(_evaluate(node.value, names, module), node.attr)
    if isinstance(node, ast.Subscript):
        return _evaluate(node.value, names, module)[_evaluate(node.slice, names, module)]
    if isinstance(node, ast.Call) and not node.keywords:
        func = node.func
        if isinstance(func, ast.Name) and func.id == "Path" and len(node.args) == 1:
            return Path(_evaluate(node.args[0], names, module))
        if isinstance(func, ast.Attribute) and func.attr == "resolve" and not node.args:
            return _evaluate(func.value, names, module).resolve()
    raise _Unresolvable(ast.unparse(node))


def modal_dockerfiles(module: Path) -> list[tuple[Path, Path | None]]:
    """(Dockerfile, context_dir) of every ``from_dockerfile(...)`` call in a Modal app file.

    Raises ValueError when a path is not a simple expression of module-level constants.
    """
    tree = ast.parse(module.read_text())
    names: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign | ast.AnnAssign) and stmt.value is not None:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if len(targets) == 1 and isinstance(targets[0], ast.Name):
                with contextlib.suppress(_Unresolvable, TypeError, IndexError):
                    names[targets[0].id] = _evaluate(stmt.value, names, module)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr != "from_dockerfile":
            continue
        kwargs = {k.arg: k.value for k in node.keywords}
        path_node = node.args[0] if node.args else kwargs.get("path")
        if path_node is None:
            raise ValueError(f"{module}: from_dockerfile without a path")
        context_node = kwargs.get("context_dir")
        try:
            path = Path(_evaluate(path_node, names, module)).resolve()
            context = (
                Path(_evaluate(context_node, names, module)).resolve() if context_node else None
            )
        except _Unresolvable as exc:
            raise ValueError(f"{module}:{node.lineno}: cannot resolve {exc} statically") from exc
        found.append((path, context))
    return found
