"""Killing and reaping every process of a run, however it tried to escape.

The slot worker is the run's child subreaper: orphans of the run (``setsid``, double forks)
become its children. Where each run has a uid of its own, ``kill(-1)`` from that uid reaches all
of them and nothing else; without one, the run's tree is killed by descent.
"""

import os
import signal

SUBREAPER = {"held": True}  # False where the kernel refuses PR_SET_CHILD_SUBREAPER


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
