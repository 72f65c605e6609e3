"""``make bench-tool-sandbox``: DAPO's tool calls against the node's own sandbox vs a remote one.

A DAPO-like load: ``--rollouts`` concurrent multi-turn rollouts (256), each making ``--calls``
sequential code-interpreter calls (4) of ReTool-like snippets (sympy, numpy, integer loops), the
next call only after the previous answer, as the tool agent loop does. One ``SandboxClient``
carries them all (the tool's client: retries, bounded concurrency, keep-alive connections).
Two loads: back to back (no time between a rollout's calls: the sandbox saturated, its queue
sets the latency), and with the model's generation before each call (uniform within +-50% of a
mean chosen so that the offered load is ``--utilization`` of what the node sandbox served back
to back: a sandbox with headroom, as on a node with many cores, where latency is service time
plus distance; there ``calls_per_s`` is the offered load, not a capacity).

- **node**: the project's sandbox on loopback, as every DAPO node now runs it.
- **remote (simulated)**: the *same* sandbox behind a delay proxy. Modal cannot be reached from
  here, so the round trip to the deployed endpoint is an assumption, not a measurement: every
  byte is held ``--rtt-ms``/2 each way, and each new connection first waits ``--handshake-rtts``
  round trips (TCP + TLS 1.3) before its first byte. The remote sandbox's CPUs are this
  machine's as well, so the remote arm shows what distance alone costs; a real deployment adds
  Modal's proxy and cold starts on top, and has CPUs of its own.

Writes the section "Tool calls: node sandbox vs a remote endpoint" of docs/benchmarks.md and the
raw numbers to docs/cpu-runs/tool_sandbox.json. One run takes well under 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_sandbox import NEXT_HEADING, machine  # noqa: E402

from sandbox.client import SandboxClient  # noqa: E402
from sandbox.local import sandbox_service  # noqa: E402

# What ReTool's traces compute; rollout i, call j runs SNIPPETS[(i + j) % 4].
SNIPPETS = (
    "import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 5*x + 6, x))",
    "import numpy as np\nprint(round(float(np.linalg.det(np.array([[2, 1], [1, 3]]))), 6))",
    "from math import comb\nprint(sum(comb(20, k) for k in range(0, 21, 2)))",
    "print(sum(i * i for i in range(1, 10_001)))",
)
HEADING = "## Tool calls: node sandbox vs a remote endpoint"


async def delay_proxy(upstream_port: int, rtt_s: float, handshake_rtts: float) -> asyncio.Server:
    """A TCP proxy to 127.0.0.1:``upstream_port`` that adds a round trip (see module docstring)."""
    loop = asyncio.get_running_loop()

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            while data := await src.read(1 << 16):
                queue.put_nowait((loop.time() + rtt_s / 2, data))
            queue.put_nowait((loop.time() + rtt_s / 2, b""))

        async def write() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    dst.close()
                    return
                dst.write(data)
                await dst.drain()

        await asyncio.gather(read(), write())

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(handshake_rtts * rtt_s)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (ConnectionError, asyncio.CancelledError):  # cancelled: the bench is over
            writer.close()
            up_writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def quantile_ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


async def drive(url: str, rollouts: int, calls: int, think_s: float = 0.0) -> dict:
    """Every rollout makes ``calls`` sequential calls, ``think_s`` apart on average (generation
    before each tool call); all rollouts at once. Rollout ``i`` draws its pauses from its own
    seeded generator, so both arms see the same pauses whatever order the calls finish in."""
    client = SandboxClient(url, max_concurrency=rollouts, timeout_s=120, max_retries=4)
    latencies: list[float] = []
    per_rollout: list[float] = []
    wrong = 0

    async def rollout(i: int) -> None:
        nonlocal wrong
        rng = random.Random(i)
        spent = 0.0
        for j in range(calls):
            if think_s:
                await asyncio.sleep(think_s * rng.uniform(0.5, 1.5))
            start = time.perf_counter()
            result = await client.run_code(SNIPPETS[(i + j) % len(SNIPPETS)], run_timeout=30)
            latencies.append(time.perf_counter() - start)
            spent += latencies[-1]
            wrong += not result.ok
        per_rollout.append(spent)

    t0 = time.perf_counter()
    await asyncio.gather(*(rollout(i) for i in range(rollouts)))
    wall = time.perf_counter() - t0
    await client.aclose()
    return {
        "calls": len(latencies),
        "failed": wrong,
        "wall_s": round(wall, 2),
        "calls_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(quantile_ms(latencies, 50), 1),
        "p99_ms": round(quantile_ms(latencies, 99), 1),
        "rollout_tool_time_p50_s": round(statistics.median(per_rollout), 2),
    }


def write_docs(row: dict, out: Path) -> str:
    cols = ("p50_ms", "p99_ms", "calls_per_s", "rollout_tool_time_p50_s", "failed")
    lines = [
        HEADING,
        "",
        f"`make bench-tool-sandbox` (`scripts/bench_tool_sandbox.py`). Machine: {row['machine']}.",
        f"{row['rollouts']} concurrent rollouts x {row['calls']} sequential calls of ReTool-like "
        "snippets (sympy solve, numpy det, `comb` sum, integer loop), one shared tool client; "
        "back to back, and with a pause for generation before each call (uniform, mean "
        f"{row['think_ms'] / 1000:g} s +-50%, for an offered load of {row['utilization']:.0%} of "
        "what the node sandbox served back to back; there calls_per_s is the offered load). "
        "**remote is simulated**, Modal being out of reach: the "
        f"same sandbox behind a delay proxy adding {row['rtt_ms']:g} ms per round trip and "
        f"{row['handshake_rtts']:g} round trips (TCP + TLS) per new connection; its CPUs are "
        "this machine's too, so it shows what distance alone costs. Raw row: "
        "`docs/cpu-runs/tool_sandbox.json`.",
        "",
        "| load | sandbox | " + " | ".join(cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for load, arms in row["loads"].items():
        for arm, cell in arms.items():
            lines.append(f"| {load} | {arm} | " + " | ".join(str(cell[c]) for c in cols) + " |")
    lines.append("")
    section = "\n".join(lines)
    text = out.read_text()
    pattern = re.escape(HEADING) + r".*?" + NEXT_HEADING
    text = (
        re.sub(pattern, section.rstrip("\n") + "\n", text, flags=re.S)
        if HEADING in text
        else text.rstrip("\n") + "\n\n" + section
    )
    out.write_text(text)
    return section


async def bench(args: argparse.Namespace) -> None:
    with sandbox_service("--log-level", "warning") as base:
        port = int(base.rsplit(":", 1)[1])
        proxy = await delay_proxy(port, args.rtt_ms / 1000, args.handshake_rtts)
        remote = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
        arms = (("node", base), ("remote", remote))
        await drive(base, 16, 2)  # warm-up: the zygote's first runs, sympy's caches
        row = {
            "machine": machine(),
            "rollouts": args.rollouts,
            "calls": args.calls,
            "rtt_ms": args.rtt_ms,
            "handshake_rtts": args.handshake_rtts,
            "utilization": args.utilization,
            "loads": {},
        }
        saturated = {arm: await drive(url, args.rollouts, args.calls) for arm, url in arms}
        row["loads"]["back to back"] = saturated
        print("back to back", saturated, flush=True)
        think_s = args.rollouts / (args.utilization * saturated["node"]["calls_per_s"])
        row["think_ms"] = round(think_s * 1000)
        paused = {arm: await drive(url, args.rollouts, args.calls, think_s) for arm, url in arms}
        row["loads"]["with generation"] = paused
        print("with generation", paused, flush=True)
        proxy.close()
    print(json.dumps(row, indent=2))
    raw = REPO / "docs" / "cpu-runs" / "tool_sandbox.json"
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps(row, indent=2) + "\n")
    print(write_docs(row, Path(args.out)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rollouts", type=int, default=256, help="concurrent rollouts")
    parser.add_argument("--calls", type=int, default=4, help="sequential tool calls per rollout")
    parser.add_argument("--rtt-ms", type=float, default=30.0, help="simulated round trip")
    parser.add_argument("--handshake-rtts", type=float, default=2.0, help="per new connection")
    parser.add_argument(
        "--utilization", type=float, default=0.5,
        help="paused load: offered calls/s as a share of the node sandbox's back-to-back rate",
    )  # fmt: skip
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    if min(args.rollouts, args.calls) < 1 or min(args.rtt_ms, args.handshake_rtts) < 0:
        parser.error("--rollouts and --calls must be >= 1, --rtt-ms and --handshake-rtts >= 0")
    if not 0 < args.utilization <= 1:
        parser.error("--utilization must be in (0, 1] (the back-to-back load is always run)")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
