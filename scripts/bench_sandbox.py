"""``make bench-sandbox``: our warm-pool sandbox vs the naive subprocess-per-request baseline.

Starts both servers on free 127.0.0.1 ports, drives each with ``sandbox.client.SandboxClient`` at
concurrency 1, 8 and 32 for three workloads, and writes the table into ``docs/benchmarks.md``
(section "Sandbox"). Each cell runs for at most ``--seconds`` (and ``--max-requests``), so the
whole bench stays under ~5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.client import SandboxClient  # noqa: E402

WORKLOADS = {
    "print(2+2)": "print(2+2)",
    "sympy solve": (
        "import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**3 - 6*x**2 + 11*x - 6, x))"
    ),
    "0.5 s CPU loop": (
        "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5:\n    pass\n"
        "print('done')"
    ),
}
CONCURRENCY = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*argv, "--port", str(port)], cwd=REPO, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/ping", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server {argv} did not start")


async def cell(url: str, code: str, conc: int, seconds: float, max_requests: int) -> dict:
    client = SandboxClient(url, max_concurrency=conc, timeout_s=120, max_retries=2)
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors, sent
        while time.perf_counter() < stop_at and sent < max_requests:
            sent += 1
            start = time.perf_counter()
            try:
                result = await client.run_code(code, run_timeout=30)
                if result.status != "Success":
                    errors += 1
            except Exception:
                errors += 1
            latencies.append(time.perf_counter() - start)

    await client.run_code("print(0)")  # connection warm-up
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.perf_counter() - t0
    await client.aclose()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else None
    return {
        "n": len(latencies),
        "errors": errors,
        "rps": len(latencies) / wall,
        "p50": (q[49] if q else latencies[0]) * 1000,
        "p99": (q[98] if q else latencies[0]) * 1000,
    }


def machine() -> str:
    model = "unknown CPU"
    with Path("/proc/cpuinfo").open() as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    today = dt.date.today().isoformat()
    kernel = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores (`nproc`), {model}, {kernel}, {today}"


def write_markdown(rows: list[tuple], out: Path, seconds: float) -> str:
    lines = [
        "## Sandbox",
        "",
        f"Machine: {machine()}.",
        "",
        "Produced by `make bench-sandbox` (`scripts/bench_sandbox.py`); each cell runs up to",
        f"{seconds:g} s. *ours*: `python -m sandbox serve` (bubblewrap + warm zygote, default",
        "slots); *naive*: `scripts/naive_sandbox_server.py` (the seed's subprocess per request).",
        "Latency is client-side, HTTP included.",
        "",
        "| workload | conc | ours req/s | naive req/s | speed-up | ours p50 ms | ours p99 ms "
        "| naive p50 ms | naive p99 ms | errors ours/naive |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, conc, ours, naive in rows:
        lines.append(
            f"| {name} | {conc} | {ours['rps']:.1f} | {naive['rps']:.2f} | "
            f"{ours['rps'] / naive['rps']:.1f}× | {ours['p50']:.1f} | {ours['p99']:.1f} | "
            f"{naive['p50']:.0f} | {naive['p99']:.0f} | {ours['errors']}/{naive['errors']} |"
        )
    section = "\n".join(lines) + "\n"
    text = out.read_text() if out.exists() else "# Benchmarks\n\n"
    if "## Sandbox" in text:
        text = re.sub(r"## Sandbox\n.*?(?=\n## |\Z)", section.rstrip("\n") + "\n", text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return section


async def bench(args: argparse.Namespace) -> None:
    ours_port, naive_port = free_port(), free_port()
    ours = start([sys.executable, "-m", "sandbox", "serve", "--log-level", "warning"], ours_port)
    naive = start([sys.executable, "scripts/naive_sandbox_server.py"], naive_port)
    rows = []
    try:
        for name, code in WORKLOADS.items():
            for conc in CONCURRENCY:
                r_ours = await cell(
                    f"http://127.0.0.1:{ours_port}", code, conc, args.seconds, args.max_requests
                )
                r_naive = await cell(
                    f"http://127.0.0.1:{naive_port}", code, conc, args.seconds, args.max_requests
                )
                rows.append((name, conc, r_ours, r_naive))
                print(f"{name:>15} c={conc:<3} ours {r_ours} naive {r_naive}", flush=True)
    finally:
        for proc in (ours, naive):
            proc.terminate()
            proc.wait(10)
    print(write_markdown(rows, Path(args.out), args.seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of one cell")
    parser.add_argument("--max-requests", type=int, default=3000)
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
