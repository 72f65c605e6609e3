"""What can be proven about the images without Docker (``make check-images``).

    python scripts/check_images.py            # the static checks, then the resolve (~1 min)
    python scripts/check_images.py --static   # the static checks only (no network)
    python scripts/check_images.py --write-lock   # regenerate images/trainer-constraints.txt

Static: every interpreter or binary a Dockerfile's RUN line calls (``/usr/bin/python3``, ``pip
--python X``, ``python3.12`` through ``PATH``), and every ``ENV`` naming one, is there when the line
runs: the base image's, an apt package's or a venv made before (:func:`call_problems`); every
file a Dockerfile COPYs is in the build context and not dockerignored; every exact
pin an image installs (Dockerfile text, the trainer's and the sandbox's pip sets) equals
constraints.txt's where constraints.txt names the package; the trainer image installs with
``-c images/trainer-constraints.txt`` (the lock), whose pins equal constraints.txt's except the
documented ``GPU_OVERRIDES``.
Resolve: the trainer's pip set (``images/trainer_requirements.py trainer``) and the sandbox
interpreter's resolve together for manylinux x86_64 / CPython 3.12, wheels only (pip's dry run:
metadata, no wheel bodies), whatever Python runs this; the resolved torch's CUDA major (from its
``nvidia-*-cuXX`` / ``cuda-toolkit`` requirements) equals the trainer base image's; vLLM and
transferqueue are in the set; resolved with the lock, every package of the set is pinned in it
(nothing indirect can drift). PyPI has only sdists of a few pure-Python packages
(``SDIST_ONLY``): they are built to wheels here first, as pip builds them in the image.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.images import dockerfiles  # noqa: E402  (the Dockerfile parser and COPY check)

PYTHON_VERSION = "3.12"  # Ubuntu 24.04's, the trainer image's interpreter
UBUNTU_GLIBC = {"22.04": 35, "24.04": 39}  # glibc 2.N of the base images' Ubuntu releases
SDIST_ONLY = ("antlr4-python3-runtime", "pylatexenc")  # versions from constraints.txt
REQUIRED = ("torch", "vllm", "verl", "transferqueue", "transformers")
_PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][\w.-]*(?:\[[^\]]*\])?)==([0-9][\w.+!-]*)")
_CUDA_REQ = re.compile(r"^(?:nvidia-[a-z0-9-]+-cu(\d+)\b|cuda-toolkit\S*\s*\(?==\s*(\d+)\.)")


def _load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reqs = _load(REPO / "images" / "trainer_requirements.py", "trainer_requirements")


# ---- static ------------------------------------------------------------------------------------


def dockerfile_pins(text: str) -> list[str]:
    """``name==version`` strings a Dockerfile spells out (RUN, ARG and ENV lines)."""
    instructions = dockerfiles.parse(text)
    return [
        f"{m[1]}=={m[2]}"
        for ins in instructions
        if ins.keyword in ("RUN", "ARG", "ENV")
        for m in _PIN.finditer(ins.args)
    ]


def pin_problems(sets: dict[str, Iterable[str]], constraints: dict[str, str]) -> list[str]:
    """Exact pins that differ from constraints.txt (packages it does not name are not compared)."""
    problems = []
    for label, requirements in sets.items():
        for requirement in requirements:
            match = _PIN.fullmatch(requirement.split(";")[0].strip())
            if not match:
                continue
            name, version = reqs.canonical(match[1]), match[2]
            if name in constraints and constraints[name] != version:
                problems.append(
                    f"{label}: {requirement} but constraints.txt has {name}=={constraints[name]}"
                )
    return problems


def image_pip_sets(root: Path) -> dict[str, list[str]]:
    """Every pip set the images install, by where it comes from."""
    sets = {
        f"images/{f.name}": dockerfile_pins(f.read_text())
        for f in sorted((root / "images").glob("*Dockerfile"))
    }
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    sets["pyproject.toml [sandbox] (images/sandbox.Dockerfile)"] = extras["optional-dependencies"][
        "sandbox"
    ]
    sets["trainer_requirements.py trainer"] = reqs.trainer(root)
    sets["trainer_requirements.py sandbox"] = reqs.sandbox(root)
    return sets


def read_pins(path: Path) -> dict[str, str]:
    """A ``name==version`` file as {canonical name: version} (comments and blanks skipped)."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {reqs.canonical(n): v.strip() for n, _, v in (x.partition("==") for x in lines if x)}


def gpu_constraints(root: Path) -> dict[str, str]:
    """constraints.txt without the packages the GPU image must pin otherwise."""
    return {n: v for n, v in reqs.constraints(root).items() if n not in reqs.GPU_OVERRIDES}


def lock_problems(root: Path) -> list[str]:
    """The trainer image installs with the lock, and the lock agrees with constraints.txt."""
    lock = root / reqs.LOCK_FILE
    if not lock.is_file():
        return [f"no {reqs.LOCK_FILE}: run scripts/check_images.py --write-lock"]
    dockerfile = (root / "images" / "trainer.Dockerfile").read_text()
    problems = []
    if f"-c /tmp/deps/{reqs.LOCK_FILE}" not in dockerfile:
        problems.append(
            f"images/trainer.Dockerfile: the pip install does not use -c {reqs.LOCK_FILE}"
        )
    pins = [f"{name}=={version}" for name, version in read_pins(lock).items()]
    problems += pin_problems({reqs.LOCK_FILE: pins}, gpu_constraints(root))
    return problems


def static_problems(root: Path) -> list[str]:
    problems = []
    for dockerfile in sorted((root / "images").glob("*Dockerfile")):
        problems += dockerfiles.copy_source_problems(dockerfile, root)
        problems += call_problems(dockerfile.read_text(), f"images/{dockerfile.name}")
    return (
        problems + pin_problems(image_pip_sets(root), reqs.constraints(root)) + lock_problems(root)
    )


def unpinned(report: dict[str, Any], lock: dict[str, str]) -> list[str]:
    """Packages a resolve installs that the lock does not pin at that version."""
    return [
        f"{name} {meta['version']} is not pinned in {reqs.LOCK_FILE} ({lock.get(name, 'absent')})"
        for name, meta in installs(report).items()
        if lock.get(name) != meta["version"]
    ]


def platforms(glibc_minor: int) -> list[str]:
    """The wheel platform tags a glibc 2.N x86_64 system accepts (pip does not widen --platform)."""
    legacy = ("manylinux2014", "manylinux2010", "manylinux1")
    return [f"manylinux_2_{m}_x86_64" for m in range(glibc_minor, 16, -1)] + [
        f"{tag}_x86_64" for tag in legacy
    ]


def base_image(text: str) -> tuple[int, int]:
    """(CUDA major, glibc minor) of a Dockerfile's first base image,
    ``nvidia/cuda:<major>.…-ubuntu<release>``, with the ARG defaults before FROM substituted."""
    defaults: dict[str, str] = {}
    for ins in dockerfiles.parse(text):
        if ins.keyword == "ARG" and "=" in ins.args:
            name, value = ins.args.split("=", 1)
            defaults[name.strip()] = value.strip()
        elif ins.keyword == "FROM":
            image = re.sub(
                r"\$\{?(\w+)\}?", lambda m: defaults.get(m[1], m[0]), ins.args.split()[0]
            )
            match = re.match(r"(?:docker\.io/)?nvidia/cuda:(\d+)\.\S*-ubuntu([\d.]+)$", image)
            if not match or match[2] not in UBUNTU_GLIBC:
                raise ValueError(
                    f"base image {image!r} is not nvidia/cuda:<version>-…-ubuntu<release>"
                )
            return int(match[1]), UBUNTU_GLIBC[match[2]]
    raise ValueError("no FROM")


# ---- what a RUN line calls ----------------------------------------------------------------------
#
# What puts interpreters and binaries at fixed paths, without Docker: the base images' own (by
# FROM prefix; Docker Hub's python images keep theirs in /usr/local/bin, NVIDIA's CUDA images have
# no Python), and each apt package's, from Debian's and Ubuntu's packaging: `pythonX.Y(-minimal)`
# ships /usr/bin/pythonX.Y and only `python3-minimal` (pulled by `python3`) the /usr/bin/python3
# link (`dpkg -S /usr/bin/python3` on Debian 12: python3-minimal). A package not listed here
# provides nothing known, so a path only it would give is reported: add it here.
BASE_PROVIDES: dict[str, tuple[str, ...]] = {
    "nvidia/cuda:": (),
    "python:": ("/usr/local/bin/python", "/usr/local/bin/python3", "/usr/local/bin/pip",
                "/usr/local/bin/pip3"),
}  # fmt: skip
APT_PROVIDES: dict[str, tuple[str, ...]] = {
    "python3": ("/usr/bin/python3",),
    "python3-minimal": ("/usr/bin/python3",),
    "python3-pip": ("/usr/bin/pip3", "/usr/bin/pip"),
    "python3-venv": (),
    "bubblewrap": ("/usr/bin/bwrap",),
    "git": ("/usr/bin/git",),
    "build-essential": ("/usr/bin/gcc", "/usr/bin/g++", "/usr/bin/make"),
    "curl": ("/usr/bin/curl",),
}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_VERSIONED_PYTHON = re.compile(r"^python(\d+\.\d+)(-minimal|-dev|-venv)?$")
_CHECKED_NAME = re.compile(r"^(python|pip)[\d.]*$")  # bare names resolved through PATH


def apt_provides(package: str) -> tuple[str, ...]:
    """Paths an apt package puts there (``pythonX.Y``, ``-minimal``, ``-dev`` and ``-venv``
    pull ``pythonX.Y``, which ships ``/usr/bin/pythonX.Y``)."""
    name = package.split("=")[0]
    match = _VERSIONED_PYTHON.match(name)
    if match:
        return (f"/usr/bin/python{match[1]}",)
    return APT_PROVIDES.get(name, ())


def _commands(script: str) -> list[list[str]]:
    """A RUN line's simple commands, split at ``&&``, ``||``, ``;`` and ``|`` (quotes kept)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def call_problems(text: str, label: str) -> list[str]:
    """Interpreters and binaries a RUN line calls (the command, a ``--python`` argument) that
    nothing has installed by then, and ``ENV`` values naming one that the finished image lacks.
    A bare ``python*``/``pip*`` is looked up on the ``PATH`` the line runs with."""
    instructions = dockerfiles.parse(text)
    provided: set[str] = set()
    env_paths: list[tuple[int, str, str]] = []
    path = DEFAULT_PATH
    problems: list[str] = []

    def missing(called: str) -> bool:
        if called.startswith("/"):
            return called not in provided
        return not any(f"{d}/{called}" in provided for d in path.split(":"))

    for ins in instructions:
        if ins.keyword == "FROM":
            base = ins.args.split()[0]
            provided = set(next((v for k, v in BASE_PROVIDES.items() if base.startswith(k)), ()))
            if base.startswith("python:"):  # python:3.11-slim also has python3.11, pip3.11
                version = base.split(":")[1].split("-")[0]
                provided |= {f"/usr/local/bin/python{version}", f"/usr/local/bin/pip{version}"}
        elif ins.keyword == "ENV":
            words = shlex.split(ins.args)
            pairs = [w.split("=", 1) for w in words] if "=" in words[0] else [words[:2]]
            for name, value in pairs:
                if name == "PATH":
                    path = value.replace("$PATH", path).replace("${PATH}", path)
                elif re.fullmatch(r"/\S+/bin/[\w.+-]+", value):
                    env_paths.append((ins.line, name, value))
        elif ins.keyword == "RUN":
            for words in _commands(ins.args):
                while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
                    words = words[1:]  # VAR=value command
                if not words:
                    continue
                called = [words[0]] if words[0].startswith("/") or _CHECKED_NAME.match(
                    words[0]) else []  # fmt: skip
                called += [b for a, b in itertools.pairwise(words) if a == "--python"]
                for program in called:
                    if missing(program):
                        here = Path(program)
                        near = sorted(p for p in provided if Path(p).parent == here.parent
                                      and Path(p).name.startswith(here.name))  # fmt: skip
                        problems.append(
                            f"{label} line {ins.line}: RUN calls {program}, which neither the "
                            "base image nor an installed package provides"
                            + (f" (there is {', '.join(near)})" if near else "")
                        )
                if words[0] in ("apt-get", "apt") and "install" in words:
                    for package in words[words.index("install") + 1 :]:
                        if not package.startswith("-"):
                            provided |= set(apt_provides(package))
                if "venv" in words and words[words.index("venv") - 1] == "-m":
                    target = next(w for w in words[words.index("venv") + 1 :]
                                  if not w.startswith("-"))  # fmt: skip
                    python = Path(words[0]).name
                    names = {"python", "python3", "pip", "pip3", python}
                    provided |= {f"{target}/bin/{name}" for name in names}
    problems += [
        f"{label} line {line}: ENV {name}={value}, which the image does not have"
        for line, name, value in env_paths
        if value not in provided
    ]
    return problems


# ---- resolve -----------------------------------------------------------------------------------


def installs(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """pip's installation report as {canonical name: metadata}."""
    return {reqs.canonical(i["metadata"]["name"]): i["metadata"] for i in report["install"]}


def cuda_majors(metadata: dict[str, Any]) -> set[int]:
    """CUDA majors a wheel's requirements name (``nvidia-nccl-cu13``, ``cuda-toolkit==13.0.2``)."""
    found = set()
    for requirement in metadata.get("requires_dist", []):
        match = _CUDA_REQ.match(requirement)
        if match:
            found.add(int(match[1] or match[2]))
    return found


def resolve_problems(trainer: dict[str, Any], base_major: int) -> list[str]:
    problems = [f"trainer set: no {name}" for name in REQUIRED if name not in installs(trainer)]
    torch = installs(trainer).get("torch")
    if torch is not None:
        majors = cuda_majors(torch)
        if majors != {base_major}:
            problems.append(
                f"torch {torch['version']} is built for CUDA {sorted(majors) or 'none'}, "
                f"the trainer base image has CUDA {base_major}"
            )
    return problems


def sdist_wheels(root: Path, cache: Path) -> Path:
    """Wheels of the sdist-only packages at constraints.txt's versions (pure Python, built once)."""
    wheels = cache / "wheels"
    pins = reqs.constraints(root)
    wanted = [f"{name}=={pins[reqs.canonical(name)]}" for name in SDIST_ONLY]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    cache_args = ["--cache-dir", str(cache / "pip")]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(wheels), *cache_args, *wanted], check=True
    )
    return wheels


def resolve(requirements: list[str], glibc_minor: int, wheels: Path, cache: Path) -> dict[str, Any]:
    """pip's dry-run installation report of ``requirements`` for the image's platform."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as listing:
        listing.write("\n".join(requirements) + "\n")
        listing.flush()
        tags = [arg for tag in platforms(glibc_minor) for arg in ("--platform", tag)]
        command = [
            *(sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install"),
            *("--dry-run", "--ignore-installed", "--report", "-", "--only-binary=:all:"),
            *(*tags, "--python-version", PYTHON_VERSION, "--implementation", "cp"),
            *("--find-links", str(wheels), "--cache-dir", str(cache / "pip"), "-r", listing.name),
        ]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        raise RuntimeError("\n".join(errors) or proc.stderr[-2000:])
    return json.loads(proc.stdout)


def write_lock(root: Path, cache: Path) -> int:
    """Resolve the trainer set with constraints.txt (less ``GPU_OVERRIDES``), write the lock."""
    _, glibc = base_image((root / "images" / "trainer.Dockerfile").read_text())
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as pins:
        pins.write("".join(f"{n}=={v}\n" for n, v in gpu_constraints(root).items()))
        pins.flush()
        report = resolve([*reqs.trainer(root), f"-c {pins.name}"], glibc, sdist_wheels(root, cache),
                         cache)  # fmt: skip
    lock = root / reqs.LOCK_FILE
    old = lock.read_text().splitlines() if lock.exists() else []
    header = "".join(f"{line}\n" for line in itertools.takewhile(lambda x: x.startswith("#"), old))
    found = sorted((name, meta["version"]) for name, meta in installs(report).items())
    body = "".join(f"{name}=={version}\n" for name, version in found)
    lock.write_text(header + body)
    print(f"{reqs.LOCK_FILE}: {len(found)} packages")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--static", action="store_true", help="skip the resolve (no network)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "check-images")
    parser.add_argument("--write-lock", action="store_true", help=f"regenerate {reqs.LOCK_FILE}")
    args = parser.parse_args(argv)
    if args.write_lock:
        return write_lock(REPO, args.cache)
    problems = static_problems(REPO)
    base_major, glibc = base_image((REPO / "images" / "trainer.Dockerfile").read_text())
    print(f"static: {len(problems)} problem(s); trainer base: CUDA {base_major}, glibc 2.{glibc}")
    if not args.static and not problems:
        wheels = sdist_wheels(REPO, args.cache)
        for name in ("trainer", "sandbox"):
            lock = [f"-c {REPO / reqs.LOCK_FILE}"] if name == "trainer" else []
            try:
                report = resolve([*reqs.SETS[name](REPO), *lock], glibc, wheels, args.cache)
            except RuntimeError as exc:
                problems.append(f"{name} set does not resolve for linux/cp{PYTHON_VERSION}: {exc}")
                continue
            found = installs(report)
            shown = {n: found[n]["version"] for n in (*REQUIRED, "numpy", "sympy") if n in found}
            print(f"{name}: {len(found)} packages resolve; {json.dumps(shown)}")
            if name == "trainer":
                torch = found.get("torch", {})
                print(f"trainer: torch's CUDA {sorted(cuda_majors(torch))}")
                problems += resolve_problems(report, base_major)
                problems += unpinned(report, read_pins(REPO / reqs.LOCK_FILE))
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
