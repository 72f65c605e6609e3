"""Holes found by the red-team audit (docs/sandbox-security.md); each test failed before its fix.

Every attack is followed by ``assert_healthy``: the server must still answer a fresh run correctly.
"""

from __future__ import annotations

import base64
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.sandbox.conftest import run
from tests.sandbox.test_security import assert_healthy, out


def test_fetch_files_cannot_follow_symlinks_into_other_runs(
    http: httpx.Client, local_endpoint: str
) -> None:
    """The worker reads ``fetch_files`` as root: a symlinked directory pointing at another slot's
    mount namespace (``/proc/<pid>/root/tmp``) used to read that run's scratch."""
    secret = uuid.uuid4().hex
    victim = f"""
import time
open('secret.txt', 'w').write({secret!r})
print('victim ready', flush=True)
time.sleep(3)
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
        fut_v = pool.submit(run, http, local_endpoint, victim)
        time.sleep(1)
        body = run(http, local_endpoint, attacker, fetch_files=[*fetch, "self/main.py"])
        assert fut_v.result()["status"] == "Success"
    assert out(body) == "links made\n", body
    assert body["files"] == {}, {k: base64.b64decode(v) for k, v in body["files"].items()}
    assert_healthy(http, local_endpoint)


def test_fetch_files_of_a_fifo_does_not_hang_the_slot(
    http: httpx.Client, local_endpoint: str
) -> None:
    """Opening a FIFO blocks until a writer comes: the worker hung past its reply deadline and
    the server restarted the whole zygote, failing every other run in flight."""
    bystander = "import time\ntime.sleep(2)\nprint('bystander done')"
    with ThreadPoolExecutor(2) as pool:
        fut = pool.submit(run, http, local_endpoint, bystander)
        time.sleep(0.3)
        start = time.monotonic()
        body = run(
            http,
            local_endpoint,
            "import os\nos.mkfifo('f')\nopen('plain.txt', 'w').write('ok')",
            fetch_files=["f", "plain.txt"],
            run_timeout=1,
        )
        assert time.monotonic() - start < 5
        assert body["status"] == "Success", body
        assert body["files"] == {"plain.txt": base64.b64encode(b"ok").decode()}
        assert out(fut.result()) == "bystander done\n"
    assert_healthy(http, local_endpoint)


def test_fetch_files_still_reads_nested_regular_files(
    http: httpx.Client, local_endpoint: str
) -> None:
    code = "import os\nos.makedirs('a/b')\nopen('a/b/c.txt', 'w').write('deep')"
    body = run(http, local_endpoint, code, fetch_files=["a/b/c.txt", "/tmp/a/b/c.txt", "a/b"])
    want = base64.b64encode(b"deep").decode()
    assert body["files"] == {"a/b/c.txt": want, "/tmp/a/b/c.txt": want}
