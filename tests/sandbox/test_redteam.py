"""Holes found by the red-team audit (docs/sandbox-security.md); each test failed before its fix.

Every attack is followed by ``assert_healthy``: the server must still answer a fresh run correctly.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import httpx
import pytest

from sandbox import isolation
from sandbox.cgroups import SlotCgroups
from sandbox.isolation import Isolation
from tests.sandbox.conftest import run
from tests.sandbox.test_security import assert_healthy, out


def test_fetch_files_cannot_follow_symlinks_into_other_runs(
    http: httpx.Client, isolated_endpoint: str
) -> None:
    """The worker reads ``fetch_files`` as root: a symlinked directory pointing at another slot's
    mount namespace (``/proc/<pid>/root/tmp``) used to read that run's scratch."""
    secret = uuid.uuid4().hex
    victim = f"""
import time
open('secret.txt', 'w').write({secret!r})
print('victim ready', flush=True)
time.sleep(2)
"""
    attacker = """
import os
for p in os.listdir('/proc'):
    if p.isdigit() and int(p) != os.getpid():
        for name, target in (('r', '/proc/%s/root/tmp'), ('c', '/proc/%s/cwd')):
            try:
                os.symlink(target % p, name + p)
            except OSError:
                pass
os.symlink('/proc/self/root/tmp', 'self')
print('links made')
"""
    fetch = [f"{kind}{i}/secret.txt" for kind in "rc" for i in range(1, 64)]
    with ThreadPoolExecutor(2) as pool:
        fut_v = pool.submit(run, http, isolated_endpoint, victim)
        time.sleep(1)
        body = run(http, isolated_endpoint, attacker, fetch_files=[*fetch, "self/main.py"])
        assert fut_v.result()["status"] == "Success"
    assert out(body) == "links made\n", body
    assert body["files"] == {}, {k: base64.b64decode(v) for k, v in body["files"].items()}
    assert_healthy(http, isolated_endpoint)


def test_fetch_files_of_a_fifo_does_not_hang_the_slot(
    http: httpx.Client, isolated_endpoint: str
) -> None:
    """Opening a FIFO blocks until a writer comes: the worker hung past its reply deadline and
    the server restarted the whole zygote, failing every other run in flight."""
    bystander = "import time\ntime.sleep(2)\nprint('bystander done')"
    with ThreadPoolExecutor(2) as pool:
        fut = pool.submit(run, http, isolated_endpoint, bystander)
        time.sleep(0.3)
        start = time.monotonic()
        body = run(
            http,
            isolated_endpoint,
            "import os\nos.mkfifo('f')\nopen('plain.txt', 'w').write('ok')",
            fetch_files=["f", "plain.txt"],
            run_timeout=1,
        )
        assert time.monotonic() - start < 5
        assert body["status"] == "Success", body
        assert body["files"] == {"plain.txt": base64.b64encode(b"ok").decode()}
        assert out(fut.result()) == "bystander done\n"
    assert_healthy(http, isolated_endpoint)


def test_fetch_files_still_reads_nested_regular_files(
    http: httpx.Client, isolated_endpoint: str
) -> None:
    code = "import os\nos.makedirs('a/b')\nopen('a/b/c.txt', 'w').write('deep')"
    body = run(http, isolated_endpoint, code, fetch_files=["a/b/c.txt", "/tmp/a/b/c.txt", "a/b"])
    want = base64.b64encode(b"deep").decode()
    assert body["files"] == {"a/b/c.txt": want, "/tmp/a/b/c.txt": want}


SYSV_POISON = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
shmid = libc.shmget(0x5EC, 4096, 0o1000 | 0o666)
ctypes.memmove(libc.shmat(shmid, None, 0), b'LEAK', 4)
libc.msgget(0x5ED, 0o1000 | 0o666)
libc.semget(0x5EE, 1, 0o1000 | 0o666)
print(shmid >= 0)
"""

SYSV_CHECK = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
kinds = ('shm', 'msg', 'sem')
left = [len(open('/proc/sysvipc/' + kind).read().splitlines()) - 1 for kind in kinds]
print(left, libc.shmget(0x5EC, 0, 0), libc.msgget(0x5ED, 0), libc.semget(0x5EE, 0, 0))
"""


def test_sysv_ipc_does_not_outlive_its_run(http: httpx.Client, isolated_endpoint: str) -> None:
    """SysV shared memory, message queues and semaphores live in the IPC namespace, not in a
    process: they survived the run (state for the next run, and memory never given back)."""
    with ThreadPoolExecutor(8) as pool:
        assert set(
            pool.map(lambda _: out(run(http, isolated_endpoint, SYSV_POISON)), range(16))
        ) == {"True\n"}
        results = set(pool.map(lambda _: out(run(http, isolated_endpoint, SYSV_CHECK)), range(16)))
    assert results == {"[0, 0, 0] -1 -1 -1\n"}, results
    assert_healthy(http, isolated_endpoint)


def test_concurrent_runs_share_no_network_namespace(
    http: httpx.Client, isolated_endpoint: str
) -> None:
    """All slots shared one network namespace: a run could listen on ``lo`` or an abstract UNIX
    socket and a concurrent run connect to it (a channel between runs)."""
    name = uuid.uuid4().hex[:12]
    listener = f"""
import socket
tcp = socket.socket(); tcp.bind(('127.0.0.1', 47321)); tcp.listen(4); tcp.settimeout(1.2)
unix = socket.socket(socket.AF_UNIX); unix.bind('\\0{name}'); unix.listen(4); unix.settimeout(0.1)
print('listening', flush=True)
for s in (tcp, unix):
    try:
        print('GOT', s.accept()[0].recv(10))
    except OSError as exc:
        print('nothing', type(exc).__name__)
"""
    dialer = f"""
import socket, time
time.sleep(0.5)
for family, addr in ((socket.AF_INET, ('127.0.0.1', 47321)), (socket.AF_UNIX, '\\0{name}')):
    try:
        s = socket.socket(family); s.settimeout(1); s.connect(addr); s.send(b'hi')
        print('CONNECTED', addr)
    except OSError as exc:
        print('refused', type(exc).__name__)
print(sorted(n for _, n in socket.if_nameindex()))
"""
    with ThreadPoolExecutor(2) as pool:
        fut = pool.submit(run, http, isolated_endpoint, listener, run_timeout=10)
        time.sleep(0.3)
        body_d = run(http, isolated_endpoint, dialer)
        body_l = fut.result()
    assert "CONNECTED" not in out(body_d) and "GOT" not in out(body_l), (body_d, body_l)
    assert out(body_d).splitlines()[-1] == "['lo']"
    selfloop = """
import socket, threading
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname(), timeout=2); c.send(b'loop')
print(srv.accept()[0].recv(4))
"""
    assert out(run(http, isolated_endpoint, selfloop)) == "b'loop'\n"  # lo still works in a run
    assert_healthy(http, isolated_endpoint)


def test_no_new_namespaces_from_user_code(http: httpx.Client, isolated_endpoint: str) -> None:
    """An unprivileged user namespace gave user code every capability inside it (then a network
    namespace: nf_tables and friends, the usual way to a kernel exploit). A seccomp filter now
    refuses namespace creation and a few syscalls math code never needs; threads, fork,
    subprocess and bash still work."""
    code = """
import ctypes, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
for name, flags in (('user', 0x10000000), ('net', 0x40000000), ('mnt', 0x00020000)):
    print(name, libc.unshare(flags), ctypes.get_errno())
print('unshare-cmd', subprocess.run(['unshare', '-Ur', 'true']).returncode != 0)
print('setns', libc.setns(os.open('/proc/self/ns/net', os.O_RDONLY), 0), ctypes.get_errno())
t = threading.Thread(target=lambda: print('thread ok')); t.start(); t.join()
print(subprocess.run(['sh', '-c', 'echo sub ok'], capture_output=True, text=True).stdout.strip())
pid = os.fork()
if pid == 0:
    os._exit(7)
print('fork', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    text = out(run(http, isolated_endpoint, code))
    assert text.splitlines() == [
        "user -1 1",
        "net -1 1",
        "mnt -1 1",
        "unshare-cmd True",
        "setns -1 1",
        "thread ok",
        "sub ok",
        "fork 7",
    ], text
    body = http.post(
        f"{isolated_endpoint}/run_code",
        json={"code": "unshare -Ur id || echo refused; echo bash ok", "language": "bash"},
    ).json()
    assert body["run_result"]["stdout"].splitlines() == ["refused", "bash ok"], body
    assert_healthy(http, isolated_endpoint)


def forks_holding(processes: int, mib: int, hold_s: float) -> str:
    """A program whose ``processes`` children each touch ``mib`` MiB, hold it ``hold_s`` and
    exit; it ends with ``codes``, their exit codes (-9: killed by the memory cgroup)."""
    return f"""
import os, time
kids = []
for _ in range({processes}):
    pid = os.fork()
    if pid == 0:
        block = bytearray({mib} * 1024**2)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep({hold_s})
        os._exit(0)
    kids.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids]
"""


def test_memory_limit_covers_all_processes_of_a_run(
    http: httpx.Client, isolated_endpoint: str
) -> None:
    """RLIMIT_AS bounds one process: 6 children of 200 MiB each held 1.2 GiB under a 256 MiB
    limit (up to max_processes x the limit, plus memfds no rlimit counts). A per-slot memory
    cgroup now bounds the run as a whole (limit + scratch size)."""
    probe = SlotCgroups.create(1, tag=f"sandbox-probe-{uuid.uuid4().hex[:8]}")
    if probe is None:
        pytest.skip("no memory cgroup can be made on this host")
    probe.close()
    code = forks_holding(6, 200, hold_s=1) + "print(codes.count(0), 'of 6 held 200 MiB')\n"
    body = run(http, isolated_endpoint, code, memory_limit_MB=256, run_timeout=20)
    held = int(out(body).split()[0])
    assert held <= 2, body  # 256 MiB + 256 MiB scratch: at most two at once
    code = forks_holding(6, 20, hold_s=1) + "print(codes.count(0), 'of 6 held 20 MiB')\n"
    body = run(http, isolated_endpoint, code, memory_limit_MB=256)
    assert out(body).startswith("6 of 6"), body  # many small processes are fine
    memfd = """
import os
fds = [os.memfd_create('x') for _ in range(40)]
for fd in fds:  # 50 MiB each: under RLIMIT_FSIZE, and memfds are outside RLIMIT_AS
    for _ in range(50):
        os.write(fd, b'x' * 1024**2)
print('held 2 GiB')
"""
    body = run(http, isolated_endpoint, memfd, memory_limit_MB=256)
    assert "held 2 GiB" not in out(body), body
    assert_healthy(http, isolated_endpoint)


def test_request_size_limit_holds_without_content_length(
    http: httpx.Client, local_endpoint: str
) -> None:
    """The body limit looked only at Content-Length: a chunked body of any size was read into
    memory whole (fields under their own limits, padded with JSON whitespace, even ran)."""
    head = b'{"code": "print(1)", "language": "python"'
    pad = b" " * (1 << 20)

    def body():
        yield head
        for _ in range(70):  # 70 MiB > max_request_bytes (64 MiB)
            yield pad
        yield b"}"

    resp = http.post(
        f"{local_endpoint}/run_code", content=body(), headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413, resp.text[:200]
    small = http.post(
        f"{local_endpoint}/run_code",
        content=iter([head, b"}"]),
        headers={"content-type": "application/json"},
    )
    assert small.status_code == 200 and small.json()["run_result"]["stdout"] == "1\n"
    assert_healthy(http, local_endpoint)


def test_unwritable_file_layouts_are_bad_requests(http: httpx.Client, local_endpoint: str) -> None:
    """These came back as SandboxError, which clients retry, instead of a 422."""
    hi = base64.b64encode(b"hi").decode()
    for files in (
        {"main.py": hi},  # the code file
        {"/tmp/main.py": hi},
        {"a": hi, "a/b": hi},  # a file and a directory at once
        {"a/b": hi, "a": hi},
        {"b" * 300: hi},  # a name over NAME_MAX
    ):
        resp = http.post(
            f"{local_endpoint}/run_code",
            json={"code": "print(1)", "language": "python", "files": files},
        )
        assert resp.status_code == 422, (files.keys(), resp.text[:300])
    body = run(http, local_endpoint, "print(open('main.py').read()[:5])", files={"x/y": hi})
    assert out(body) == "print\n"
    assert_healthy(http, local_endpoint)


NOBODY = 65534


def _as_nobody() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


@contextlib.contextmanager
def _zygote_readable_by_nobody() -> Iterator[None]:
    """A non-root operator reads its own install; this checkout may be root's alone (a clone in
    ``mktemp -d`` is 0700), so the zygote nobody starts is a world-readable copy of ours."""
    home = Path(tempfile.mkdtemp(prefix="sandbox-zygote-"))
    try:
        home.chmod(0o755)
        copy = home / isolation.ZYGOTE_SRC.name
        shutil.copytree(isolation.ZYGOTE_SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
        copy.chmod(0o755)
        for module in copy.iterdir():
            module.chmod(0o644)
        with mock.patch.object(isolation, "ZYGOTE_SRC", copy):
            yield
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _zygote_as_nobody(mode: str, code: str) -> dict:
    """One run on a zygote started by a non-root user (what ``--allow-insecure`` gets)."""
    with _zygote_readable_by_nobody():
        return _zygote_runs_as_nobody(mode, code)


def _zygote_runs_as_nobody(mode: str, code: str) -> dict:
    iso = Isolation(mode, "/usr/bin/python3")
    ours, theirs = socket.socketpair()
    cfg = {
        "fds": [theirs.fileno()],
        "base_uid": 61000,
        "preload": ["math"],
        **iso.zygote_cfg(),
        "mountns": iso.mountns,
        "drop_uid": iso.drop_uid,
        "scratch_root": f"/tmp/sandbox-nobody-{uuid.uuid4().hex[:8]}",
        "scratch_bytes": 1 << 24,
        "seccomp": True,
    }
    proc = subprocess.Popen(
        iso.zygote_argv(json.dumps(cfg)),
        env=iso.zygote_env(),
        pass_fds=[theirs.fileno()],
        preexec_fn=_as_nobody,
        cwd="/tmp",
    )
    theirs.close()
    try:
        ours.settimeout(30)
        reader = ours.makefile("rb")
        assert json.loads(reader.readline())["ready"]
        limits = {"memory_bytes": 1 << 30, "cpu_s": 6, "nproc": 64, "fsize": 1 << 26}
        limits |= {"nofile": 256, "output_cap": 1 << 20, "fetch_bytes": 1 << 20}
        req = {"language": "python", "code": code, "stdin": None, "run_timeout": 5}
        req |= {"files": {"in.txt": "aGk="}, "fetch_files": [], "limits": limits}
        replies = []
        for _ in range(2):  # the second run sees what the first one left
            body = json.dumps(req).encode()
            ours.sendall(struct.pack("!I", len(body)) + body)
            size = struct.unpack("!I", reader.read(4))[0]
            replies.append(json.loads(reader.read(size)))
        return replies
    finally:
        proc.kill()
        proc.wait()
        ours.close()
        shutil.rmtree(cfg["scratch_root"], ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
@pytest.mark.parametrize("mode", ["none", "bwrap-userns"])
def test_non_root_operator_gets_working_runs(mode: str) -> None:
    """Started by a non-root user, every run failed ("prepare: PermissionError": the worker
    chown()ed scratch files to the slot uid, and killed stragglers by switching to it)."""
    if mode == "bwrap-userns" and shutil.which("bwrap") is None:
        pytest.skip("no bubblewrap")
    code = """
import os, socket, subprocess
print(open('in.txt').read(), os.getuid(), sorted(n for _, n in socket.if_nameindex()))
print(os.path.exists('/root'), os.path.exists('/work'))
def cmd(pid):
    try:
        return open(f'/proc/{pid}/cmdline').read()
    except OSError:
        return ''
print([p for p in os.listdir('/proc') if p.isdigit() and 'MARK' in cmd(p)])
subprocess.Popen(['setsid', 'sleep', 'MARK'])
"""
    mark = f"299.{uuid.uuid4().int % 10**6}"  # a sleep no one else runs
    first, second = _zygote_as_nobody(mode, code.replace("MARK", mark))
    for reply in (first, second):
        assert reply.get("return_code") == 0, reply
        lines = reply["stdout"].splitlines()
        assert lines[0].startswith(f"hi {NOBODY} ")
        assert lines[2] == "[]", reply  # the first run's detached sleep was killed
    if mode == "bwrap-userns":
        assert first["stdout"].splitlines()[:2] == [f"hi {NOBODY} ['lo']", "False False"]


SCRATCH_POISON = """
import os, time
for i in range(4):  # 240 MiB in the shared-memory and /var/tmp dirs (60 MiB a file: RLIMIT_FSIZE)
    with open(('/dev/shm/fill%d' if i % 2 else '/var/tmp/fill%d') % i, 'wb') as fh:
        fh.write(b'x' * (60 * 1024**2))
time.sleep(0.5)  # hold the slot, so the 8 poisons land on 8 slots
print('filled')
"""
# 2 x 150 MiB: fits a 256 + 256 MiB slot only if the poison left no charge
SCRATCH_CHECK = (
    forks_holding(2, 150, hold_s=0)
    + "print(os.listdir('/dev/shm'), os.listdir('/var/tmp'), codes)\n"
)


def test_var_tmp_and_dev_shm_are_per_run_and_uncharged(
    http: httpx.Client, isolated_endpoint: str
) -> None:
    """In ``unshare`` mode /var/tmp and /dev/shm were the host's: files stayed for later runs,
    and a 1.3 GB /dev/shm fill stayed charged to the slot's memory cgroup, so a later 600 MB
    allocation there was killed. Each run now has its own, on its tmpfs, gone after it."""
    with ThreadPoolExecutor(8) as pool:
        poisons = list(pool.map(lambda _: run(http, isolated_endpoint, SCRATCH_POISON), range(8)))
        assert {out(b) for b in poisons} == {"filled\n"}, poisons
        checks = list(
            pool.map(
                lambda _: out(run(http, isolated_endpoint, SCRATCH_CHECK, memory_limit_MB=256)),
                range(16),
            )
        )
    assert set(checks) == {"[] [] [0, 0]\n"}, checks  # a kill by the cgroup would be -9
    assert_healthy(http, isolated_endpoint)
