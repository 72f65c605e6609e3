"""The run child: forked ahead of the request, readied as root, then confined to run user code.

Everything that does not depend on the request happens *before* it exists (stdio, environment,
working directory, a clean ``__main__``); after "go" only the request's limits, the drop to the
slot's uid, ``no_new_privs``, the seccomp filter and the user's code remain.
"""

import io
import json
import os
import resource
import signal
import sys
import traceback

from syscalls import PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, install_seccomp, prctl

# This program's directory: its modules leave ``sys.modules`` before user code runs, so the
# user's own ``run.py`` or ``root.py`` imports as it would under ``python main.py``.
HERE = os.path.dirname(os.path.abspath(__file__))


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
    for name, module in list(sys.modules.items()):
        if os.path.dirname(getattr(module, "__file__", None) or "") == HERE:
            del sys.modules[name]
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
