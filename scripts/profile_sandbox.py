"""Where does one ``print(2+2)`` request spend its time? (findings: docs/sandbox-performance.md)

Three measurements, each the median of ``--n`` sequential requests (concurrency 1):

1. ``pool``: ``ZygotePool.run`` driven directly (no HTTP): the sandbox's share. The worker also
   reports its own phase timestamps (``_t`` in its reply), printed as medians per phase.
2. ``http+stub``: the real FastAPI app under uvicorn with the pool replaced by a stub that answers
   at once: the HTTP/pydantic share.
3. ``http+pool``: the real server end to end, as ``make bench-sandbox`` sees it at c=1.

    .venv/bin/python scripts/profile_sandbox.py --n 300
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.executor import Executor  # noqa: E402
from sandbox.isolation import detect  # noqa: E402
from sandbox.local import free_port, start_server  # noqa: E402
from sandbox.pool import ZygotePool  # noqa: E402
from sandbox.schemas import RunCodeRequest  # noqa: E402
from sandbox.settings import Settings  # noqa: E402

STUB_SERVER = """
import sys, uvicorn
from sandbox import api, pool
from sandbox.isolation import Isolation

REPLY = {"status": "Finished", "return_code": 0, "execution_time": 0.001,
         "stdout": "4\\n", "stderr": "", "files": {}}

class StubPool:
    def __init__(self, settings, isolation):
        pass
    async def start(self):
        pass
    async def close(self):
        pass
    async def run(self, request):
        return dict(REPLY)

api.ZygotePool = StubPool
app = api.create_app(isolation=Isolation("bwrap", "/usr/bin/python3"))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"p50 {statistics.median(xs) * 1e3:.2f} ms  p90 {xs[int(len(xs) * 0.9)] * 1e3:.2f} ms"


async def bench_pool(n: int) -> None:
    settings = Settings.from_env()
    pool = ZygotePool(settings, detect(settings), profile=True)
    await pool.start()
    executor = Executor(settings, pool)
    work = executor.to_worker_request(RunCodeRequest(code="print(2+2)", language="python"))
    lat, phases = [], defaultdict(list)
    try:
        for _ in range(20):
            await pool.run(dict(work))
        for _ in range(n):
            t = time.perf_counter()
            reply = await pool.run(dict(work))
            lat.append(time.perf_counter() - t)
            assert reply["stdout"] == "4\n", reply
            marks = reply.get("_t") or []
            for (_, prev), (name, cur) in itertools.pairwise(marks):
                phases[name].append((cur - prev) / 1e3)
            phases["total in worker"].append(marks[-1][1] / 1e3 if marks else 0.0)
            await asyncio.sleep(0.002)  # let deferred (post-reply) work finish, as between calls
    finally:
        await pool.close()
    print(f"pool.run (no HTTP)        {ms(lat)}")
    for name, xs in phases.items():
        print(f"  worker phase {name:<12} {ms(xs)}")


def bench_http(url: str, n: int, label: str) -> None:
    body = {"code": "print(2+2)", "language": "python"}
    lat = []
    with httpx.Client(timeout=30) as http:
        for _ in range(20):
            http.post(f"{url}/run_code", json=body)
        for _ in range(n):
            t = time.perf_counter()
            resp = http.post(f"{url}/run_code", json=body)
            lat.append(time.perf_counter() - t)
            assert resp.status_code == 200 and resp.json()["run_result"]["stdout"] == "4\n"
    print(f"{label:<25} {ms(lat)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(bench_pool(args.n))
    port = free_port()
    stub = start_server([sys.executable, "-c", STUB_SERVER, str(port)], port)
    try:
        bench_http(f"http://127.0.0.1:{port}", args.n, "http+stub pool")
    finally:
        stub.terminate()
        stub.wait(10)
    port = free_port()
    argv = [sys.executable, "-m", "sandbox", "serve", "--log-level", "warning", "--port", str(port)]
    real = start_server(argv, port)
    try:
        bench_http(f"http://127.0.0.1:{port}", args.n, "http+pool (end to end)")
    finally:
        real.terminate()
        real.wait(10)


if __name__ == "__main__":
    main()
