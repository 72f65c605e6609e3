"""Detect, at start, how strongly user code can be isolated here, and build the zygote's command.

Modes, strongest first:

- ``bwrap``: the zygote runs inside bubblewrap with new net/pid/ipc/uts namespaces (only ``lo``,
  so not even the host's loopback services are reachable), a read-only minimal root
  (:func:`root_layout`: ``/usr`` and the system tops, a few ``/etc`` files, the interpreter and
  ``SANDBOX_SITE``; no project, no ``/root``, no data), an empty environment; each run also gets a
  private tmpfs (its ``/tmp``, ``/var/tmp`` and ``/dev/shm``) and an unprivileged per-slot uid.
- ``bwrap-ownnet``: ``bwrap`` where bubblewrap cannot make the network namespace itself: a gVisor
  whose new network namespace already has 127.0.0.1 on ``lo`` refuses bubblewrap's RTM_NEWADDR
  ("loopback: Failed RTM_NEWADDR", google/gvisor#13438). The zygote's bubblewrap then runs
  without ``--unshare-net`` inside a network namespace that ``_netns.py`` makes first, bringing
  ``lo`` up only if it is down (never adding an address). Everything else as ``bwrap``.
- ``unshare``: no bubblewrap (an image without it, a gVisor that refuses it), but we are root:
  the zygote builds the same sandbox itself (``enter_sandbox`` in ``zygote/root.py``: its own mount,
  pid, net, ipc and uts namespaces, the same root from :func:`root_layout`, its own ``/proc``),
  with the same per-run tmpfs, uid and seccomp filter. Secure where the kernel can make the binds
  read-only (Linux); where it cannot (the probe's ``readonly``) the root is read-only only by
  permissions, and the mode needs ``allow_insecure``. It refuses to start where mount namespaces
  do not isolate (gVisor of 2022; docs/sandbox-security.md).
- ``bwrap-userns``: bubblewrap without root (an unprivileged user namespace, e.g. ``make
  local-smoke`` on a laptop): the same network, pid and filesystem isolation as ``bwrap`` (no
  network, no home directory, no project, empty environment), but no per-run uid or private
  tmpfs: runs share one uid inside the sandbox and a scratch directory per slot.
- ``none``: fork + rlimits only. Runs share the server's uid: they could signal it or read its
  files. For development only: taken only when asked for (``SANDBOX_ISOLATION=none``), never by
  ``auto``.

Anything not secure refuses to start unless ``allow_insecure`` (``--allow-insecure`` or
``SANDBOX_ALLOW_INSECURE=1``) is given; ``SANDBOX_ISOLATION=<mode>`` (``--isolation``) tries that
mode only and refuses to start without it. ``auto`` never picks ``none``: that mode runs only when
asked for by name. The chosen mode, and why each stronger one was not taken, are always logged.
Probing says a mode *can* start; whether it isolates is the self-test's question
(``sandbox/selftest.py``), which every mode answers at start before it serves a call.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sandbox.runtime import missing_message
from sandbox.settings import Settings

log = logging.getLogger("sandbox.isolation")

# The zygote is a directory run as a program (`python -I -B .../zygote`), mounted read-only.
ZYGOTE_SRC = Path(__file__).with_name("zygote")
ZYGOTE_IN_SANDBOX = "/opt/sandbox/zygote"
NETNS_SRC = Path(__file__).with_name("_netns.py")
PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")
MODES = ("bwrap", "bwrap-ownnet", "unshare", "bwrap-userns", "none")
BWRAP_MODES = ("bwrap", "bwrap-ownnet", "bwrap-userns")
# For development on a laptop only: weaker than any self-test allows (one /tmp and one uid for
# every call; no isolation at all). They run only when asked for by name (sandbox/startup.py).
DEV_MODES = ("bwrap-userns", "none")
WEAKNESS = {
    "unshare": "this kernel cannot make bind mounts read-only: the host directories shown are "
    "read-only by their permissions only",
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


class IsolationUnavailable(RuntimeError):
    """No mode asked for works here; the message says why for each one tried."""


class InsecureIsolation(IsolationUnavailable):
    """Only a mode that is not secure is available and insecure modes were not allowed."""


@dataclass(frozen=True)
class Isolation:
    """The chosen mode and how to launch the zygote in it."""

    mode: str
    python: str
    probe: dict[str, Any] = field(default_factory=dict)
    site_dirs: tuple[str, ...] = ()  # Settings.site: import dirs added in the zygote
    # bubblewrap's path, found on the server's PATH (e.g. a `dpkg -x` copy in /tmp/bw/usr/bin):
    # the zygote's environment has a PATH of its own.
    bwrap: str = "bwrap"

    @property
    def secure(self) -> bool:
        if self.mode == "unshare":
            return bool(self.probe.get("readonly"))
        return self.mode in ("bwrap", "bwrap-ownnet")

    @property
    def drop_uid(self) -> bool:
        return self.mode in ("bwrap", "bwrap-ownnet", "unshare")

    @property
    def mountns(self) -> bool:
        return self.drop_uid

    def zygote_argv(self, *args: str) -> list[str]:
        if self.mode in BWRAP_MODES:
            own_net = self.mode == "bwrap-ownnet"
            layout = root_layout(self.python, self.site_dirs)
            prefix = bwrap_prefix(layout, self.bwrap, unshare_net=not own_net)
            if own_net:  # our own network namespace around bubblewrap (see the module docstring)
                prefix = [self.python, "-I", "-B", str(NETNS_SRC), *prefix]
            return [*prefix, self.python, "-I", "-B", ZYGOTE_IN_SANDBOX, *args]
        return [self.python, "-I", "-B", str(ZYGOTE_SRC), *args]

    def zygote_cfg(self) -> dict[str, Any]:
        """What the zygote's config says of the isolation (probe and pool alike)."""
        unshare = self.mode == "unshare"
        return {
            "unshare": unshare,
            "root": root_layout(self.python, self.site_dirs) if unshare else None,
            "site": list(self.site_dirs),
        }

    def zygote_env(self) -> dict[str, str]:
        """The whole environment of the zygote: nothing of the server's (no HF_TOKEN etc.)."""
        return dict(ZYGOTE_ENV)


def under(path: str | Path, tops: Iterable[str]) -> bool:
    return any(Path(path).is_relative_to(top) for top in tops)


def interpreter_dirs(python: str) -> list[str]:
    """The installation of ``python`` and of the file it links to (``<prefix>/bin/python3`` ->
    ``<prefix>``), where outside the system directories: a venv's or an /opt interpreter needs
    its own tree (pyvenv.cfg, lib/) inside the sandbox."""
    dirs = []
    for path in (Path(python), Path(python).resolve()):
        prefix = path.parent.parent
        if path.parent.name == "bin" and prefix != Path("/") and not under(prefix, SYSTEM_TOPS):
            dirs.append(str(prefix))
    return dirs


def root_layout(python: str, site_dirs: tuple[str, ...] = ()) -> dict[str, list]:
    """Everything of the host the sandbox's root shows, read-only at the same paths: the system
    tops (symlinks where the host has symlinks), a few /etc files, the interpreter's installation
    and ``SANDBOX_SITE``. Nothing else: no /data, /checkpoints, /models, /root, /work, project.
    One list for both bubblewrap's arguments and ``unshare`` mode's own root."""
    binds, symlinks = ["/usr"], []
    for top in SYSTEM_TOPS[1:]:
        p = Path(top)
        if p.is_symlink():
            symlinks.append([str(p.readlink()), top])
        elif p.exists():
            binds.append(top)
    binds += [etc for etc in ETC_FILES if Path(etc).exists()]
    for extra in sorted({*interpreter_dirs(python), *site_dirs}, key=len):  # parents first
        if not under(extra, binds):
            binds.append(extra)
    return {"binds": binds, "symlinks": symlinks}


def layout_args(layout: dict[str, list]) -> list[str]:
    """bubblewrap's arguments for :func:`root_layout`: each bind read-only at its own path."""
    argv: list[str] = []
    # Directories bubblewrap makes on the way are 0700 unless told, which the per-run uids could
    # not traverse.
    made: set[Path] = set()
    for src in layout["binds"]:
        for parent in reversed(Path(src).parents[:-1]):  # from the top, without "/"
            if parent not in made:
                made.add(parent)
                argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", src, src]
    for target, path in layout["symlinks"]:
        argv += ["--symlink", target, path]
    return argv


def bwrap_prefix(
    layout: dict[str, list], bwrap: str = "bwrap", *, unshare_net: bool = True
) -> list[str]:
    argv = [bwrap, *(["--unshare-net"] if unshare_net else [])]
    argv += [
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--hostname",
        "sandbox",
    ]
    argv += layout_args(layout)
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    argv += ["--perms", "0755", "--dir", "/var", "--perms", "0755", "--dir", "/var/tmp"]
    argv += ["--ro-bind", str(ZYGOTE_SRC), ZYGOTE_IN_SANDBOX, "--chdir", "/tmp"]
    for key, value in ZYGOTE_ENV.items():
        argv += ["--setenv", key, value]
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
    """What the zygote finds it can do in ``iso``'s mode; ``{"probe_error": ...}`` if it failed."""
    cfg = {"base_uid": settings.base_uid, "preload": settings.preload.split(",")}
    cfg |= iso.zygote_cfg()
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
        return {"probe_error": str(exc)}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        log.info("isolation probe %s failed (rc %s): %s", iso.mode, proc.returncode, proc.stderr)
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"probe_error": last}
    try:
        return json.loads(lines[-1])
    except ValueError:
        return {"probe_error": f"unreadable probe output {lines[-1][:200]!r}"}


CHECKS = (  # what each probe key's absence means, in the order worth reporting
    ("mountns", "no mount namespace with a tmpfs"),
    ("slot_ns", "no network + IPC namespace per slot"),
    ("setuid", "cannot switch to the slot uids"),
    ("seccomp", "no seccomp filter"),
)


def why_not(mode: str, probe: dict[str, Any] | None) -> str:
    """One phrase: why ``mode`` does not work here, from its probe (see :func:`works`)."""
    if probe is None:
        return "the probe did not run"
    error = probe.get("probe_error") or probe.get("sandbox_error")
    if error:
        return str(error)
    if probe.get("net_ifaces") != ["lo"]:
        return f"network interfaces {probe.get('net_ifaces')}, not only lo"
    if mode == "bwrap-userns":
        return "no seccomp filter"
    if probe.get("euid") != 0:
        return "not root"
    for key, meaning in CHECKS:
        if not probe.get(key):
            return f"{meaning} ({probe.get(key + '_error', 'refused')})"
    return f"no pid or uts namespace (pid {probe.get('pid')}, host {probe.get('hostname')!r})"


def works(mode: str, probe: dict[str, Any] | None) -> bool:
    if probe is None or "probe_error" in probe or "sandbox_error" in probe:
        return False
    if mode == "none":
        return True
    isolated_net = probe.get("net_ifaces") == ["lo"]
    if mode == "bwrap-userns":
        return bool(isolated_net and probe.get("seccomp"))
    # root, a mount namespace, the slot uids, a network + IPC namespace per slot, and a seccomp
    # filter (user code cannot create namespaces)
    ok = probe.get("euid") == 0 and isolated_net and all(probe.get(key) for key, _ in CHECKS)
    if mode == "unshare":  # the zygote is pid 1 of its own pid namespace, in its own uts
        ok = ok and probe.get("pid") == 1 and probe.get("hostname") == "sandbox"
    return bool(ok)


def candidate_modes(wanted: str) -> tuple[str, ...]:
    """The modes to try, in order: every mode but ``none`` for ``auto``, else the one named."""
    if wanted not in ("auto", *MODES):
        raise ValueError(f"unknown isolation mode {wanted!r}; choose auto, {', '.join(MODES)}")
    return tuple(m for m in MODES if m != "none") if wanted == "auto" else (wanted,)


def detect(settings: Settings) -> Isolation:
    """Pick the strongest working mode (or the requested one); refuse insecure unless allowed.

    Probes only: the start path (``sandbox/startup.py``) takes modes from :func:`usable_modes`
    and keeps the first whose self-test passes."""
    return next(usable_modes(settings))


def usable_modes(settings: Settings, tried: list[str] | None = None) -> Iterator[Isolation]:
    """The modes that start here, strongest first, each probed only once the caller asks for the
    next (it refused the one before, and appended why to ``tried``). Raises
    :class:`IsolationUnavailable` naming every mode and why when none is left, and
    :class:`InsecureIsolation` at the first insecure one unless insecure modes are allowed (all
    that follow are weaker)."""
    python = pick_python(settings)
    tried = [] if tried is None else tried
    for mode in candidate_modes(settings.isolation):
        iso = Isolation(mode, python, site_dirs=settings.site_dirs)
        if mode in BWRAP_MODES:
            found = shutil.which("bwrap")
            if found is None:
                tried.append(f"{mode}: no bwrap on PATH")
                log.info("isolation %s unavailable: no bwrap on PATH", mode)
                continue
            iso = replace(iso, bwrap=found)
        probe = run_probe(iso, settings)
        if not works(mode, probe):
            tried.append(f"{mode}: {why_not(mode, probe)}")
            log.info("isolation %s unavailable: %s; probe %s", mode, tried[-1], probe)
            continue
        chosen = replace(iso, probe=probe or {})
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
            "sandbox isolation: %s (%s) python %s %s, preloaded %s%s",
            chosen.mode,
            "secure" if chosen.secure else "INSECURE, explicitly allowed",
            python,
            chosen.probe.get("python"),
            ",".join(chosen.probe.get("preloaded", [])),
            f"; not taken: {'; '.join(tried)}" if tried else "",
        )
        yield chosen
    raise IsolationUnavailable(f"no isolation mode works here ({'; '.join(tried)})")
