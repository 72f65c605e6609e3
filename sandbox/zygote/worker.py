"""A slot worker: serves runs one at a time over its own socket (4-byte length + JSON frames).

Forked by the zygote, one per slot; it owns a network and an IPC namespace (``mountns`` modes),
a uid and, where the server made one, a cgroup. It keeps one run child prepared ahead of the next
request and cleans up completely after each reply.
"""

import json
import os
import signal
import socket
import struct

from reaping import SUBREAPER
from root import loopback_up
from run import MARKS, cleanup, execute, mark, prepare
from syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_PDEATHSIG,
    prctl,
    unshare,
)

HEADER = struct.Struct("!I")


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
