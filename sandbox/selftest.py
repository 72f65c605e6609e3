"""The self-test every isolation mode passes at start, before it serves one call.

A mode's probe (``sandbox/isolation.py``) says what the kernel *accepted*; it cannot say what the
kernel then did. gVisor of 2022 returns 0 from ``unshare(CLONE_NEWNS)`` and shares every mount
anyway, and which namespaces a newer gVisor honours depends on a version Modal does not publish.
So each mode proves, through the very path user code takes (a real call on a real slot), that:

- ``mount``: what a call writes in its private places (``/tmp``, ``/var/tmp``, ``/dev/shm``, its
  working directory, all per-run mounts in the namespace modes) is not there for the process
  that started the sandbox: a mount made in the child is invisible to the parent, whatever
  ``unshare`` returned;
- ``network``: the call reaches none of this host's own addresses (a listener on each
  non-loopback address, and one on 127.0.0.1), the cluster's addresses it is given
  (``Settings.selftest_targets``: the Ray head, the other nodes) or the internet;
- ``hidden``: no ``/dev/nvidia*``, no ``/__modal``, none of the volumes' mount paths;
- ``secrets``: no variable named like a secret in its environment, or in any process
  environment it can read;
- ``leftover``: a file or a process left by one call is gone for the next one, on the same slot
  and on every other (the slots are used in turn).

Any failure refuses the mode with one line, ``self-test failed: <check>: <what was seen>``
(:class:`SelfTestFailed`); the caller then tries the next mode or stops. Only a ``none`` asked
for by name starts anyway (it isolates nothing by definition, and says so). Where the process
running the test is not the one whose files the sandbox must hide (the node in front of remote
sandboxes, ``sandbox/fleet.py``), ``mount`` and ``leftover`` are each sandbox's own start-up
test, and the node runs the rest (:data:`REMOTE_CHECKS`).

Standard library only: this module also runs inside the Modal Sandboxes' worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import socket
import struct
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.isolation import IsolationUnavailable
from sandbox.settings import Settings

log = logging.getLogger("sandbox.selftest")

CHECKS = ("mount", "network", "hidden", "secrets", "leftover")
REMOTE_CHECKS = ("network", "hidden", "secrets")  # what a caller outside the sandbox can check
# Where a call may write, and which must be its own: per-run tmpfs views in the namespace modes.
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# What must not be visible inside: Modal's own directory and the volumes' mount paths
# (recipe/retool/core/paths.py: DATA_MOUNT, MODELS_MOUNT, CHECKPOINTS_MOUNT; a test keeps them
# equal).
HIDDEN_PATHS = ("/__modal", "/data", "/models", "/checkpoints")
# Public addresses a call must not reach; unreachable from this host too is fine (it proves less,
# and the host's own listeners are the check that always bites).
INTERNET = (("1.1.1.1", 443), ("8.8.8.8", 53))
SECRET_NAME = r"TOKEN|SECRET|PASSW|CREDENTIAL|_KEY|AUTH"
CONNECT_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 20.0
SIOCGIFADDR = 0x8915

Runner = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]  # worker request -> worker reply


class SelfTestFailed(IsolationUnavailable):
    """One check failed; ``check`` names it."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"self-test failed: {check}: {detail}")
        self.check = check


@dataclass(frozen=True)
class SelfTestReport:
    """What passed, and which targets the network check tried."""

    passed: tuple[str, ...]
    targets: tuple[str, ...]

    def summary(self) -> str:
        return f"self-test passed: {', '.join(self.passed)} ({len(self.targets)} addresses tried)"


# The call's side: user code, as the model's would run (stdin: this test's JSON config).
PROBE = r"""
import glob, json, os, re, socket, sys, threading
cfg = json.loads(sys.stdin.read())
out = {}
if cfg["phase"] == "plant":
    written = set()
    for d in cfg["dirs"] + [os.getcwd(), os.environ.get("HOME") or os.getcwd()]:
        path = os.path.join(d, cfg["marker"])
        try:
            with open(path, "w") as fh:
                fh.write("left by a self-test call")
            written.add(os.path.abspath(path))
        except OSError:
            pass
    out["written"] = sorted(written)
    pid = os.fork()  # a daemon that outlives the call, unless the sandbox kills it
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)",
                                      cfg["marker"]])
        os._exit(0)
    os.waitpid(pid, 0)
else:
    out["found"] = [p for p in cfg["paths"] if os.path.lexists(p)]
    procs = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(d + "/cmdline", "rb") as fh:
                if cfg["marker"].encode() in fh.read():
                    procs.append(d)
        except OSError:
            pass
    out["procs"] = procs
    if cfg["full"]:
        out["hidden"] = [p for p in cfg["hidden"] if os.path.lexists(p)]
        out["hidden"] += sorted(glob.glob("/dev/nvidia*"))
        secret = re.compile(cfg["secret"], re.I)
        leaks = sorted("own environment: " + k for k in os.environ if secret.search(k))
        for d in glob.glob("/proc/[0-9]*"):
            try:
                with open(d + "/environ", "rb") as fh:
                    names = [e.split(b"=", 1)[0].decode("latin-1") for e in fh.read().split(b"\0")]
            except OSError:
                continue
            leaks += [d + "/environ: " + n for n in names if n and secret.search(n)]
        out["secrets"] = leaks
        reached = []
        def attempt(host, port):
            try:
                with socket.create_connection((host, port), timeout=cfg["timeout"]):
                    reached.append(("[%s]:%d" if ":" in host else "%s:%d") % (host, port))
            except OSError:
                pass
        threads = [threading.Thread(target=attempt, args=tuple(t)) for t in cfg["targets"]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["reached"] = sorted(reached)
print(json.dumps(out))
"""


def worker_request(settings: Settings, code: str, stdin: str) -> dict[str, Any]:
    """A python call as ``sandbox.executor`` builds it, with the server's default limits."""
    return {
        "language": "python",
        "code": code,
        "stdin": stdin,
        "files": {},
        "fetch_files": [],
        "run_timeout": PROBE_TIMEOUT_S,
        "limits": settings.run_limits(PROBE_TIMEOUT_S, settings.memory_mb),
    }


def host_addresses() -> list[str]:
    """This host's own non-loopback addresses: the IPv4 one of each interface, and the global
    IPv6 ones (``/proc/net/if_inet6``; link-local ones need a scope and are skipped)."""
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock, SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            found.append(socket.inet_ntoa(raw[20:24]))
    try:
        rows = [line.split() for line in Path("/proc/net/if_inet6").read_text().splitlines()]
    except OSError:
        rows = []
    for row in rows:
        if len(row) >= 4 and row[3] == "00":  # scope: global
            found.append(str(ipaddress.IPv6Address(bytes.fromhex(row[0]))))
    return [a for a in dict.fromkeys(found) if not ipaddress.ip_address(a).is_loopback]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_targets(text: str) -> list[tuple[str, int]]:
    """``host:port,[v6]:port`` (``Settings.selftest_targets``) as pairs."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"self-test target {item!r}: expected host:port")
        pairs.append((host.strip("[]"), int(port)))
    return pairs


class Listeners:
    """A TCP listener on each of this host's addresses (and 127.0.0.1): the parent's own
    evidence of a connection, whatever the call reports."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self.socks: list[socket.socket] = []
        for addr in addresses:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.bind((addr, 0))
                sock.listen(16)
            except OSError:  # an address we may not bind (e.g. a tentative IPv6 one)
                sock.close()
                continue
            sock.setblocking(False)
            self.socks.append(sock)

    @property
    def targets(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for sock in self.socks]

    def accepted(self) -> list[str]:
        """``addr:port`` of each listener something connected to."""
        hit = []
        for sock in self.socks:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                continue
            conn.close()
            hit.append(_address(*sock.getsockname()[:2]))
        return hit

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


async def _probe(run: Runner, settings: Settings, check: str, cfg: dict[str, Any]) -> dict:
    """One call of :data:`PROBE`; a call that did not finish cleanly fails ``check``."""
    try:
        reply = await run(worker_request(settings, PROBE, json.dumps(cfg)))
    except Exception as exc:  # the sandbox failed the call: the mode does not work
        raise SelfTestFailed(check, f"the test call failed: {exc}") from None
    lines = (reply.get("stdout") or "").strip().splitlines()
    if reply.get("status") != "Finished" or reply.get("return_code") != 0 or not lines:
        tail = (reply.get("stderr") or "").strip().splitlines()[-1:] or [""]
        raise SelfTestFailed(
            check,
            f"the test call ended {reply.get('status')} rc {reply.get('return_code')}: {tail[0]}",
        )
    return json.loads(lines[-1])


def _visible_here(marker: str, written: list[str]) -> list[str]:
    """Which of the call's files this process sees: at the paths the call wrote, or anywhere
    under the private directories (a view bound elsewhere)."""
    seen = [path for path in written if os.path.lexists(path)]
    for top in PRIVATE_DIRS:
        for root, dirs, files in os.walk(top):
            if marker in files or marker in dirs:
                seen.append(str(Path(root) / marker))
            if root.count(os.sep) - top.count(os.sep) >= 2:
                dirs[:] = []  # three levels are enough for the sandbox's own scratch
    return sorted(set(seen))


async def self_test(
    run: Runner, settings: Settings, slots: int, checks: Iterable[str] = CHECKS
) -> SelfTestReport:
    """Run ``checks`` through ``run``; raise :class:`SelfTestFailed` at the first failing one.

    ``slots``: how many calls may run at once behind ``run``; that many follow the planting
    call one after another, so every slot (the planting one last) shows what it kept.
    """
    wanted = tuple(c for c in CHECKS if c in set(checks))
    marker = f"selftest-{uuid.uuid4().hex}"
    listeners = Listeners([*host_addresses(), "127.0.0.1", "::1"])
    targets = [*listeners.targets, *parse_targets(settings.selftest_targets), *INTERNET]
    written: list[str] = []
    try:
        if "mount" in wanted or "leftover" in wanted:
            planted = await _probe(
                run, settings, "mount", {"phase": "plant", "marker": marker, "dirs": PRIVATE_DIRS}
            )
            written = planted["written"]
        if "mount" in wanted:
            seen = _visible_here(marker, written)
            if seen:
                raise SelfTestFailed(
                    "mount", f"{seen[0]}, written by a call, is visible outside it"
                )
        check = {
            "phase": "check",
            "marker": marker,
            "paths": written,
            "full": True,
            "hidden": HIDDEN_PATHS,
            "secret": SECRET_NAME,
            "targets": targets,
            "timeout": CONNECT_TIMEOUT_S,
        }
        first = await _probe(run, settings, "network", check)
        reached = sorted({*first["reached"], *listeners.accepted()})
        if "network" in wanted and reached:
            raise SelfTestFailed("network", f"a call reached {', '.join(reached)}")
        if "hidden" in wanted and first["hidden"]:
            raise SelfTestFailed("hidden", f"a call sees {', '.join(first['hidden'])}")
        if "secrets" in wanted and first["secrets"]:
            raise SelfTestFailed("secrets", f"a call sees {first['secrets'][0]}")
        if "leftover" in wanted:
            later = [first] + [
                await _probe(run, settings, "leftover", {**check, "full": False})
                for _ in range(max(slots, 1) - 1)
            ]
            for seen in later:
                if seen["found"]:
                    raise SelfTestFailed(
                        "leftover", f"{seen['found'][0]}, left by one call, is there for another"
                    )
                if seen["procs"]:
                    raise SelfTestFailed(
                        "leftover", "a process started by one call is still running in another"
                    )
    finally:
        listeners.close()
        for path in _visible_here(marker, written):  # a mode that failed left them here
            with contextlib.suppress(OSError):
                Path(path).unlink()
    return SelfTestReport(wanted, tuple(_address(h, p) for h, p in targets))
