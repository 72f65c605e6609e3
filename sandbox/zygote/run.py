"""One run in a slot worker: prepare its child and scratch, execute the request, clean up.

``prepare`` happens off the critical path, after the previous run's ``cleanup`` is complete;
``execute`` hands the request to the prepared child and collects its output under the limits;
``cleanup`` kills and reaps everything of the run and drops its scratch, so nothing of it
survives into the next one.
"""

import base64
import errno
import json
import os
import select
import signal
import stat
import time

from child import run_child
from reaping import kill_all, reap_all, stragglers
from root import clear_sysv_ipc
from syscalls import CLONE_NEWNS, MS_BIND, MS_NODEV, MS_NOSUID, mount, umount, unshare

MARKS = []
CHILD_POLL_S = 0.005  # without pidfd_open: how often the worker looks whether the child exited


def mark(name):
    """Phase timestamps of the current request (sent back only when ``cfg["profile"]``)."""
    MARKS.append((name, time.perf_counter()))


def resolve(workdir, path):
    """Map a request path (relative, or absolute under /tmp) into the run's scratch dir."""
    if path.startswith("/"):
        rel = os.path.relpath(path, "/tmp")
    else:
        rel = os.path.normpath(path)
    if rel.startswith("..") or os.path.isabs(rel) or rel == ".":
        raise ValueError("path escapes the scratch dir: %r" % path)
    return os.path.join(workdir, rel)


def inside(workdir, target):
    real = os.path.realpath(target)
    return real == workdir or real.startswith(workdir.rstrip("/") + "/")


def open_beneath(workdir, target):
    """Open a regular file under ``workdir`` for reading, following no symlink on the way.

    The worker is root in the sandbox and reads ``fetch_files`` while the run's processes may
    still be alive: a checked path could be swapped, and a symlink to ``/proc/<pid>/root`` (a
    magic link ``realpath`` reports as ``/``) leads into another slot's mount namespace. So each
    component is opened with ``O_NOFOLLOW`` relative to its parent, and only a regular file is
    read (``O_NONBLOCK``: a FIFO must not block the worker).
    """
    parts = os.path.relpath(target, workdir).split("/")
    dirfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            nxt = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd
            )
            os.close(dirfd)
            dirfd = nxt
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, dir_fd=dirfd)
    finally:
        os.close(dirfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file: %r" % target)
    return fd


# A run's writable places: one size-capped tmpfs, mounted over /tmp, holding a directory for each
# (the run's own uid, 0700), bound at its place; /tmp last, so the tmpfs's own root is hidden.
SCRATCH_VIEWS = (("var-tmp", "/var/tmp"), ("shm", "/dev/shm"), ("tmp", "/tmp"))


class Prepared:
    """A run child forked ahead of time, blocked on its "go" pipe, with a fresh empty scratch."""

    def __init__(self, pid, workdir, code_path, fds):
        self.pid = pid
        self.workdir = workdir
        self.code_path = code_path
        self.fds = fds  # the worker's ends: go_w, status_r, out_r, err_r, stdin_w
        self.status = None  # waitpid status once reaped; until then its pid cannot be reused


def prepare(cfg, slot, uid):
    """Off the critical path: a fresh private tmpfs, and the next run child forked onto it.

    Called only after the previous run's cleanup is complete (every process of the slot's uid
    dead and reaped, its tmpfs unmounted), so the new child cannot see anything of it.
    """
    if cfg["mountns"]:
        workdir = "/tmp"
        unshare(CLONE_NEWNS)
        mount(
            "tmpfs",
            "/tmp",
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            "size=%d,mode=0700" % cfg["scratch_bytes"],
        )
        for name, _ in SCRATCH_VIEWS:
            os.mkdir("/tmp/" + name, 0o700)
            os.chown("/tmp/" + name, uid, uid)
        for name, target in SCRATCH_VIEWS:
            mount("/tmp/" + name, target, None, MS_BIND, None)
    else:
        workdir = os.path.join(cfg["scratch_root"], "slot%d" % slot)
        release_scratch(cfg, workdir)  # what a killed zygote left before its cleanup
        os.makedirs(workdir, mode=0o700)
        if cfg["drop_uid"]:
            os.chown(workdir, uid, uid)
    try:
        fds = {"stdin_w": os.memfd_create("stdin", os.MFD_CLOEXEC)}
        fds["go_r"], fds["go_w"] = os.pipe()
        fds["status_r"], fds["status_w"] = os.pipe()
        fds["out_r"], fds["out_w"] = os.pipe()
        fds["err_r"], fds["err_w"] = os.pipe()
        code_path = os.path.join(workdir, "main.py")
        pid = os.fork()
        if pid == 0:
            run_child(cfg, uid, workdir, code_path, fds)
    except BaseException:
        release_scratch(cfg, workdir)
        raise
    if cfg.get("cgroup"):  # before "go": everything the run allocates is charged to the slot
        try:
            os.write(cfg["cgroup"][0], b"%d" % pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            release_scratch(cfg, workdir)
            raise
    for name in ("go_r", "status_w", "out_w", "err_w"):
        os.close(fds.pop(name))
    return Prepared(pid, workdir, code_path, fds)


def release_scratch(cfg, workdir):
    """Unmount the run's tmpfs (all its views): its pages are freed and uncharged from the slot's
    cgroup, so nothing a run wrote to /tmp, /var/tmp or /dev/shm outlives it."""
    if cfg["mountns"]:
        for target in ("/tmp", "/tmp", "/var/tmp", "/dev/shm"):
            try:
                umount(target)
            except OSError as exc:  # a prepare that failed half-way mounted less
                if exc.errno != errno.EINVAL:
                    raise
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def cleanup(cfg, uid, child):
    """After the reply is sent: kill and reap everything of the run, drop its scratch."""
    if child.status is None:
        try:
            os.kill(child.pid, signal.SIGKILL)  # unreaped: the pid cannot have been reused
        except ProcessLookupError:
            pass
        os.waitpid(child.pid, 0)
    if stragglers():
        kill_all(uid if cfg["drop_uid"] else None)
    reap_all()
    for fd in child.fds.values():
        os.close(fd)
    release_scratch(cfg, child.workdir)
    if cfg["mountns"]:
        clear_sysv_ipc()


def read_into(fd, buf, cap):
    """Read what is there; False at EOF. Output past ``cap`` is read and dropped."""
    chunk = os.read(fd, 65536)
    if not chunk:
        return False
    if len(buf) < cap:
        buf += chunk[: cap - len(buf)]
    return True


def execute(req, cfg, uid, child):
    """Hand the request to the prepared child; return the reply (the child may still exit)."""
    limits = req["limits"]
    workdir = child.workdir
    for path, content in (req.get("files") or {}).items():
        if content is None:  # as SandboxFusion: a null entry creates nothing ("" is an empty file)
            continue
        target = resolve(workdir, path)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        if not inside(workdir, parent):
            raise ValueError("file path escapes the scratch dir: %r" % path)
        with open(target, "wb") as fh:
            fh.write(base64.b64decode(content))
        d = target
        while d != workdir and cfg["drop_uid"]:
            os.chown(d, uid, uid)
            d = os.path.dirname(d)
    code_path = child.code_path
    if req["language"] == "bash":
        code_path = os.path.join(workdir, "main.sh")
    fd = os.open(code_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(req["code"])
    if cfg["drop_uid"]:
        os.chown(code_path, uid, uid)
    fds = child.fds
    if req.get("stdin"):
        data = req["stdin"].encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fds["stdin_w"], view) :]
    if cfg.get("cgroup"):  # one limit over all the run's processes, its memfds and its files
        want = limits["memory_bytes"] + cfg["scratch_bytes"]
        if cfg.get("cgroup_limit") != want:
            os.write(cfg["cgroup"][1], b"%d" % want)
            cfg["cgroup_limit"] = want
    go = json.dumps({"language": req["language"], "limits": limits}).encode() + b"\n"
    start = time.monotonic()
    os.write(fds["go_w"], go)  # small: one atomic pipe write
    os.close(fds.pop("go_w"))
    mark("go")
    out_r, err_r, status_r = fds["out_r"], fds["err_r"], fds["status_r"]
    cap = limits["output_cap"]
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = [out_r, err_r]
    try:
        pidfd = os.pidfd_open(child.pid)
    except OSError:  # gVisor of 2022 (ENOSYS): look at the child every CHILD_POLL_S instead
        pidfd = None
    watch = [out_r, err_r, status_r] + ([pidfd] if pidfd is not None else [])
    deadline = start + req["run_timeout"]
    reported = None
    said = b""
    timed_out = False
    try:
        while child.status is None and (reported is None or open_fds):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            wait = remaining if pidfd is not None else min(remaining, CHILD_POLL_S)
            ready, _, _ = select.select(watch, [], [], wait)
            if pidfd is None:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
                if pid:
                    child.status = status
            for fd in ready:
                if fd == pidfd:
                    child.status = os.waitpid(child.pid, 0)[1]
                elif fd == status_r:
                    chunk = os.read(status_r, 64)
                    said += chunk
                    if not chunk or len(said) > 64:
                        watch.remove(status_r)
                    elif reported is None and said.endswith(b"\n"):
                        try:
                            reported = int(said) & 0xFF
                        except ValueError:
                            watch.remove(status_r)
                elif not read_into(fd, bufs[fd], cap):
                    open_fds.remove(fd)
                    watch.remove(fd)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    elapsed = time.monotonic() - start
    mark("done")
    if timed_out or (child.status is not None and stragglers()):
        reaped = kill_all(
            uid if cfg["drop_uid"] else None
        )  # stragglers may hold the pipes: kill them first, then drain
        if child.pid in reaped:
            child.status = reaped[child.pid]
    for fd in open_fds:  # every writer is dead now, or EOF was seen: drain what is left
        os.set_blocking(fd, False)
        try:
            while read_into(fd, bufs[fd], cap):
                pass
        except BlockingIOError:
            pass
    if timed_out:
        return_code = None
    elif child.status is None:
        return_code = reported  # said done, and closed its output; it is exiting now
    elif os.WIFSIGNALED(child.status):
        return_code = -os.WTERMSIG(child.status)
    else:
        return_code = os.WEXITSTATUS(child.status)
    fetched = {}
    budget = limits["fetch_bytes"]
    for path in req.get("fetch_files") or []:
        try:
            fd = open_beneath(workdir, resolve(workdir, path))
            with os.fdopen(fd, "rb") as fh:
                data = fh.read(budget + 1)
        except (OSError, ValueError):
            continue
        if len(data) > budget:
            continue
        budget -= len(data)
        fetched[path] = base64.b64encode(data).decode()
    mark("fetch")
    return {
        "status": "TimeLimitExceeded" if timed_out else "Finished",
        "return_code": return_code,
        "execution_time": elapsed,
        "stdout": bufs[out_r].decode("utf-8", "replace"),
        "stderr": bufs[err_r].decode("utf-8", "replace"),
        "files": fetched,
    }
