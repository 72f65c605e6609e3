"""The Modal apps run the way Modal runs them, on this machine (``make check-modal``).

The unit tests import the app files as ``recipe.retool.*`` in the developers' venv. Modal does
neither (``/work/shared/FACTS.md``, "How Modal 1.6.4 loads an app file"):

- **the client** (``modal run FILE::fn`` / ``modal deploy FILE``) imports the file as a
  top-level module named after its stem, with the file's directory and the working directory on
  ``sys.path`` and whatever the user installed: the README's ``pip install modal``. Here: a venv
  holding only ``modal==1.6.4`` (:func:`client_venv`, cached by version), modal's own CLI code
  (``client_probe.py``), the repository copied with a fixture ``.env`` (:class:`Checkout`).
- **a container** mounts the entry file alone at ``/root/<stem>.py`` and the
  ``add_local_*`` files at their remote paths, has only the image's packages, the image's and
  the function's environment, ``modal.is_local()`` false, and the volumes at their mount paths.
  Here (:class:`Container`): bubblewrap builds that file system from the client's own list of
  what it would upload (real path depth: ``/root/x.py`` has only ``/root`` and ``/`` above
  it), the image's interpreter is a venv laid where the image has its Python (the sandbox
  image: exactly its pip set at ``/usr/local``, as ``python:3.11-slim`` has it; the trainer
  image: the project venv at ``/opt/venv``, CPU torch instead of CUDA's), and
  ``container_probe.py`` imports the module and runs function bodies as the container
  entrypoint does.

Modal's servers are replaced by recorders (``stand_ins.py``); nothing else is. What this cannot
show: image builds, GPUs, gVisor, Modal's scheduler, retries and web routing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from tests.images import dockerfiles

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MODAL_VERSION = "1.6.4"  # pyproject pins this; the harness reads modal 1.6.4's internals
CACHE = Path(
    os.environ.get("RETOOL_MODAL_HARNESS_CACHE")
    or Path(tempfile.gettempdir()) / "retool-modal-harness"
)
PROJECT_VENV = Path(sys.prefix)  # the venv running the tests: the trainer image's stand-in
# A fixture .env: what a user fills in from .env.example, with made-up values.
DOTENV = {
    "HF_TOKEN": "",
    "WANDB_API_KEY": "",
    "WANDB_ENTITY": "harness-team",
    "WANDB_MODE": "offline",
    "SANDBOX_API_TOKEN": "harness-sandbox-token",
}
# Environment each base image sets (Docker Hub's python image; NVIDIA's CUDA images).
BASE_IMAGE_ENV = {
    "python:": {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG": "C.UTF-8"},
    "nvidia/cuda:": {"PATH": "/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:"
                             "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
}  # fmt: skip
# What Modal sets in every container (a subset: what code may read).
MODAL_ENV = {"HOME": "/root", "MODAL_TASK_ID": "ta-harness", "MODAL_ENVIRONMENT": "main"}
# Host top-level directories a container never sees (its own /root, /tmp, ... are made fresh).
PRIVATE_TOPS = {"root", "home", "tmp", "proc", "dev", "sys", "run", "mnt", "media", "srv",
                "lost+found", "data", "models", "checkpoints", "harness"}  # fmt: skip


# ---- venvs --------------------------------------------------------------------------------------


def base_python() -> Path:
    """The interpreter the test venv was made from (venvs below are made from it too)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return Path(sys.base_prefix) / "bin" / version


def venv(label: str, requirements: list[str]) -> Path:
    """A venv with exactly ``requirements`` installed (and their dependencies), made once per
    interpreter and list under :data:`CACHE` (``RETOOL_MODAL_HARNESS_CACHE``); concurrent test
    processes wait for one another."""
    key = hashlib.sha256(f"{sys.version}\n{sorted(requirements)}".encode()).hexdigest()[:12]
    path = CACHE / f"{label}-{key}"
    if (path / ".complete").exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{label}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / ".complete").exists():
            return path
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run([str(base_python()), "-m", "venv", "--without-pip", str(path)], check=True)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        proc = subprocess.run(
            [*pip, "--python", str(path / "bin" / "python"), "install", *requirements],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if "WARNING" not in line]
            raise RuntimeError(f"pip install {' '.join(requirements)}: " + "\n".join(errors[-20:]))
        (path / ".complete").write_text("\n".join(requirements) + "\n")
    return path


def client_venv() -> Path:
    """What the README's and the seed's ``pip install modal`` gives a user (pinned version)."""
    return venv("client", [f"modal=={MODAL_VERSION}"])


def sandbox_extra() -> list[str]:
    """``images/sandbox.Dockerfile``'s pip set: pyproject's ``sandbox`` extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"]["sandbox"])


def sandbox_image_venv() -> Path:
    """The sandbox image's Python packages: its pip set, and modal (which Modal mounts into every
    container at ``/pkg``)."""
    return venv("sandbox-image", [*sandbox_extra(), f"modal=={MODAL_VERSION}"])


# ---- the client ---------------------------------------------------------------------------------


@dataclass
class Checkout:
    """A copy of the repository (tracked and untracked, not ignored, files) with a fixture
    ``.env``: the client runs in it, so no developer's own ``.env`` is ever read."""

    root: Path
    dotenv: dict[str, str] = field(default_factory=lambda: dict(DOTENV))

    @classmethod
    def make(cls, dest: Path, dotenv: Mapping[str, str] | None = None) -> Checkout:
        listed = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\0")
        for rel in filter(None, listed):
            source = REPO / rel
            if source.is_file() or source.is_symlink():
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target, follow_symlinks=False)
        checkout = cls(dest, dict(DOTENV if dotenv is None else dotenv))
        body = "".join(f"{key}={value}\n" for key, value in checkout.dotenv.items())
        (dest / ".env").write_text(body)
        return checkout


@dataclass
class ClientRun:
    exit: int
    stdout: str
    stderr: str
    record: dict[str, Any]

    def calls(self, how: str | None = None) -> list[dict[str, Any]]:
        return [c for c in self.record.get("calls", []) if how is None or c["how"] == how]


def client_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A user's shell, reduced: no PYTHONPATH, no Modal token or config (a fresh HOME)."""
    home = CACHE / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}
    return env | dict(extra or {})


def run_client(checkout: Checkout, spec: dict[str, Any], env: Mapping[str, str] | None,
               timeout: float = 120) -> ClientRun:  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec | {"out": str(out)}))
        proc = subprocess.run(
            [str(client_venv() / "bin" / "python"), "-I", str(HERE / "client_probe.py"),
             str(spec_file)],
            cwd=checkout.root, env=client_env(env), capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        record = json.loads(out.read_text()) if out.exists() else {}
    return ClientRun(proc.returncode, proc.stdout, proc.stderr, record)


def describe(checkout: Checkout, file: str, env: Mapping[str, str] | None = None) -> ClientRun:
    """What ``modal deploy FILE`` would create (``client_probe.describe``)."""
    return run_client(checkout, {"mode": "describe", "file": file}, env)


def modal_cli(checkout: Checkout, *argv: str, env: Mapping[str, str] | None = None,
              returns: Mapping[str, Any] | None = None) -> ClientRun:  # fmt: skip
    """``modal ARGV`` as a user types it, with the server recorded (``stand_ins.Recorder``)."""
    spec = {"mode": "cli", "argv": list(argv), "returns": dict(returns or {})}
    return run_client(checkout, spec, env)


# ---- containers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expand(value: str, env: Mapping[str, str]) -> str:
    for name, current in sorted(env.items(), key=lambda kv: -len(kv[0])):
        value = value.replace(f"${{{name}}}", current).replace(f"${name}", current)
    return value


@dataclass(frozen=True)
class Image:
    """What a Dockerfile leaves for a container that matters to Python code: the environment,
    the working directory, the files its COPY lines put outside ``/tmp``, and where its Python
    lives (``VIRTUAL_ENV``, else the base image's ``/usr/local``)."""

    env: dict[str, str]
    workdir: str
    copies: list[tuple[Path, str]]
    python_prefix: str

    @classmethod
    def from_dockerfile(cls, dockerfile: Path, context: Path) -> Image:
        instructions = dockerfiles.parse(dockerfile.read_text())
        base = next(i.args.split()[0] for i in instructions if i.keyword == "FROM")
        env = dict(next((v for k, v in BASE_IMAGE_ENV.items() if base.startswith(k)), {}))
        workdir, copies = "/", []
        for ins in instructions:
            if ins.keyword == "ENV":
                words = shlex.split(ins.args)
                pairs = [w.split("=", 1) for w in words] if "=" in words[0] else [words[:2]]
                for name, value in pairs:
                    env[name] = _expand(value, env)
            elif ins.keyword == "WORKDIR":
                workdir = str(PurePosixPath(workdir) / ins.args)
            elif ins.keyword == "COPY":
                *sources, dest = [w for w in shlex.split(ins.args) if not w.startswith("--")]
                target = str(PurePosixPath(workdir) / dest) + ("/" if dest.endswith("/") else "")
                if not target.startswith("/tmp"):
                    copies += [(context / s, target) for s in sources]
        return cls(env, workdir, copies, env.get("VIRTUAL_ENV", "/usr/local"))


def _stage(files: list[tuple[Path, str]], root: Path) -> list[str]:
    """Copy each ``(local, remote)`` under ``root`` at its remote path (a directory copied whole,
    ``COPY dir/ dest/`` style); the top-level directories used."""
    tops = set()
    for local, remote in files:
        remote_path = PurePosixPath(remote)
        target = root / remote_path.relative_to("/")
        if local.is_dir():
            shutil.copytree(local, target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        else:
            target = target / local.name if remote.endswith("/") else target
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, target)
        tops.add(remote_path.parts[1])
    return sorted(tops)


def _mount_point(path: Path) -> list[str]:
    """bubblewrap cannot make a mount point inside a read-only bind: where ``path``'s parent is
    a host directory without it (``/opt`` without ``/opt/venv``), the parent becomes a tmpfs
    holding binds of the host's entries."""
    parent = path.parent
    if path.exists() or parent == Path("/") or not parent.is_dir():
        return []
    argv = ["--tmpfs", str(parent)]
    for entry in sorted(parent.iterdir()):
        argv += ["--ro-bind", str(entry), str(entry)]
    return argv


def _hidden(path: Path, private: set[str]) -> bool:
    return path.resolve().parts[1] in private


@dataclass
class ContainerRun:
    exit: int
    stdout: str
    stderr: str
    record: dict[str, Any]

    def step(self, index: int) -> dict[str, Any]:
        return self.record["steps"][index]

    def calls(self, how: str | None = None) -> list[dict[str, Any]]:
        return [c for c in self.record.get("calls", []) if how is None or c["how"] == how]


@dataclass
class Container:
    """One function's container, from the client's description of it (:func:`describe`).

    ``python``: the venv laid at the image's Python prefix (default: the sandbox image's pip set
    for ``images/sandbox.Dockerfile``, the project venv for the trainer image).
    ``volumes``: mount path -> local directory (made per volume when not given).
    ``isolation=False`` drops every capability, so no namespace can be made inside: a host
    where no sandbox isolation works (as under a gVisor that refuses them all).
    """

    app: dict[str, Any]
    function: str
    workspace: Path
    python: Path | None = None
    volumes: dict[str, Path] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    isolation: bool = True

    def __post_init__(self) -> None:
        self.spec = self.app["functions"][self.function]
        image = self.spec["image"]
        dockerfile = Path(image["dockerfile"])
        self.image = Image.from_dockerfile(dockerfile, dockerfile.parents[1])  # context: the repo
        if self.python is None:
            sandbox = Path(image["dockerfile"]).name == "sandbox.Dockerfile"
            self.python = sandbox_image_venv() if sandbox else PROJECT_VENV
        for mount in self.spec["volumes"]:
            self.volumes.setdefault(mount, self.workspace / "volumes" / mount.strip("/"))
        for directory in self.volumes.values():
            directory.mkdir(parents=True, exist_ok=True)

    def environment(self) -> dict[str, str]:
        """The image's, then ``Image.env``, then the function's secrets and ``env=``."""
        image_env = self.app["functions"][self.function]["image"]["env"]
        return {**self.image.env, **MODAL_ENV, **image_env, **self.spec["secret_env"], **self.env}

    def bwrap(self, run_dir: Path) -> list[str]:
        root = run_dir / "fs"
        files = [(Path(a), b) for a, b in self.spec["image"]["files"]]
        tops = _stage(files + self.image.copies, root)
        argv = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-uts",
                "--hostname", "modal"]  # fmt: skip
        private = PRIVATE_TOPS | set(tops) | {REPO.resolve().parts[1]}
        for entry in sorted(Path("/").iterdir()):
            if entry.name in private:
                continue
            if entry.is_symlink():
                argv += ["--symlink", str(entry.readlink()), str(entry)]
            elif entry.is_dir():
                argv += ["--ro-bind", str(entry), str(entry)]
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--dir", "/root"]
        for top in tops:
            argv += ["--bind", str(root / top), f"/{top}"]
        # The interpreters: the image's venv where the image has its Python, and what it links to.
        if Path(sys.base_prefix).resolve().is_relative_to(self.image.python_prefix):
            raise RuntimeError(
                f"the tests' Python lives under {self.image.python_prefix}, where the image's "
                "venv goes: run them with a Python installed elsewhere (e.g. /usr, /opt, pyenv)"
            )
        argv += _mount_point(Path(self.image.python_prefix))
        argv += ["--ro-bind", str(self.python), self.image.python_prefix]
        for needed in (Path(sys.base_prefix), self.python):
            if _hidden(needed, private):
                argv += ["--ro-bind", str(needed.resolve()), str(needed.resolve())]
        for mount, directory in self.volumes.items():
            argv += ["--bind", str(directory), mount]
        argv += ["--bind", str(run_dir / "harness"), "/harness", "--chdir", self.image.workdir]
        if not self.isolation:
            argv += ["--cap-drop", "ALL"]
        argv += ["--clearenv"]
        for name, value in self.environment().items():
            argv += ["--setenv", name, value]
        return argv

    def _prepare(self, steps: list[dict[str, Any]], **spec: Any) -> tuple[Path, list[str]]:
        run_dir = Path(tempfile.mkdtemp(prefix=f"{self.function}-", dir=self.workspace))
        harness = run_dir / "harness"
        harness.mkdir()
        for name in ("container_probe.py", "stand_ins.py"):
            shutil.copy2(HERE / name, harness / name)
        full = {"module": self.spec["module"], "function": self.function, "steps": steps,
                "out": "/harness/out.json", **spec}  # fmt: skip
        (harness / "spec.json").write_text(json.dumps(full))
        python = f"{self.image.python_prefix}/bin/python"
        command = [*self.bwrap(run_dir), python, "-P", "/harness/container_probe.py",
                   "/harness/spec.json"]  # fmt: skip
        return run_dir, command

    def run(
        self, steps: list[dict[str, Any]], *, timeout: float = 240, **spec: Any
    ) -> ContainerRun:
        """Import the module, then run ``steps`` (``container_probe.py``); returns what ran."""
        run_dir, command = self._prepare(steps, **spec)
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)  # fmt: skip
        out = run_dir / "harness" / "out.json"
        record = json.loads(out.read_text()) if out.exists() else {}
        return ContainerRun(proc.returncode, proc.stdout, proc.stderr, record)

    @contextlib.contextmanager
    def serving(self, *, wait_s: float = 90, **spec: Any) -> Iterator[Served]:
        """This function's ``asgi_app`` served from the container; yields its base URL once
        ``GET /v1/ping`` answers (the container's output is in ``Served.log`` after)."""
        port = free_port()
        run_dir, command = self._prepare([{"serve": self.function, "port": port}], **spec)
        log = run_dir / "container.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        served = Served(f"http://127.0.0.1:{port}", log)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the container exited ({proc.returncode}): {served.text}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{served.url}/v1/ping", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no answer on {served.url} in {wait_s} s: {served.text}")
                time.sleep(0.3)
            yield served
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@dataclass
class Served:
    url: str
    log: Path

    @property
    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""
