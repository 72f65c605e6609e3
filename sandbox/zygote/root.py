"""``unshare`` mode: the sandbox bubblewrap builds, built by the zygote itself; and the network
and IPC namespaces each slot gets.

With no bubblewrap (an image without it, a gVisor that refuses it) but root, :func:`enter_sandbox`
makes new mount, pid, network, IPC and UTS namespaces and :func:`build_root` a read-only root
holding only the layout ``sandbox/isolation.py`` lists, as bubblewrap's ``--ro-bind`` does.
"""

import errno
import os
import signal
import socket
import struct

from syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    IFF_UP,
    IPC_RMID,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    PR_SET_PDEATHSIG,
    SECCOMP_ARCH,
    SIOCGIFFLAGS,
    SIOCSIFFLAGS,
    check,
    libc,
    mount,
    prctl,
    try_mount,
    umount,
    unshare,
)


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
        ("shm", lambda i: libc.shmctl(i, IPC_RMID, None)),
        ("msg", lambda i: libc.msgctl(i, IPC_RMID, None)),
        ("sem", lambda i: libc.semctl(i, 0, IPC_RMID)),
    )
    for kind, remove in removers:
        try:
            with open("/proc/sysvipc/" + kind) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            remove(int(row.split()[1]))


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
    if pivot_root is not None and libc.syscall(pivot_root, b".", b".") == 0:
        umount(".")  # the old root, stacked on the new one: the host is gone from this namespace
    else:  # gVisor of 2022 has no pivot_root; only our root-run code could leave a chroot
        check(libc.chroot(b"."), "chroot")
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
    check(libc.sethostname(b"sandbox", 7), "sethostname")
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
