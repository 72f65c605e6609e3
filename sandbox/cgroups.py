"""Per-slot memory cgroups: one memory limit over *all* processes of a run.

``RLIMIT_AS`` bounds one process; a run may have ``max_processes`` of them, so without a cgroup
a run could hold ``max_processes x memory_limit_MB`` (plus memfds and SysV shm, which no rlimit
counts). The server (root, outside the sandbox) makes ``<its memory cgroup>/sandbox-<pid>/slot<i>``
and hands the zygote two open files per slot: ``cgroup.procs`` (the worker moves each run child
in, before "go") and the limit file (set per request to ``memory_limit_MB`` + the scratch size,
tmpfs pages being charged too). cgroup v2 (``memory.max``) is preferred, else v1
(``memory.limit_in_bytes``). Where neither can be made (no root, a read-only cgroupfs, gVisor)
the service still runs, and says so in its log: the limit is then per process only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("sandbox.cgroups")


def _mounts() -> list[tuple[str, str, str, str]]:
    """(root within the hierarchy, mount point, fstype, super options) of each cgroup mount."""
    found = []
    with Path("/proc/self/mountinfo").open() as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            parts, rparts = left.split(), right.split()
            if len(rparts) >= 3 and rparts[0] in ("cgroup", "cgroup2"):
                found.append((parts[3], parts[4], rparts[0], rparts[2]))
    return found


def _own_cgroups() -> dict[str, str]:
    """{"v2": path} and/or {"v1": path} of this process's (memory) cgroup."""
    own = {}
    with Path("/proc/self/cgroup").open() as fh:
        for line in fh:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if hid == "0" and controllers == "":
                own["v2"] = path
            elif "memory" in controllers.split(","):
                own["v1"] = path
    return own


def _locate(version: str, cg_path: str) -> Path | None:
    for root, mountpoint, fstype, opts in _mounts():
        if version == "v2" and fstype != "cgroup2":
            continue
        if version == "v1" and (fstype != "cgroup" or "memory" not in opts.split(",")):
            continue
        rel = os.path.relpath(cg_path, root)
        if rel.startswith(".."):
            continue
        return Path(mountpoint) / rel if rel != "." else Path(mountpoint)
    return None


@dataclass
class SlotCgroups:
    """The cgroups made for one server; ``fds[i]`` = (cgroup.procs, limit file) of slot i."""

    version: str
    root: Path
    fds: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def create(cls, slots: int, tag: str | None = None) -> SlotCgroups | None:
        """Make the slot cgroups, or None (logged) where this host does not let us."""
        tag = tag or f"sandbox-{os.getpid()}"
        try:
            own = _own_cgroups()
        except OSError as exc:
            log.warning("no memory cgroup: %s", exc)
            return None
        errors = []
        for version in ("v2", "v1"):
            if version not in own:
                continue
            base = _locate(version, own[version])
            if base is None:
                continue
            try:
                return cls._make(version, base / tag, slots)
            except OSError as exc:
                errors.append(f"{version} at {base}: {exc}")
        log.warning(
            "no per-run memory cgroup (%s): memory_limit_MB bounds each process, not the run",
            "; ".join(errors) or "no cgroup with a memory controller mounted",
        )
        return None

    @classmethod
    def _make(cls, version: str, root: Path, slots: int) -> SlotCgroups:
        if version == "v2":
            if "memory" not in (root.parent / "cgroup.controllers").read_text().split():
                raise OSError("memory controller not available")
            enabled = (root.parent / "cgroup.subtree_control").read_text().split()
            if "memory" not in enabled:  # EBUSY if the parent holds processes (not delegated)
                (root.parent / "cgroup.subtree_control").write_text("+memory")
        _remove_stale(root.parent)
        root.mkdir(exist_ok=True)
        made = cls(version, root)
        try:
            if version == "v2":
                (root / "cgroup.subtree_control").write_text("+memory")
            limit_name = "memory.max" if version == "v2" else "memory.limit_in_bytes"
            for i in range(slots):
                slot = root / f"slot{i}"
                slot.mkdir(exist_ok=True)
                if version == "v2" and (slot / "memory.swap.max").exists():
                    (slot / "memory.swap.max").write_text("0")
                procs = os.open(slot / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
                limit = os.open(slot / limit_name, os.O_WRONLY | os.O_CLOEXEC)
                made.fds.append((procs, limit))
        except OSError:
            made.close()
            raise
        log.info("per-run memory cgroups (%s) under %s", version, root)
        return made

    def close(self) -> None:
        """Close the files and remove the cgroups; best effort (their processes may still be
        dying: a few retries, and a later server removes what a dead one left)."""
        for procs, limit in self.fds:
            os.close(procs)
            os.close(limit)
        self.fds = []
        for _ in range(50):
            if _remove_tree(self.root):
                return
            time.sleep(0.02)


def _remove_tree(root: Path) -> bool:
    for slot in root.glob("slot*"):
        with contextlib.suppress(OSError):
            slot.rmdir()
    try:
        root.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _remove_stale(parent: Path) -> None:
    """Remove ``sandbox-<pid>`` cgroups of servers that are gone."""
    for old in parent.glob("sandbox-*"):
        pid = old.name.removeprefix("sandbox-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _remove_tree(old)
