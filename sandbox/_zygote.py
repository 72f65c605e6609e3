"""The warm zygote: runs *inside* the sandbox, under the sandbox's own python (stdlib only here).

Why a zygote: a fresh interpreter costs 15-170 ms here and importing numpy+sympy another ~200 ms;
``fork()`` of an interpreter that already did both costs ~2 ms. So this process imports the math
stack once, then forks one long-lived *slot worker* per concurrent slot. A slot worker serves runs
one at a time over its own socket (4-byte length + JSON frames); for each run it:

1. enters a fresh mount namespace and mounts a private, size-capped tmpfs on ``/tmp`` (the run's
   cwd and only writable place), writes the request's files there, owned by the slot's uid;
2. forks the *run child*, which sets rlimits, drops to the slot's unprivileged uid (so
   RLIMIT_NPROC counts, and it can signal neither the zygote, nor other slots, nor the server,
   which lives outside the pid namespace), and ``exec``s the code in a clean ``__main__``;
3. collects stdout/stderr (capped), enforces the wall-clock limit, then kills *every* process of
   the slot's uid (``kill(-1)`` from that uid catches ``setsid``/double-fork escapes), reads
   ``fetch_files`` and unmounts the tmpfs, so nothing survives into the next run.

The run child is a fork of the worker, never the other way round, so user code cannot change the
state the next run starts from. Isolation from the host (no network, read-only minimal filesystem,
pid namespace) is the job of bubblewrap around this process (see ``sandbox/isolation.py``).

Usage: python _zygote.py '<json config>' — fds named in the config are the slot sockets.
"""

import base64
import ctypes
import io
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
HEADER = struct.Struct("!I")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def unshare(flags):
    _check(_libc.unshare(flags), "unshare")


def mount(src, target, fstype, flags, data):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), "mount " + target)


def umount(target):
    _check(_libc.umount2(target.encode(), MNT_DETACH), "umount " + target)


def prctl(option, value):
    _check(_libc.prctl(option, value, 0, 0, 0), "prctl")


# -- framing ----------------------------------------------------------------------------------
def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock):
    head = recv_exact(sock, HEADER.size)
    if head is None:
        return None
    body = recv_exact(sock, HEADER.unpack(head)[0])
    return None if body is None else json.loads(body)


def send_frame(sock, obj):
    body = json.dumps(obj).encode()
    sock.sendall(HEADER.pack(len(body)) + body)


# -- helpers -----------------------------------------------------------------------------------
def vm_size_bytes():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


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


def kill_uid(uid):
    """Send SIGKILL to every process of ``uid``, from that uid, so nothing else can be hit."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for _ in range(3):  # a fork bomb may respawn while we sweep; NPROC bounds it
                os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except BaseException:
            os._exit(2)
        os._exit(0)
    os.waitpid(pid, 0)


def kill_all(uid):
    """Kill and reap the whole process tree of a run (we are its subreaper)."""
    for _ in range(100):
        kill_uid(uid)
        reap_all()
        if not has_children():
            return


def reap_all():
    """Reap orphans re-parented to us (we are a child subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def has_children():
    try:
        with open("/proc/self/task/%d/children" % os.getpid()) as fh:
            return bool(fh.read().strip())
    except OSError:
        return True  # unknown: assume the worst and sweep


# -- the run child -----------------------------------------------------------------------------
def run_child(req, cfg, uid, workdir, code_path, stdin_fd, out_w, err_w):
    """In the forked child: confine, drop privileges, run the code. Never returns."""
    rc = 125
    try:
        os.setsid()
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 4096)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        limits = req["limits"]
        cpu = int(limits["cpu_s"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        as_bytes = cfg["baseline_vm"] + limits["memory_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize"], limits["fsize"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["nofile"], limits["nofile"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if cfg["drop_uid"]:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update(
            PATH="/usr/local/bin:/usr/bin:/bin",
            HOME=workdir,
            TMPDIR=workdir,
            LANG="C.UTF-8",
            OPENBLAS_NUM_THREADS="1",
            OMP_NUM_THREADS="1",
            MPLBACKEND="Agg",
        )
        if req["language"] == "bash":
            os.execv("/bin/bash", ["bash", code_path])
        rc = exec_python(code_path)
    except BaseException:
        try:
            os.write(2, traceback.format_exc().encode())
        except OSError:
            pass
    os._exit(rc)


def exec_python(code_path):
    """Run ``code_path`` as ``__main__`` like ``python file.py``; return the exit status."""
    import builtins
    import types

    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), "utf-8")
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), "utf-8", errors="backslashreplace"
    )
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), "utf-8", errors="backslashreplace", line_buffering=True
    )
    sys.argv = [code_path]
    sys.path[0] = os.path.dirname(code_path)
    if "numpy" in sys.modules:  # numpy's global RNG state was made once, in the zygote
        sys.modules["numpy"].random.seed()
    main = types.ModuleType("__main__")
    main.__file__ = code_path
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    rc = 0
    try:
        with open(code_path, "rb") as fh:
            source = fh.read()
        exec(compile(source, code_path, "exec"), main.__dict__)
    except SystemExit as exc:
        rc = exit_status(exc)
    except BaseException as exc:
        rc = 1
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        traceback.print_exception(type(exc), exc, tb)
    try:
        import threading

        threading._shutdown()
        import atexit

        atexit._run_exitfuncs()
    except SystemExit as exc:
        rc = exit_status(exc)
    except BaseException:
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            rc = rc or 120
    return rc


def exit_status(exc):
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(str(code) + "\n")
    except BaseException:
        pass
    return 1


# -- the slot worker ---------------------------------------------------------------------------
def run_one(req, cfg, slot, uid):
    limits = req["limits"]
    if cfg["mountns"]:
        workdir = "/tmp"
        unshare(CLONE_NEWNS)
        mount(
            "tmpfs",
            workdir,
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            "size=%d,mode=0700,uid=%d,gid=%d" % (limits["scratch_bytes"], uid, uid),
        )
    else:
        workdir = os.path.join(cfg["scratch_root"], "slot%d" % slot)
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        os.chown(workdir, uid, uid)
    try:
        return execute(req, cfg, uid, workdir)
    finally:
        if cfg["mountns"]:
            umount(workdir)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def execute(req, cfg, uid, workdir):
    limits = req["limits"]
    for path, content in (req.get("files") or {}).items():
        target = resolve(workdir, path)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        if not inside(workdir, parent):
            raise ValueError("file path escapes the scratch dir: %r" % path)
        with open(target, "wb") as fh:
            fh.write(base64.b64decode(content) if content else b"")
        d = target
        while d != workdir:
            os.chown(d, uid, uid)
            d = os.path.dirname(d)
    ext = ".sh" if req["language"] == "bash" else ".py"
    code_path = os.path.join(workdir, "main" + ext)
    with open(code_path, "w", encoding="utf-8") as fh:
        fh.write(req["code"])
    os.chown(code_path, uid, uid)

    stdin_fd = os.memfd_create("stdin") if req.get("stdin") else os.open("/dev/null", os.O_RDONLY)
    if req.get("stdin"):
        os.write(stdin_fd, req["stdin"].encode())
        os.lseek(stdin_fd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        run_child(req, cfg, uid, workdir, code_path, stdin_fd, out_w, err_w)
    for fd in (stdin_fd, out_w, err_w):
        os.close(fd)
    cap = limits["output_cap"]
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = [out_r, err_r]
    pidfd = os.pidfd_open(pid)
    deadline = start + req["run_timeout"]
    status = None
    timed_out = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([*open_fds, pidfd], [], [], remaining)
        for fd in ready:
            if fd == pidfd:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
            elif len(bufs[fd]) < cap:
                bufs[fd] += chunk[: cap - len(bufs[fd])]
        if pidfd in ready:
            _, status = os.waitpid(pid, 0)
            break
    elapsed = time.monotonic() - start
    os.close(pidfd)
    if timed_out or has_children():
        kill_all(uid)
    # every writer is dead now: drain what is left in the pipes
    for fd in open_fds:
        os.set_blocking(fd, False)
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                if len(bufs[fd]) < cap:
                    bufs[fd] += chunk[: cap - len(bufs[fd])]
        except BlockingIOError:
            pass
    os.close(out_r)
    os.close(err_r)
    if timed_out:
        return_code = None
    elif os.WIFSIGNALED(status):
        return_code = -os.WTERMSIG(status)
    else:
        return_code = os.WEXITSTATUS(status)
    fetched = {}
    budget = limits["fetch_bytes"]
    for path in req.get("fetch_files") or []:
        try:
            target = resolve(workdir, path)
            if not inside(workdir, target):
                continue
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                data = fh.read(budget + 1)
        except (OSError, ValueError):
            continue
        if len(data) > budget:
            continue
        budget -= len(data)
        fetched[path] = base64.b64encode(data).decode()
    return {
        "status": "TimeLimitExceeded" if timed_out else "Finished",
        "return_code": return_code,
        "execution_time": elapsed,
        "stdout": bufs[out_r].decode("utf-8", "replace"),
        "stderr": bufs[err_r].decode("utf-8", "replace"),
        "files": fetched,
    }


def worker_main(cfg, slot, fd):
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    uid = cfg["base_uid"] + slot
    sock = socket.socket(fileno=fd)
    for other in cfg["fds"]:
        if other != fd:
            os.close(other)
    while True:
        req = recv_frame(sock)
        if req is None:
            os._exit(0)
        try:
            resp = run_one(req, cfg, slot, uid)
        except Exception as exc:
            resp = {"error": "%s: %s" % (type(exc).__name__, exc)}
        send_frame(sock, resp)


def probe(cfg):
    """Report what isolation works from here (run by sandbox/isolation.py at server start)."""
    out = {"euid": os.geteuid(), "python": sys.version.split()[0]}
    if cfg.get("unshare_net"):
        try:
            unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
            out["unshare_net"] = True
        except OSError as exc:
            out["unshare_net"] = False
            out["unshare_error"] = str(exc)
    try:
        out["net_ifaces"] = sorted(name for _, name in socket.if_nameindex())
    except OSError:
        out["net_ifaces"] = []
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        result = {}
        try:
            unshare(CLONE_NEWNS)
            mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1048576,mode=0700")
            result["mountns"] = True
        except OSError as exc:
            result["mountns"] = False
            result["mountns_error"] = str(exc)
        try:
            uid = cfg["base_uid"]
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            result["setuid"] = os.getuid() == uid
        except OSError as exc:
            result["setuid"] = False
            result["setuid_error"] = str(exc)
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as fh:
        out.update(json.loads(fh.read() or "{}"))
    out["preloaded"] = []
    for name in cfg.get("preload", []):
        try:
            __import__(name)
            out["preloaded"].append(name)
        except Exception:
            pass
    print(json.dumps(out))


def main():
    if sys.argv[1] == "--probe":
        probe(json.loads(sys.argv[2]))
        return
    cfg = json.loads(sys.argv[1])
    if cfg.get("unshare_net"):  # "unshare" mode: no bubblewrap around us, do what we can
        unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    loaded = []
    for name in cfg["preload"]:
        try:
            __import__(name)
            loaded.append(name)
        except Exception:
            pass
    cfg["baseline_vm"] = vm_size_bytes()
    # Report readiness on the first slot socket, then fork the slot workers.
    info = {
        "ready": True,
        "python": sys.version.split()[0],
        "preloaded": loaded,
        "baseline_vm": cfg["baseline_vm"],
    }
    os.write(cfg["fds"][0], json.dumps(info).encode() + b"\n")
    workers = {}

    def spawn(slot):
        pid = os.fork()
        if pid == 0:
            try:
                worker_main(cfg, slot, cfg["fds"][slot])
            finally:
                os._exit(1)
        workers[pid] = slot

    for slot in range(len(cfg["fds"])):
        spawn(slot)
    while True:  # re-fork any worker that dies, so a slot never goes dark
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            return
        slot = workers.pop(pid, None)
        if slot is not None:
            spawn(slot)


if __name__ == "__main__":
    main()
