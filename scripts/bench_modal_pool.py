"""``make bench-modal-pool``: what a call costs through the Modal Sandbox pool, against the node's
own sandbox, on this machine's sandboxes (the local backend: no Modal account here).

Four ways to run the same call (``print(2 + 2)``: all overhead, no work), each over the same
number of slots (``--slots``):

- **zygote**: the warm zygote's ``ZygotePool.run`` in this process, no transport: the floor;
- **node**: the project's sandbox over HTTP on loopback (``python -m sandbox serve``), as
  every DAPO node runs it: the floor plus the HTTP hop;
- **stdio**: the pool (``sandbox/fleet.py``) in this process, over ``--sandboxes`` local
  sandboxes, each reached through its worker's stdin/stdout (``exec``): the floor plus the
  stdio hop. This and *node* answer the issue's "the sandbox server or a stdio worker
  through exec: measure which" (a sandbox made with ``block_network`` takes no HTTP anyway);
- **pool**: what the tool sees with ``--sandbox=modal``: HTTP to ``python -m sandbox serve-pool
  --backend local`` on loopback, the pool, stdio, the worker.

Sequential calls give the per-call latency (p50/p99; overhead = the difference to *zygote*);
``--concurrency`` callers at once give calls/s. On Modal the stdio hop crosses the network
(Modal's exec streams): that part is not measured here. Writes the section "Modal Sandbox pool:
per-call overhead (local backend)" of docs/benchmarks.md and docs/cpu-runs/modal_pool.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_sandbox import NEXT_HEADING, machine  # noqa: E402

from sandbox.client import SandboxClient  # noqa: E402
from sandbox.fleet import Fleet, FleetConfig  # noqa: E402
from sandbox.local import free_port, sandbox_service, start_server, stop  # noqa: E402
from sandbox.local_backend import LocalBackend  # noqa: E402
from sandbox.selftest import worker_request  # noqa: E402
from sandbox.settings import Settings  # noqa: E402
from sandbox.startup import start_isolated  # noqa: E402

HEADING = "## Modal Sandbox pool: per-call overhead (local backend)"
CODE = "print(2 + 2)"
Call = Callable[[], Awaitable[bool]]  # one call; True when it printed 4


def quantile_ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


async def measure(
    call: Call, sequential: int, concurrent: int, concurrency: int, runs: int
) -> list[dict]:
    """``runs`` rounds of: ``sequential`` calls one after another, then ``concurrent`` calls
    from ``concurrency`` callers at once; one row per round."""
    for _ in range(10):  # warm-up
        await call()
    return [await measure_once(call, sequential, concurrent, concurrency) for _ in range(runs)]


async def measure_once(call: Call, sequential: int, concurrent: int, concurrency: int) -> dict:
    latencies, wrong = [], 0
    for _ in range(sequential):
        start = time.perf_counter()
        wrong += not await call()
        latencies.append(time.perf_counter() - start)
    left = concurrent

    async def caller() -> None:
        nonlocal left, wrong
        while left > 0:
            left -= 1
            wrong += not await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "p50_ms": round(quantile_ms(latencies, 50), 2),
        "p99_ms": round(quantile_ms(latencies, 99), 2),
        "calls_per_s": round(concurrent / wall, 1),
        "failed": wrong,
    }


def via_pool(pool, settings: Settings) -> Call:
    async def call() -> bool:
        reply = await pool.run(worker_request(settings, CODE, ""))
        return reply["stdout"] == "4\n"

    return call


def via_http(client: SandboxClient) -> Call:
    async def call() -> bool:
        result = await client.run_code(CODE, run_timeout=20)
        return result.ok and result.stdout == "4\n"

    return call


async def bench(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()[0]
    settings = Settings(slots=args.slots)
    sizes = (args.sequential, args.concurrent, args.concurrency, args.runs)
    arms: dict[str, dict] = {}
    zygote = await start_isolated(settings)
    try:
        arms["zygote"] = await measure(via_pool(zygote, settings), *sizes)
    finally:
        await zygote.close()
    print("zygote", arms["zygote"], flush=True)
    with sandbox_service("--log-level", "warning", env={"SANDBOX_SLOTS": str(args.slots)}) as url:
        client = SandboxClient(f"{url}/run_code", max_concurrency=args.concurrency, max_retries=1)
        arms["node"] = await measure(via_http(client), *sizes)
        await client.aclose()
    print("node", arms["node"], flush=True)
    per_box = args.slots // args.sandboxes
    cfg = FleetConfig(name=f"bench-{uuid.uuid4().hex[:8]}", sandboxes=args.sandboxes,
                      slots=per_box, cpu=1.0)  # fmt: skip
    fleet = Fleet(LocalBackend(), cfg)
    await fleet.start()
    try:
        while len(fleet.members) < args.sandboxes:
            await asyncio.sleep(0.2)
        arms["stdio"] = await measure(via_pool(fleet, settings), *sizes)
        ready = fleet.report()["ready_s"]
    finally:
        await fleet.close()
    print("stdio", arms["stdio"], flush=True)
    port = free_port()
    argv = [sys.executable, "-m", "sandbox", "serve-pool", "--backend", "local", "--port"]
    argv += [str(port), "--name", cfg.name, "--sandboxes", str(args.sandboxes)]
    argv += ["--slots-per-sandbox", str(per_box), "--cpu", "1", "--log-level", "warning"]
    proc = start_server(argv, port, wait_s=300)
    try:
        await asyncio.sleep(5)  # the second sandbox too
        client = SandboxClient(f"http://127.0.0.1:{port}/run_code",
                               max_concurrency=args.concurrency, max_retries=1)  # fmt: skip
        arms["pool"] = await measure(via_http(client), *sizes)
        await client.aclose()
    finally:
        stop(proc)
    print("pool", arms["pool"], flush=True)
    return {
        "machine": machine(),
        "runs": args.runs,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "slots": args.slots,
        "sandboxes": args.sandboxes,
        "sequential": args.sequential,
        "concurrent": args.concurrent,
        "concurrency": args.concurrency,
        "sandbox_ready_ms": ready,
        "arms": arms,
    }


def write_docs(row: dict, out: Path) -> str:
    floors = [cell["p50_ms"] for cell in row["arms"]["zygote"]]
    lines = [
        HEADING,
        "",
        f"`make bench-modal-pool` (`scripts/bench_modal_pool.py`), {row['runs']} runs in one "
        "session, each cell giving every run (run 1 / run 2 / ...). Machine: "
        f"{row['machine']}; 1-minute load average {row['load_average'][0]} at the start and "
        f"{row['load_average'][1]} at the end (other sessions share the machine). `{CODE}` "
        f"(all overhead), {row['slots']} slots in every arm (the pool: "
        f"{row['sandboxes']} local sandboxes x {row['slots'] // row['sandboxes']}); "
        f"{row['sequential']} sequential calls for the latency, {row['concurrent']} calls from "
        f"{row['concurrency']} callers at once for calls/s. *zygote*: `ZygotePool.run` in "
        "process (the floor); *node*: the node sandbox over loopback HTTP; *stdio*: the pool in "
        "process, through each sandbox's worker over stdin/stdout; *pool*: loopback HTTP to "
        "`serve-pool`, then the pool (what the tool sees with `--sandbox=modal`). The local "
        "backend's sandboxes are bubblewrap containers entered with `nsenter`: Modal's exec "
        "streams cross the network, which is not measured here. Raw row: "
        "`docs/cpu-runs/modal_pool.json`.",
        "",
        "| arm | p50 ms | p99 ms | overhead over zygote (p50) ms | calls/s | failed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm, cells in row["arms"].items():
        extra = [round(c["p50_ms"] - f, 2) for c, f in zip(cells, floors, strict=True)]
        joined = {k: " / ".join(str(c[k]) for c in cells) for k in cells[0]}
        lines.append(
            f"| {arm} | {joined['p50_ms']} | {joined['p99_ms']} | "
            f"{' / '.join(map(str, extra))} | {joined['calls_per_s']} | {joined['failed']} |"
        )
    ready = row["sandbox_ready_ms"]
    lines += [
        "",
        f"A local sandbox was ready (container, worker, its self-test) in {ready['p50_ms']} ms "
        f"(p50 of {row['sandboxes']}); Modal's create-to-first-command is 2.7 s median, 22 s p99 "
        "as measured by others (docs/sandbox-security.md).",
        "",
    ]
    section = "\n".join(lines)
    text = out.read_text()
    pattern = re.escape(HEADING) + r".*?" + NEXT_HEADING
    text = (
        re.sub(pattern, lambda _: section.rstrip("\n") + "\n", text, flags=re.S)
        if HEADING in text
        else text.rstrip("\n") + "\n\n" + section
    )
    out.write_text(text)
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slots", type=int, default=8, help="slots in every arm")
    parser.add_argument("--sandboxes", type=int, default=2, help="the pool's sandboxes")
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2, help="rounds per arm")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    counts = (args.slots, args.sandboxes, args.sequential, args.concurrent, args.concurrency)
    if min(*counts, args.runs) < 1:
        parser.error("every count must be >= 1")
    if args.slots % args.sandboxes:
        parser.error("--slots must be a multiple of --sandboxes")
    row = asyncio.run(bench(args))
    raw = REPO / "docs" / "cpu-runs" / "modal_pool.json"
    raw.write_text(json.dumps(row, indent=2) + "\n")
    print(write_docs(row, Path(args.out)))


if __name__ == "__main__":
    main()
