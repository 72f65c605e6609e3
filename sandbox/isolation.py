"""Detect, at start, how strongly user code can be isolated here, and build the zygote's command.

Modes, strongest first:

- ``bwrap``: the zygote runs inside bubblewrap with new net/pid/ipc/uts namespaces (only ``lo``,
  so not even the host's loopback services are reachable), a read-only minimal filesystem (``/usr``
  and a few ``/etc`` files; no project, no ``/root``), an empty environment; each run also gets a
  private tmpfs and an unprivileged per-slot uid. This is the only mode called *secure*.
- ``unshare``: no bubblewrap (e.g. gVisor on Modal may refuse it), but we are root and may
  ``unshare``: the zygote leaves the network namespace itself and runs still get a private tmpfs
  and a per-slot uid. The host filesystem stays visible (read-only by permissions only).
- ``bwrap-userns``: bubblewrap without root (an unprivileged user namespace, e.g. ``make
  local-smoke`` on a laptop): the same network, pid and filesystem isolation as ``bwrap`` (no
  network, no home directory, no project, empty environment), but no per-run uid or private
  tmpfs: runs share one uid inside the sandbox and a scratch directory per slot.
- ``none``: fork + rlimits only. Runs share the server's uid: they could signal it or read its
  files. For development only.

Anything weaker than ``bwrap`` refuses to start unless ``allow_insecure`` (``--allow-insecure``
or ``SANDBOX_ALLOW_INSECURE=1``) is given; the chosen mode is always logged.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.runtime import missing_message
from sandbox.settings import Settings

log = logging.getLogger("sandbox.isolation")

ZYGOTE_SRC = Path(__file__).with_name("_zygote.py")
ZYGOTE_IN_SANDBOX = "/opt/sandbox/_zygote.py"
PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")
MODES = ("bwrap", "unshare", "bwrap-userns", "none")
WEAKNESS = {
    "unshare": "the host filesystem is visible (read-only by permissions), no pid namespace",
    "bwrap-userns": "no per-run uid or private /tmp: runs could signal the zygote or one another",
    "none": "user code runs as this user, with its files, its processes and the network",
}
ZYGOTE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    # One BLAS/OpenMP thread: threads do not survive fork(), and slots already give parallelism.
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}
# What bubblewrap shows of the host's system directories (read-only; /usr first).
SYSTEM_TOPS = ("/usr", "/bin", "/lib", "/lib64", "/sbin")
# Read-only /etc files the interpreter and BLAS need (Debian finds libblas via alternatives).
ETC_FILES = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")


class InsecureIsolation(RuntimeError):
    """Only a mode weaker than ``bwrap`` is available and insecure modes were not allowed."""


@dataclass(frozen=True)
class Isolation:
    """The chosen mode and how to launch the zygote in it."""

    mode: str
    python: str
    probe: dict[str, Any] = field(default_factory=dict)
    site_dirs: tuple[str, ...] = ()  # Settings.site: import dirs added in the zygote

    @property
    def secure(self) -> bool:
        return self.mode == "bwrap"

    @property
    def drop_uid(self) -> bool:
        return self.mode in ("bwrap", "unshare")

    @property
    def mountns(self) -> bool:
        return self.mode in ("bwrap", "unshare")

    def zygote_argv(self, *args: str) -> list[str]:
        if self.mode in ("bwrap", "bwrap-userns"):
            prefix = bwrap_prefix(self.site_dirs)
            return [*prefix, self.python, "-I", "-B", ZYGOTE_IN_SANDBOX, *args]
        return [self.python, "-I", "-B", str(ZYGOTE_SRC), *args]

    def zygote_env(self) -> dict[str, str]:
        """The whole environment of the zygote: nothing of the server's (no HF_TOKEN etc.)."""
        return dict(ZYGOTE_ENV)


def bwrap_prefix(site_dirs: tuple[str, ...] = ()) -> list[str]:
    argv = [
        "bwrap",
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--hostname",
        "sandbox",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for top in SYSTEM_TOPS[1:]:
        p = Path(top)
        if p.is_symlink():
            argv += ["--symlink", str(p.readlink()), top]
        elif p.exists():
            argv += ["--ro-bind", top, top]
    for etc in ETC_FILES:
        argv += ["--ro-bind-try", etc, etc]
    argv += site_binds(site_dirs)
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    argv += ["--ro-bind", str(ZYGOTE_SRC), ZYGOTE_IN_SANDBOX, "--chdir", "/tmp"]
    for key, value in ZYGOTE_ENV.items():
        argv += ["--setenv", key, value]
    return argv


def site_binds(site_dirs: tuple[str, ...]) -> list[str]:
    """bubblewrap arguments that show each SANDBOX_SITE directory read-only at its own path.

    Directories bubblewrap makes on the way are 0700 unless told, which the per-run uids could
    not traverse; ones under the bound system tops are visible already."""
    argv: list[str] = []
    made: set[Path] = set()
    for site in map(Path, site_dirs):
        if any(site.is_relative_to(top) for top in SYSTEM_TOPS):
            continue
        for parent in reversed(site.parents[:-1]):  # from the top, without "/"
            if parent not in made:
                made.add(parent)
                argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", str(site), str(site)]
    return argv


def pick_python(settings: Settings) -> str:
    """The zygote's interpreter: must be readable by the unprivileged slot uids (not pyenv's)."""
    if settings.python:
        return settings.python
    for cand in PYTHON_CANDIDATES:
        if Path(cand).exists():
            return cand
    return shutil.which("python3") or "python3"


def run_probe(iso: Isolation, settings: Settings) -> dict[str, Any] | None:
    cfg = {
        "base_uid": settings.base_uid,
        "preload": settings.preload.split(","),
        "site": list(iso.site_dirs),
        "unshare_net": iso.mode == "unshare",
    }
    try:
        proc = subprocess.run(
            iso.zygote_argv("--probe", json.dumps(cfg)),
            env=iso.zygote_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("isolation probe %s failed: %s", iso.mode, exc)
        return None
    if proc.returncode != 0:
        log.info("isolation probe %s failed (rc %s): %s", iso.mode, proc.returncode, proc.stderr)
        return None
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def works(mode: str, probe: dict[str, Any] | None) -> bool:
    if probe is None:
        return False
    if mode == "none":
        return True
    isolated_net = probe.get("net_ifaces") == ["lo"]
    if mode == "bwrap-userns":
        return bool(isolated_net and probe.get("seccomp"))
    ok = probe.get("euid") == 0 and probe.get("mountns") and probe.get("setuid") and isolated_net
    ok = ok and probe.get("slot_ns")  # a network + IPC namespace per slot
    if mode == "bwrap":
        ok = ok and probe.get("seccomp")  # user code cannot create namespaces
    if mode == "unshare":
        ok = ok and probe.get("unshare_net")
    return bool(ok)


def detect(settings: Settings) -> Isolation:
    """Pick the strongest working mode (or the requested one); refuse insecure unless allowed."""
    python = pick_python(settings)
    wanted = settings.isolation
    if wanted not in ("auto", *MODES):
        raise ValueError(f"unknown isolation mode {wanted!r}; choose auto, {', '.join(MODES)}")
    candidates = MODES if wanted == "auto" else (wanted,)
    chosen: Isolation | None = None
    for mode in candidates:
        if mode.startswith("bwrap") and shutil.which("bwrap") is None:
            log.info("isolation bwrap unavailable: no bwrap on PATH")
            continue
        iso = Isolation(mode, python, site_dirs=settings.site_dirs)
        probe = run_probe(iso, settings)
        if works(mode, probe):
            chosen = Isolation(mode, python, probe or {}, settings.site_dirs)
            break
        log.info("isolation %s unavailable: probe %s", mode, probe)
    if chosen is None:
        raise RuntimeError(f"no isolation mode works here (tried {', '.join(candidates)})")
    missing = set(settings.preload.split(",")) - set(chosen.probe.get("preloaded", []))
    if missing:
        log.warning("%s", missing_message(python, missing))
    if not chosen.secure and not settings.allow_insecure:
        raise InsecureIsolation(
            f"best isolation here is {chosen.mode!r} ({WEAKNESS[chosen.mode]}); "
            "refusing to run untrusted code. Pass --allow-insecure or SANDBOX_ALLOW_INSECURE=1 "
            "to accept it."
        )
    if not chosen.secure:
        log.warning("sandbox isolation %s: %s", chosen.mode, WEAKNESS[chosen.mode])
    log.log(
        logging.INFO if chosen.secure else logging.WARNING,
        "sandbox isolation: %s (%s) python %s %s, preloaded %s",
        chosen.mode,
        "secure" if chosen.secure else "INSECURE, explicitly allowed",
        python,
        chosen.probe.get("python"),
        ",".join(chosen.probe.get("preloaded", [])),
    )
    return chosen
