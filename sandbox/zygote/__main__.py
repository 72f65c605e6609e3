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
``root.enter_sandbox``, which builds the same root itself (see ``sandbox/isolation.py``).

Usage: python -I -B zygote '<json config>' — fds named in the config are the slot sockets; this
directory is the program (``python dir`` runs its ``__main__.py`` with ``dir`` first on
``sys.path``, so its modules import each other by name): ``syscalls`` (libc and seccomp),
``root`` (unshare mode's sandbox), ``reaping``, ``child`` (the run child), ``run`` (one run in a
slot worker), ``worker`` (the slot worker's loop) and this file (start-up and the probe).
"""

import gc
import json
import os
import site
import socket
import sys

from root import READONLY, check_mount_ns, enter_sandbox, loopback_up
from syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUTS,
    MS_NODEV,
    MS_NOSUID,
    PR_SET_NO_NEW_PRIVS,
    install_seccomp,
    libc,
    mount,
    prctl,
    unshare,
)
from worker import worker_main


def vm_size_bytes():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


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
                    ok = install_seccomp() and libc.unshare(CLONE_NEWUTS) != 0
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
