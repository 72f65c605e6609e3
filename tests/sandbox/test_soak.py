"""Soak: 1200 mixed requests at concurrency 32; none lost, none mixed up, server memory flat."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess

from sandbox.client import SandboxClient

N_REQUESTS = 1200
CONCURRENCY = 32


def server_rss_kb(port: int) -> int:
    """RSS of the uvicorn process listening on ``port`` (found via its command line)."""
    # -ww: never cut the command line (ps cuts at $COLUMNS, which pytest sets, hiding --port)
    argv = ["ps", "-ww", "-eo", "pid=,rss=,args="]
    out = subprocess.run(argv, capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, rss, args = line.split(None, 2)
        if "sandbox serve" in args and f"--port {port}" in args and int(pid) != os.getpid():
            return int(rss)
    raise AssertionError(f"no server on port {port}")


def make_job(i: int, rng: random.Random) -> tuple[dict, str, str]:
    """(kwargs, expected status, token): each job prints a token unique to it."""
    token = f"tok{i}x{rng.randrange(10**9)}"
    kind = i % 6
    if kind == 0:
        return {"code": f"print({token!r})"}, "Success", token
    if kind == 1:
        code = f"import sympy as s\nx = s.Symbol('x')\nprint({token!r}, s.solve(x**2 - 9, x))"
        return {"code": code}, "Success", token
    if kind == 2:
        return {"code": f"print({token!r})\nraise ValueError('bad')"}, "Failed", token
    if kind == 3:
        return {"code": "import sys\nprint(sys.stdin.read())", "stdin": token}, "Success", token
    if kind == 4:
        code = f"print({token!r}, flush=True)\nimport time\ntime.sleep(5)"
        return {"code": code, "run_timeout": 0.3}, "Failed", token
    return (
        {"code": f"import numpy as np\nprint({token!r}, int(np.arange(10).sum()))"},
        ("Success"),
        token,
    )


async def soak(url: str, n: int) -> list[str]:
    rng = random.Random(1234)
    client = SandboxClient(url, max_concurrency=CONCURRENCY, timeout_s=120)
    errors: list[str] = []

    async def one(i: int) -> None:
        kwargs, status, token = make_job(i, rng)
        result = await client.run_code(**kwargs)
        if result.status != status or token not in result.stdout:
            errors.append(
                f"job {i}: expected {status}/{token}, got {result.status} {result.stdout!r}"
            )
        others = result.stdout.replace(token, "")
        if "tok" in others:
            errors.append(f"job {i}: foreign output {result.stdout!r}")

    await asyncio.gather(*(one(i) for i in range(n)))
    await client.aclose()
    return errors


async def test_soak_none_lost_none_wrong_memory_flat(local_endpoint: str) -> None:
    port = int(local_endpoint.rsplit(":", 1)[1])
    await soak(local_endpoint, 200)  # warm-up: allocator and caches settle
    rss_before = server_rss_kb(port)
    errors = await soak(local_endpoint, N_REQUESTS)
    rss_after = server_rss_kb(port)
    assert errors == []
    # flat: a leak of 8 KiB per request (10 MiB over 1200) would fail this
    assert rss_after - rss_before < 10 * 1024, (rss_before, rss_after)
