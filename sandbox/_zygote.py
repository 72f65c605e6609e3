"""The warm zygote: runs *inside* the sandbox, under the sandbox's own python (stdlib only here).

Why a zygote: a fresh interpreter costs 15-170 ms here and importing numpy+sympy another ~200 ms;
``fork()`` of an interpreter that already did both costs ~2 ms. So this process imports the math
stack once, then forks one long-lived *slot worker* per concurrent slot. A slot worker serves runs
one at a time over its own socket (4-byte length + JSON frames). Per run:

1. *Ahead of the request* (``prepare``): the worker enters a fresh mount namespace, mounts a
   private, size-capped tmpfs on ``/tmp`` (the run's cwd and only writable place) and forks the
   *run child*, which readies stdio, env, cwd and a clean ``__main__`` and blocks on a "go" pipe.
2. On the request (``execute``): the worker writes the files and code (owned by the slot's uid)
   and stdin, and sends "go" with the limits; the child sets rlimits, drops to the slot's
   unprivileged uid (so RLIMIT_NPROC counts, and it can signal neither the zygote, nor other
   slots, nor the server, which lives outside the pid namespace) and runs the code. The worker
   collects stdout/stderr (capped), enforces the wall-clock limit, reads ``fetch_files``, replies.
3. After the reply (``cleanup``): kill the child and *every* process of the slot's uid
   (``kill(-1)`` from that uid catches ``setsid``/double-fork escapes), reap, unmount; only then
   is the next child prepared, so nothing of this run survives into the next. A child is used once.

The run child is a fork of the worker, never the other way round, so user code cannot change the
state the next run starts from. Isolation from the host (no network, read-only minimal filesystem,
pid namespace) is the job of bubblewrap around this process, or, in ``unshare`` mode, of
``enter_sandbox`` below, which builds the same root itself (see ``sandbox/isolation.py``).

Usage: python _zygote.py '<json config>' — fds named in the config are the slot sockets.
"""

import base64
import ctypes
import errno
import gc
import io
import json
import os
import resource
import select
import signal
import site
import socket
import stat
import struct
import sys
import time
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
IPC_RMID = 0
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
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


def try_mount(src, target, fstype, flags, data):
    """``mount``, False where this kernel refuses it with EINVAL (gVisor of 2022: recursive binds,
    remounts, propagation of a whole tree)."""
    try:
        mount(src, target, fstype, flags, data)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    return True


def umount(target):
    _check(_libc.umount2(target.encode(), MNT_DETACH), "umount " + target)


def prctl(option, value):
    _check(_libc.prctl(option, value, 0, 0, 0), "prctl")


def prctl_args(option, arg2, arg3):
    _check(_libc.prctl(option, arg2, arg3, 0, 0), "prctl")


# -- seccomp ---------------------------------------------------------------------------------
# What user code may not do, even with no capabilities: create namespaces (an unprivileged user
# namespace hands out every capability inside it, and with a network namespace the netfilter
# and friends behind most kernel exploits), mount, and a few syscalls math code never needs but
# kernel exploits love (bpf, userfaultfd, perf_event_open, keyrings, io_uring, POSIX mqueues,
# which would outlive the run in the slot's IPC namespace). EPERM, as if unprivileged.
# clone3 passes its flags in memory a filter cannot read: ENOSYS makes glibc fall back to clone.
SECCOMP_ARCH = {  # machine: (AUDIT_ARCH, clone, clone3, {name: nr} of the refused syscalls)
    "x86_64": (
        0xC000003E,
        56,
        435,
        dict(unshare=272, setns=308, mount=165, umount2=166, pivot_root=155, bpf=321,
             userfaultfd=323, perf_event_open=298, add_key=248, request_key=249, keyctl=250,
             mq_open=240, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
             open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
             mount_setattr=442),
    ),
    "aarch64": (
        0xC00000B7,
        220,
        435,
        dict(unshare=97, setns=268, mount=40, umount2=39, pivot_root=41, bpf=280,
             userfaultfd=282, perf_event_open=241, add_key=217, request_key=218, keyctl=219,
             mq_open=180, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
             open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
             mount_setattr=442),
    ),
}  # fmt: skip
CLONE_NS_FLAGS = 0x7E020000  # CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET}
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


def seccomp_program(machine):
    """The classic-BPF filter for ``machine`` as bytes, or None if we do not know its table."""
    if machine not in SECCOMP_ARCH:
        return None
    arch, clone, clone3, refused = SECCOMP_ARCH[machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, enosys = 0x7FFF0000, 0x00050000 | errno.ENOSYS
    eperm = 0x00050000 | errno.EPERM
    prog = [(ld, 4), (jeq, arch, 1, 0), (ret, enosys), (ld, 0)]  # another ABI (i386, x32): no
    if machine == "x86_64":
        prog += [(jge, 0x40000000, 0, 1), (ret, enosys)]
    for nr in sorted(refused.values()):
        prog += [(jeq, nr, 0, 1), (ret, eperm)]
    prog += [(jeq, clone3, 0, 1), (ret, enosys), (jeq, clone, 0, 3)]
    prog += [(ld, 16), (jset, CLONE_NS_FLAGS, 0, 1), (ret, eperm), (ret, allow)]
    out = b""
    for ins in prog:
        code, k, jt, jf = (*ins, 0, 0)[:4]
        out += struct.pack("=HBBI", code, jt, jf, k)
    return out


def install_seccomp():
    """Load the filter into this process (needs no_new_privs); False where unsupported."""
    prog = seccomp_program(os.uname().machine)
    if prog is None:
        return False
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    prctl_args(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fbuf))
    return True


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


def loopback_up():
    """Bring ``lo`` up in a fresh network namespace (it starts down), as bubblewrap does.

    gVisor's starts up already and refuses SIOCSIFFLAGS (ENOTTY): set the flag only if missing."""
    import fcntl

    ifreq = struct.Struct("16sH22x")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = ifreq.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, ifreq.pack(b"lo", 0)))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(s, SIOCSIFFLAGS, ifreq.pack(b"lo", flags | IFF_UP))


def clear_sysv_ipc():
    """Remove every SysV shm segment, message queue and semaphore set of this IPC namespace.

    They belong to no process, so killing the run leaves them behind (state and memory for the
    next run). Each slot has its own IPC namespace and the run is dead: all of them are its.
    """
    removers = (
        ("shm", lambda i: _libc.shmctl(i, IPC_RMID, None)),
        ("msg", lambda i: _libc.msgctl(i, IPC_RMID, None)),
        ("sem", lambda i: _libc.semctl(i, 0, IPC_RMID)),
    )
    for kind, remove in removers:
        try:
            with open("/proc/sysvipc/" + kind) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            remove(int(row.split()[1]))


def kill_uid(uid):
    """Send SIGKILL to every process of ``uid``, from that uid, so nothing else can be hit;
    False if there was none (zombies not yet reaped count as there)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for _ in range(3):  # a fork bomb may respawn while we sweep; NPROC bounds it
                os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            os._exit(3)
        except BaseException:
            os._exit(2)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 3


def kill_children():
    """SIGKILL our direct children; whether there were any. Without a uid of its own (modes
    without root) a run cannot be swept by uid; as we are a child subreaper, its orphans become
    our children in turn."""
    try:
        with open("/proc/self/task/%d/children" % os.getpid()) as fh:
            pids = [int(p) for p in fh.read().split()]
    except OSError:
        return False
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return bool(pids)


def kill_all(uid):
    """Kill and reap the whole process tree of a run (we are its subreaper); {pid: status}.

    ``uid`` None: the run shares our uid (no per-run uid here), so kill by descent instead.
    Where we cannot be a subreaper (gVisor of 2022) orphans go to an ancestor, which reaps
    them: the sweep goes on until none of the uid is left.
    """
    reaped = {}
    for _ in range(100):
        found = kill_uid(uid) if uid is not None else kill_children()
        reaped.update(reap_all())
        if not has_children() and not (found and not SUBREAPER["held"]):
            break
    return reaped


def stragglers():
    """Whether processes of the run may be left: our children, or (no subreaper) anyone's."""
    return has_children() or not SUBREAPER["held"]


def reap_all():
    """Reap orphans re-parented to us (we are a child subreaper); {pid: status}."""
    reaped = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped[pid] = status


def has_children():
    """Whether any child, running or exited, is not reaped yet (reaps none; gVisor has no
    /proc/<pid>/task/<tid>/children)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


# -- unshare mode: the sandbox bubblewrap builds, built here --------------------------------------
NEW_ROOT = "/tmp"  # staging: a tmpfs over /tmp in our own mount namespace becomes the root
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
)
RO_REMOUNT = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
READONLY = {"held": True}  # False once this kernel refused to make a mount read-only


def remount_ro(point):
    """Make the mount at ``point`` read-only; where the kernel cannot (gVisor of 2022 has no
    remount), note it: the probe reports it and the mode is not called secure."""
    if not try_mount(None, point, None, RO_REMOUNT, None):
        READONLY["held"] = False


def ro_bind(src, dst):
    """Show host path ``src`` at ``dst``, read-only, with every mount below it (bwrap --ro-bind)."""
    if not try_mount(src, dst, None, MS_BIND | MS_REC, None):
        mount(src, dst, None, MS_BIND, None)  # gVisor of 2022: no recursive binds
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    for point in points:
        if point == dst or point.startswith(dst + "/"):
            remount_ro(point)


def build_root(layout):
    """Mount a tmpfs over ``NEW_ROOT`` holding only ``layout`` (read-only binds and symlinks of
    the host's system directories, interpreter and site dirs, from sandbox/isolation.py), a
    minimal /dev, our own /proc, and empty /tmp, /var/tmp and /dev/shm (each run mounts its own);
    then make it the root."""
    new = NEW_ROOT
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for src in layout["binds"]:
        dst = new + src
        os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
        if os.path.isdir(src):
            os.mkdir(dst, 0o755)
        else:
            os.close(os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644))
        ro_bind(src, dst)
    for target, path in layout["symlinks"]:
        os.symlink(target, new + path)
    dev = new + "/dev"
    os.mkdir(dev, 0o755)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0755")
    for name in DEV_NODES:
        if os.path.exists("/dev/" + name):
            os.close(os.open(dev + "/" + name, os.O_WRONLY | os.O_CREAT, 0o644))
            mount("/dev/" + name, dev + "/" + name, None, MS_BIND, None)
    for target, name in DEV_LINKS:
        os.symlink(target, dev + "/" + name)
    for path in ("/dev/shm", "/tmp", "/var/tmp", "/proc"):
        os.makedirs(new + path, 0o755)
    mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    os.chdir(new)
    pivot_root = SECCOMP_ARCH.get(os.uname().machine, (0, 0, 0, {}))[3].get("pivot_root")
    if pivot_root is not None and _libc.syscall(pivot_root, b".", b".") == 0:
        umount(".")  # the old root, stacked on the new one: the host is gone from this namespace
    else:  # gVisor of 2022 has no pivot_root; only our root-run code could leave a chroot
        _check(_libc.chroot(b"."), "chroot")
    os.chdir("/")
    remount_ro("/")
    remount_ro("/dev")


def check_mount_ns():
    """Raise unless a mount made in a new mount namespace stays in it. gVisor of 2022 accepts
    ``unshare(CLONE_NEWNS)`` but every process keeps seeing every mount: runs would share one
    /tmp and the sandbox's root would cover the server's. Tried on a fresh empty directory."""
    import tempfile

    where = tempfile.mkdtemp(prefix="sandbox-mountns-")
    try:
        pid = os.fork()
        if pid == 0:
            try:
                unshare(CLONE_NEWNS)
                mount("tmpfs", where, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k")
                os.close(os.open(where + "/inside", os.O_WRONLY | os.O_CREAT, 0o600))
                os._exit(0)
            except BaseException:
                os._exit(1)
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
            raise OSError(errno.EPERM, "no mount namespace with a tmpfs")
        if os.path.exists(where + "/inside"):
            umount(where)
            raise OSError(errno.EPERM, "mounts made in a new mount namespace show outside it")
    finally:
        os.rmdir(where)


def enter_sandbox(cfg):
    """``unshare`` mode: do what bubblewrap does around the zygote in ``bwrap`` mode.

    New mount, pid, network, IPC and UTS namespaces; this process stays outside the pid namespace
    and only waits (as bwrap's does), its child is pid 1 there, builds the root and goes on as the
    zygote. Dies with the server (``--die-with-parent``); the namespace dies with its pid 1."""
    os.umask(0o022)
    check_mount_ns()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    _check(_libc.sethostname(b"sandbox", 7), "sethostname")
    pid = os.fork()
    if pid:
        for fd in cfg.get("fds", []):
            os.close(fd)  # the server sees the slots close when the zygote dies
        status = os.waitpid(pid, 0)[1]
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()
    if not try_mount(None, "/", None, MS_REC | MS_PRIVATE, None):
        mount(None, "/", None, MS_PRIVATE, None)  # gVisor of 2022: one mount at a time
    build_root(cfg["root"])


# -- the run child -----------------------------------------------------------------------------
def run_child(cfg, uid, workdir, code_path, fds):
    """In the pre-forked child: get ready as root, wait for "go", confine, run. Never returns.

    Everything that does not depend on the request happens *before* the request exists; only the
    per-request limits, the uid drop and the user's code come after "go".
    """
    rc = 125
    go_r, status_w = fds["go_r"], fds["status_w"]
    try:
        os.setsid()
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # A read-only descriptor of its own (own offset) on the worker's stdin memfd: the worker
        # fills it after "go" is decided, the run can only read it.
        stdin_fd = os.open("/proc/self/fd/%d" % fds["stdin_w"], os.O_RDONLY)
        os.dup2(stdin_fd, 0)
        os.dup2(fds["out_w"], 1)
        os.dup2(fds["err_w"], 2)
        low = 3
        for keep in sorted((go_r, status_w)):
            os.closerange(low, keep)
            low = keep + 1
        os.closerange(low, 4096)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
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
        prepare_python(code_path)
        go = b""
        while True:  # the worker writes one small JSON line, or closes the pipe: never ran
            chunk = os.read(go_r, 65536)
            if not chunk:
                break
            go += chunk
            if go.endswith(b"\n"):
                break
        os.close(go_r)
        if not go.endswith(b"\n"):
            os._exit(0)
        req = json.loads(go)
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
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the kernel clears it on a uid change
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        if cfg.get("seccomp"):
            install_seccomp()
        if req["language"] == "bash":  # status_w is close-on-exec
            os.execv("/bin/bash", ["bash", os.path.join(workdir, "main.sh")])
        rc = exec_python(code_path, status_w)
    except BaseException:
        try:
            os.write(2, traceback.format_exc().encode())
        except OSError:
            pass
    os._exit(rc)


def prepare_python(code_path):
    """Set up a clean ``__main__`` and stdio, like ``python file.py`` would (before "go")."""
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


def exec_python(code_path, status_w):
    """Run ``code_path`` in the prepared ``__main__``; report and return the exit status."""
    me = os.getpid()
    rc = 0
    try:
        with open(code_path, "rb") as fh:
            source = fh.read()
        exec(compile(source, code_path, "exec"), sys.modules["__main__"].__dict__)
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
    if os.getpid() == me:  # not a fork of the user's that fell off the end of the code
        # Close our ends of stdout/stderr, then say we are done: the worker can answer as soon
        # as the pipes are drained, without waiting for this (large) process to be torn down.
        # The code could write this line itself, but it controls its exit status anyway; the
        # worker still kills the whole uid before the slot is used again.
        try:
            os.close(1)
            os.close(2)
            os.write(status_w, b"%d\n" % rc)
        except OSError:
            pass
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


MARKS = []
SUBREAPER = {"held": True}  # False where the kernel refuses PR_SET_CHILD_SUBREAPER
CHILD_POLL_S = 0.005  # without pidfd_open: how often the worker looks whether the child exited


def mark(name):
    """Phase timestamps of the current request (sent back only when ``cfg["profile"]``)."""
    MARKS.append((name, time.perf_counter()))


def worker_main(cfg, slot, fd):
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError:  # gVisor of 2022: EINVAL; see kill_all
        SUBREAPER["held"] = False
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    uid = cfg["base_uid"] + slot
    if cfg["mountns"]:
        # A network and an IPC namespace per slot: concurrent runs cannot reach each other over
        # lo, abstract UNIX sockets or SysV IPC. Within a slot, sockets die with the run's
        # processes and cleanup() removes SysV objects, so sequential runs share nothing either.
        unshare(CLONE_NEWNET | CLONE_NEWIPC)
        loopback_up()
    sock = socket.socket(fileno=fd)
    for other in cfg["fds"]:
        if other != fd:
            os.close(other)
    cgroups = cfg.pop("cgroups", None) or []
    for i, pair in enumerate(cgroups):
        if i == slot:
            cfg["cgroup"] = pair
        else:
            for other in pair:
                os.close(other)
    child = None
    while True:
        if child is None:
            try:
                child = prepare(cfg, slot, uid)
            except Exception as exc:  # retried at the next request; reported there if it fails
                child = exc
        req = recv_frame(sock)
        if req is None:
            os._exit(0)
        del MARKS[:]
        mark("recv")
        if isinstance(child, BaseException):
            try:
                child = prepare(cfg, slot, uid)
            except Exception as exc:
                child = None
                send_frame(sock, {"error": "prepare: %s: %s" % (type(exc).__name__, exc)})
                continue
        try:
            resp = execute(req, cfg, uid, child)
        except Exception as exc:
            resp = {"error": "%s: %s" % (type(exc).__name__, exc)}
        if cfg.get("profile"):
            resp["_t"] = [(n, round((t - MARKS[0][1]) * 1e3, 3)) for n, t in MARKS]
        send_frame(sock, resp)
        # Off the critical path: the reply is out. Clean up completely, then pre-fork the next.
        used, child = child, None
        cleanup(cfg, uid, used)


SYMPY_WARMUP = """
import sympy as sp
x, y = sp.symbols('x y')
sp.solve(x**3 - 6*x**2 + 11*x - 6, x)
sp.solve([x + y - 3, x - y - 1], [x, y])
sp.simplify(sp.sin(x)**2 + sp.cos(x)**2)
sp.factor(x**4 - 1); sp.expand((x + 1)**5); sp.integrate(x**2, x); sp.diff(sp.exp(x), x)
sp.nsimplify(0.5); sp.Rational(1, 3) + sp.Rational(1, 6); sp.isprime(97); sp.factorint(360)
sp.N(sp.pi, 30); sp.limit(sp.sin(x) / x, x, 0); sp.summation(x, (x, 1, 10))
"""


def warm_sympy():
    """Run typical calls once so sympy's lazy imports and caches are paid here, not per run."""
    try:
        exec(compile(SYMPY_WARMUP, "<warmup>", "exec"), {})
    except Exception:
        pass


def probe(cfg):
    """Report what isolation works from here (run by sandbox/isolation.py at server start)."""
    out = {"euid": os.geteuid(), "python": sys.version.split()[0], "pid": os.getpid()}
    out["hostname"] = socket.gethostname()
    out["readonly"] = READONLY["held"]
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
            if not cfg.get("unshare"):  # enter_sandbox checked it before it made the root
                check_mount_ns()
            unshare(CLONE_NEWNS)
            mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1048576,mode=0700")
            result["mountns"] = True
        except OSError as exc:
            result["mountns"] = False
            result["mountns_error"] = str(exc)
        try:
            unshare(CLONE_NEWNET | CLONE_NEWIPC)
            loopback_up()
            result["slot_ns"] = True
        except OSError as exc:
            result["slot_ns"] = False
            result["slot_ns_error"] = str(exc)
        try:
            uid = cfg["base_uid"]
            sub = os.fork()
            if sub == 0:  # a filter for good: in a child of its own
                try:
                    prctl(PR_SET_NO_NEW_PRIVS, 1)
                    ok = install_seccomp() and _libc.unshare(CLONE_NEWUTS) != 0
                    os._exit(0 if ok else 1)
                except BaseException:
                    os._exit(1)
            result["seccomp"] = os.waitpid(sub, 0)[1] == 0
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


def add_site_dirs(cfg):
    """SANDBOX_SITE: import dirs for user code, after the interpreter's own (.pth files too)."""
    for path in cfg.get("site", []):
        site.addsitedir(path)


def main():
    probing = sys.argv[1] == "--probe"
    cfg = json.loads(sys.argv[2] if probing else sys.argv[1])
    if cfg.get("unshare"):  # "unshare" mode: no bubblewrap around us, build its sandbox here
        try:
            enter_sandbox(cfg)
        except OSError as exc:
            if not probing:
                raise
            print(json.dumps({"euid": os.geteuid(), "sandbox_error": str(exc)}), flush=True)
            os._exit(0)
    add_site_dirs(cfg)
    if probing:
        probe(cfg)
        return
    loaded = []
    for name in cfg["preload"]:
        try:
            __import__(name)
            loaded.append(name)
        except Exception:
            pass
    if "sympy" in loaded:
        warm_sympy()
    # Everything imported so far is shared copy-on-write by every worker and run child: keep the
    # collector's hands (and so its writes) off it, or each run copies pages the GC touches.
    gc.collect()
    gc.freeze()
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
