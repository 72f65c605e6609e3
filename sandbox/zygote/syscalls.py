"""The kernel calls the zygote makes through libc, and the seccomp filter user code runs under.

Stdlib only (``ctypes``): the zygote runs under the sandbox's own python. Every wrapper raises
``OSError`` with the errno and what was attempted.
"""

import ctypes
import errno
import os
import struct

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

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def check(rc, what):
    """Raise ``OSError`` (errno, ``what``) unless a libc call returned 0."""
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def unshare(flags):
    check(libc.unshare(flags), "unshare")


def mount(src, target, fstype, flags, data):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), "mount " + target)


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
    check(libc.umount2(target.encode(), MNT_DETACH), "umount " + target)


def prctl(option, value):
    check(libc.prctl(option, value, 0, 0, 0), "prctl")


def prctl_args(option, arg2, arg3):
    check(libc.prctl(option, arg2, arg3, 0, 0), "prctl")


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
