"""Security properties of our sandbox; each test fails if the property breaks.

Every attack is followed by ``assert_healthy``: the server must still answer a fresh run correctly.
"""

from __future__ import annotations

import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.sandbox.conftest import FAKE_SECRETS, REPO, run


def assert_healthy(http: httpx.Client, url: str) -> None:
    token = uuid.uuid4().hex
    body = run(http, url, f"print({token!r})")
    assert body["status"] == "Success" and body["run_result"]["stdout"] == token + "\n"


def out(body: dict) -> str:
    return (body["run_result"] or {}).get("stdout", "")


def test_no_network_not_even_host_loopback(http: httpx.Client, isolated_endpoint: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = f"""
import socket
print(sorted(n for _, n in socket.if_nameindex()))
for host in ("127.0.0.1", "10.0.0.1", "1.1.1.1"):
    try:
        socket.create_connection((host, {port}), timeout=1)
        print("CONNECTED", host)
    except OSError as exc:
        print("blocked", host, type(exc).__name__)
"""
    try:
        body = run(http, isolated_endpoint, code, run_timeout=10)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing reached the host's loopback listener
    finally:
        listener.close()
    assert body["status"] == "Success", body
    assert out(body).splitlines()[0] == "['lo']"
    assert "CONNECTED" not in out(body)
    assert_healthy(http, isolated_endpoint)


def test_server_secrets_not_visible(http: httpx.Client, isolated_endpoint: str) -> None:
    code = """
import glob, os
print(sorted(os.environ))
for path in glob.glob('/proc/*/environ'):
    try:
        print(open(path, 'rb').read().decode(errors='replace'))
    except OSError:
        pass
"""
    body = run(http, isolated_endpoint, code)
    assert body["status"] == "Success"
    for name, value in FAKE_SECRETS.items():
        assert value not in out(body)
        assert name not in out(body)


def test_the_sandboxs_own_modules_are_not_user_modules(
    http: httpx.Client, isolated_endpoint: str
) -> None:
    """The zygote's modules (``sandbox/zygote/``) are gone from ``sys.modules`` and the import
    path before user code runs: it cannot reach the worker's state through them."""
    code = """
import sys
names = ("run", "root", "worker", "child", "syscalls", "reaping")
print(sorted(n for n in names if n in sys.modules), [p for p in sys.path if "zygote" in p])
for name in names:
    try:
        __import__(name)
        print("imported", name)
    except ModuleNotFoundError:
        pass
"""
    body = run(http, isolated_endpoint, code)
    assert body["status"] == "Success", body
    assert out(body) == "[] []\n"
    assert_healthy(http, isolated_endpoint)


def test_runs_as_unprivileged_uid_without_capabilities(
    http: httpx.Client, isolated_endpoint: str
) -> None:
    code = """
import os
caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0]
print(os.getuid(), os.geteuid(), os.getgid(), caps)
"""
    uid, euid, gid, caps = out(run(http, isolated_endpoint, code)).split()
    assert int(uid) != 0 and int(euid) != 0 and int(gid) != 0
    assert int(caps, 16) == 0


def test_no_reads_or_writes_outside_scratch(http: httpx.Client, isolated_endpoint: str) -> None:
    code = f"""
import os
targets = [{str(REPO / "pyproject.toml")!r}, '/root', '/etc/shadow', '/proc/1/root/etc/hostname']
for path in targets:
    try:
        if os.path.isdir(path):
            print('LISTED', path, os.listdir(path))
        else:
            open(path).read(1)
            print('READ', path)
    except OSError as exc:
        print('denied', path)
for path in ['/usr/evil', '/etc/evil', '/evil', '/opt/sandbox/evil', '/proc/evil', '/dev/evil']:
    try:
        open(path, 'w').write('x')
        print('WROTE', path)
    except OSError:
        print('denied', path)
open('mine.txt', 'w').write('ok')
print('scratch ok', os.getcwd())
"""
    text = out(run(http, isolated_endpoint, code))
    assert "READ" not in text and "LISTED" not in text and "WROTE" not in text, text
    assert "scratch ok /tmp" in text
    assert_healthy(http, isolated_endpoint)


def test_concurrent_runs_cannot_see_or_signal_each_other(
    http: httpx.Client, isolated_endpoint: str
) -> None:
    secret = uuid.uuid4().hex
    victim = f"""
import os, time
open('secret.txt', 'w').write({secret!r})
open('/tmp/secret2.txt', 'w').write({secret!r})
print('victim-ready', flush=True)
time.sleep(3)
print('victim survived', open('secret.txt').read())
"""
    attacker = f"""
import glob, os, signal, time
time.sleep(1)
needle = {secret[::-1]!r}[::-1]  # not spelled out, so our own main.py does not match
found = []
for pattern in ['/tmp/*', '/tmp/**/secret*', '/proc/*/cwd/*', '/proc/*/root/tmp/*']:
    for path in glob.glob(pattern, recursive=True):
        try:
            if needle in open(path).read():
                found.append(path)
        except OSError:
            pass
print('found', found)
killed = []
for pid in [int(p) for p in os.listdir('/proc') if p.isdigit()]:
    if pid == os.getpid():
        continue
    try:
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    except OSError:
        pass
try:
    os.kill(-1, signal.SIGKILL)
except OSError:
    pass
print('killed', killed)
"""
    with ThreadPoolExecutor(2) as pool:
        fut_v = pool.submit(run, http, isolated_endpoint, victim)
        fut_a = pool.submit(run, http, isolated_endpoint, attacker)
        body_v, body_a = fut_v.result(), fut_a.result()
    assert body_v["status"] == "Success", body_v
    assert f"victim survived {secret}" in out(body_v)
    assert "found []" in out(body_a), out(body_a)
    assert "killed []" in out(body_a), out(body_a)
    assert_healthy(http, isolated_endpoint)


def test_timeout_kills_whole_process_tree(http: httpx.Client, isolated_endpoint: str) -> None:
    escape = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while True:
            time.sleep(0.05)
    os._exit(0)
time.sleep(60)
"""
    body = run(http, isolated_endpoint, escape, run_timeout=1)
    assert body["run_result"]["status"] == "TimeLimitExceeded"
    survivors = """
import os
mine = os.getuid()
others = []
for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
    try:
        uid = int([l for l in open(f'/proc/{pid}/status') if l.startswith('Uid:')][0].split()[1])
    except (OSError, IndexError):
        continue
    if uid not in (0, mine):
        others.append((pid, uid))
print(others)
"""
    assert out(run(http, isolated_endpoint, survivors)) == "[]\n"


def test_background_process_killed_after_normal_exit(
    http: httpx.Client, isolated_endpoint: str
) -> None:
    code = """
import os, sys, time
if os.fork() == 0:
    os.setsid(); os.close(1); os.close(2)
    time.sleep(30)
    os._exit(0)
print('parent done')
"""
    body = run(http, isolated_endpoint, code, run_timeout=20)
    assert body["status"] == "Success"
    assert body["run_result"]["execution_time"] < 5  # did not wait for the orphan


def test_memory_limit_default(http: httpx.Client, isolated_endpoint: str) -> None:
    body = run(http, isolated_endpoint, "x = bytearray(2 * 1024**3)\nprint('allocated')")
    assert body["status"] == "Failed"
    assert "MemoryError" in body["run_result"]["stderr"]
    body = run(http, isolated_endpoint, "x = bytearray(200 * 1024**2)\nprint('ok')")
    assert out(body) == "ok\n"
    body = run(
        http, isolated_endpoint, "x = bytearray(300 * 1024**2)\nprint('ok')", memory_limit_MB=100
    )
    assert "MemoryError" in body["run_result"]["stderr"]
    assert_healthy(http, isolated_endpoint)


def test_fork_bomb_contained(http: httpx.Client, isolated_endpoint: str) -> None:
    bomb = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    body = run(http, isolated_endpoint, bomb, run_timeout=2)
    assert body["status"] == "Failed"
    assert body["run_result"]["status"] == "TimeLimitExceeded"
    assert_healthy(http, isolated_endpoint)


def test_rlimits_applied(http: httpx.Client, isolated_endpoint: str) -> None:
    code = """
import resource as r
for name in ('RLIMIT_CPU', 'RLIMIT_NPROC', 'RLIMIT_FSIZE', 'RLIMIT_AS', 'RLIMIT_NOFILE'):
    print(name, r.getrlimit(getattr(r, name))[0])
"""
    limits = dict(
        line.split() for line in out(run(http, isolated_endpoint, code, run_timeout=3)).splitlines()
    )
    assert int(limits["RLIMIT_CPU"]) == 4
    assert 0 < int(limits["RLIMIT_NPROC"]) <= 1024
    assert int(limits["RLIMIT_FSIZE"]) == 64 * 1024**2
    assert 0 < int(limits["RLIMIT_AS"]) < 8 * 1024**3
    assert 0 < int(limits["RLIMIT_NOFILE"]) <= 4096


def test_file_size_limit(http: httpx.Client, isolated_endpoint: str) -> None:
    code = "open('big.bin', 'wb').write(b'x' * (100 * 1024**2))\nprint('wrote')"
    body = run(http, isolated_endpoint, code)
    assert body["status"] == "Failed"
    assert "File too large" in body["run_result"]["stderr"]
    assert_healthy(http, isolated_endpoint)


def test_output_capped(http: httpx.Client, isolated_endpoint: str) -> None:
    body = run(http, isolated_endpoint, "import sys\nsys.stdout.write('x' * (3 * 1024**2))")
    assert body["status"] == "Success"
    assert len(body["run_result"]["stdout"]) == 1024**2
    body = run(http, isolated_endpoint, "while True: print('spam' * 1000)", run_timeout=1)
    assert body["run_result"]["status"] == "TimeLimitExceeded"
    assert len(body["run_result"]["stdout"]) <= 1024**2
    assert_healthy(http, isolated_endpoint)


def test_no_state_leaks_between_runs(http: httpx.Client, isolated_endpoint: str) -> None:
    poison = """
import math, sys, builtins, json, os
math.pi = 3
builtins.LEAK = 1
json.dumps = None
sys.modules['leaky'] = object()
os.environ['LEAK'] = '1'
open('leak.txt', 'w').write('1')
"""
    check = """
import math, builtins, json, os, sys
print(math.pi == 3.141592653589793, hasattr(builtins, 'LEAK'), json.dumps is None,
      'leaky' in sys.modules, 'LEAK' in os.environ, os.path.exists('leak.txt'))
"""
    # 8 slots: enough rounds of each that every slot is both poisoned and checked
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: run(http, isolated_endpoint, poison), range(24)))
        results = list(pool.map(lambda _: out(run(http, isolated_endpoint, check)), range(24)))
    assert set(results) == {"True False False False False False\n"}


def test_server_survives_killing_attempts(http: httpx.Client, isolated_endpoint: str) -> None:
    code = """
import os, signal
for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):
    for pid in (1, os.getppid(), -1):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
print('tried')
"""
    run(http, isolated_endpoint, code)
    done = threading.Event()

    def burst() -> None:
        for _ in range(5):
            assert_healthy(http, isolated_endpoint)
        done.set()

    burst()
    assert done.is_set()


def test_prefork_next_run_sees_nothing_of_the_last(
    http: httpx.Client, isolated_endpoint: str
) -> None:
    """A slot's next run child is forked ahead of its request: it must still start clean.

    The poison replies at once but leaves work behind: a detached daemon that keeps creating files,
    and (half of them) a fake "done" on the status pipe while it keeps running. The next runs on
    every slot must see no files, no process of their own uid but themselves, an empty read-only
    stdin, and the daemons must be dead.
    """
    poison = """
import os, sys, time
open('left.txt', 'w').write('1')
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for fd in (0, 1, 2):
            os.close(fd)
        for i in range(10**6):
            try:
                open('/tmp/ghost-%d' % i, 'w').close()
            except OSError:
                pass
            time.sleep(0.001)
    os._exit(0)
if SPOOF:
    sys.stdout.flush()
    os.close(1); os.close(2)
    for fd in range(3, 64):
        try:
            os.write(fd, b'0\\n')
        except OSError:
            pass
    time.sleep(30)
print('poisoned')
"""
    check = """
import os
mine = os.getuid()
procs = []
for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
    try:
        uid = int([l for l in open(f'/proc/{pid}/status') if l.startswith('Uid:')][0].split()[1])
    except (OSError, IndexError):
        continue
    if uid == mine and int(pid) != os.getpid():
        procs.append(pid)
try:
    os.write(0, b'x')
    stdin = 'WRITABLE'
except OSError:
    stdin = repr(os.read(0, 100))
print(sorted(os.listdir('.')), procs, stdin)
"""
    with ThreadPoolExecutor(8) as pool:
        bodies = list(
            pool.map(
                lambda i: run(
                    http, isolated_endpoint, f"SPOOF = {i % 2}\n" + poison, run_timeout=5
                ),
                range(16),
            )
        )
        results = list(pool.map(lambda _: out(run(http, isolated_endpoint, check)), range(32)))
    assert all(b["status"] == "Success" for b in bodies), bodies
    assert set(results) == {"['main.py'] [] b''\n"}, results
    body = run(http, isolated_endpoint, "import sys\nprint(sys.stdin.read())", stdin="one\n")
    assert out(body) == "one\n\n"
    assert set(pool_results(http, isolated_endpoint, check)) == {"['main.py'] [] b''\n"}
    assert_healthy(http, isolated_endpoint)


def pool_results(http: httpx.Client, url: str, code: str) -> list[str]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: out(run(http, url, code)), range(16)))
