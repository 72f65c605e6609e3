"""``make bench-sandbox``: our warm-pool sandbox vs the naive subprocess-per-request baseline.

Starts both servers on free 127.0.0.1 ports, drives each with ``sandbox.client.SandboxClient`` at
concurrency 1, 8 and 32 for three workloads, and writes the table into ``docs/benchmarks.md``
(section "Sandbox"). Each cell runs for at most ``--seconds`` (and ``--max-requests``), so the
whole bench stays under ~5 minutes on 2 cores. The table names the isolation mode our server ran
in: the one this machine gives it (detected here, from the same ``SANDBOX_*`` settings the server
inherits), pinned with ``--isolation`` so the server runs exactly that mode or refuses to start.

``--sandbox-fusion-url URL`` (off by default) adds an already running SandboxFusion as a third
server in the same run (each cell: ours, naive, SandboxFusion) and writes that table to the
subsection "Against the real SandboxFusion (run from source)" instead, leaving the main table as
it is; ``--sandbox-fusion-note`` says there which SandboxFusion it was and how it ran.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.client import SandboxClient  # noqa: E402
from sandbox.isolation import WEAKNESS, InsecureIsolation, Isolation, detect  # noqa: E402
from sandbox.local import free_port, start_server  # noqa: E402
from sandbox.settings import Settings, SettingsError  # noqa: E402

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


def start(argv: list[str], port: int) -> subprocess.Popen:
    return start_server([*argv, "--port", str(port)], port)


def start_ours(port: int) -> tuple[subprocess.Popen, Isolation]:
    """Our server, and the isolation it runs in: detected with the settings it inherits, then
    pinned, so that a table never names a mode that did not run (it once said "bubblewrap"
    whatever ran)."""
    isolation = detect(Settings.from_env())
    argv = [sys.executable, "-m", "sandbox", "serve", "--log-level", "warning"]
    return start([*argv, "--isolation", isolation.mode], port), isolation


def ours_description(isolation: Isolation) -> str:
    """How *ours* ran, for the tables: the mode, its weakness if any, the user code's python."""
    strength = "secure" if isolation.secure else f"INSECURE: {WEAKNESS[isolation.mode]}"
    python = isolation.probe.get("python", "?")
    return (
        f"`python -m sandbox serve --isolation {isolation.mode}` ({strength}; warm zygote, "
        f"default slots, user code on python {python})"
    )


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


SF_HEADING = "### Against the real SandboxFusion (run from source)"
NEXT_HEADING = r"(?=\n#{2,} |\Z)"  # a section ends where any heading of level >= 2 starts


def write_markdown(rows: list[tuple], out: Path, seconds: float, isolation: Isolation) -> str:
    lines = [
        "## Sandbox",
        "",
        f"Machine: {machine()}.",
        "",
        "Produced by `make bench-sandbox` (`scripts/bench_sandbox.py`); each cell runs up to",
        f"{seconds:g} s. *ours*: {ours_description(isolation)}; *naive*:",
        "`scripts/naive_sandbox_server.py` (the seed's subprocess per request).",
        "Latency is client-side, HTTP included.",
        "",
        "| workload | conc | ours req/s | naive req/s | speed-up | ours p50 ms | ours p99 ms "
        "| naive p50 ms | naive p99 ms | errors ours/naive |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, conc, ours, naive, _ in rows:
        lines.append(
            f"| {name} | {conc} | {ours['rps']:.1f} | {naive['rps']:.2f} | "
            f"{ours['rps'] / naive['rps']:.1f}× | {ours['p50']:.1f} | {ours['p99']:.1f} | "
            f"{naive['p50']:.0f} | {naive['p99']:.0f} | {ours['errors']}/{naive['errors']} |"
        )
    section = "\n".join(lines) + "\n"
    text = out.read_text() if out.exists() else "# Benchmarks\n\n"
    if "## Sandbox\n" in text:
        text = re.sub(
            r"## Sandbox\n.*?" + NEXT_HEADING, section.rstrip("\n") + "\n", text, flags=re.S
        )
    else:
        text = text.rstrip("\n") + "\n\n" + section
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return section


def write_sf_markdown(
    rows: list[tuple], out: Path, seconds: float, note: str, isolation: Isolation
) -> str:
    """The 3-way table, in its own subsection under "## Sandbox" (the main table is kept)."""
    lines = [
        SF_HEADING,
        "",
        f"Machine: {machine()}.",
        "",
        "Produced by `scripts/bench_sandbox.py --sandbox-fusion-url URL` (one run, the three",
        f"servers driven in turn for each cell, up to {seconds:g} s a cell). *ours*:",
        f"{ours_description(isolation)}. *SF*: {note}",
        "",
        "| workload | conc | ours req/s | naive req/s | SF req/s | ours/SF | ours p50 ms "
        "| ours p99 ms | naive p50 ms | SF p50 ms | SF p99 ms | errors ours/naive/SF |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, conc, ours, naive, sf in rows:
        ratio = f"{ours['rps'] / sf['rps']:.1f}×" if sf["rps"] else "n/a"
        lines.append(
            f"| {name} | {conc} | {ours['rps']:.1f} | {naive['rps']:.2f} | {sf['rps']:.2f} | "
            f"{ratio} | {ours['p50']:.1f} | {ours['p99']:.1f} | {naive['p50']:.0f} | "
            f"{sf['p50']:.0f} | {sf['p99']:.0f} | "
            f"{ours['errors']}/{naive['errors']}/{sf['errors']} |"
        )
    section = "\n".join(lines) + "\n"
    text = out.read_text() if out.exists() else "# Benchmarks\n\n## Sandbox\n"
    if SF_HEADING in text:
        pattern = re.escape(SF_HEADING) + r"\n.*?" + NEXT_HEADING
        text = re.sub(pattern, lambda _: section.rstrip("\n") + "\n", text, flags=re.S)
    elif "## Sandbox\n" in text:
        pattern = r"## Sandbox\n.*?" + NEXT_HEADING
        text = re.sub(
            pattern, lambda m: m.group(0).rstrip("\n") + "\n\n" + section, text, count=1, flags=re.S
        )
    else:
        text = text.rstrip("\n") + "\n\n## Sandbox\n\n" + section
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return section


async def bench(args: argparse.Namespace) -> None:
    ours_port, naive_port = free_port(), free_port()
    ours, isolation = start_ours(ours_port)
    naive = start([sys.executable, "scripts/naive_sandbox_server.py"], naive_port)
    sf_url = args.sandbox_fusion_url.rstrip("/") if args.sandbox_fusion_url else None
    rows = []
    try:
        if sf_url:
            httpx.get(f"{sf_url}/v1/ping", timeout=5).raise_for_status()
        for name, code in WORKLOADS.items():
            for conc in CONCURRENCY:
                r_ours = await cell(
                    f"http://127.0.0.1:{ours_port}", code, conc, args.seconds, args.max_requests
                )
                r_naive = await cell(
                    f"http://127.0.0.1:{naive_port}", code, conc, args.seconds, args.max_requests
                )
                r_sf = None
                if sf_url:
                    r_sf = await cell(sf_url, code, conc, args.seconds, args.max_requests)
                rows.append((name, conc, r_ours, r_naive, r_sf))
                extra = f" sf {r_sf}" if r_sf else ""
                print(f"{name:>15} c={conc:<3} ours {r_ours} naive {r_naive}{extra}", flush=True)
    finally:
        for proc in (ours, naive):
            proc.terminate()
            proc.wait(10)
    if sf_url:
        note = args.sandbox_fusion_note
        print(write_sf_markdown(rows, Path(args.out), args.seconds, note, isolation))
    else:
        print(write_markdown(rows, Path(args.out), args.seconds, isolation))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of one cell")
    parser.add_argument("--max-requests", type=int, default=3000)
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument(
        "--sandbox-fusion-url",
        default=None,
        help="a running SandboxFusion (e.g. http://127.0.0.1:8080) to add as a third server; "
        "the table then goes to the subsection 'Against the real SandboxFusion'",
    )
    parser.add_argument(
        "--sandbox-fusion-note",
        default="SandboxFusion at the given URL.",
        help="which SandboxFusion that is and how it runs (commit, config), for the docs",
    )
    args = parser.parse_args()
    try:
        asyncio.run(bench(args))
    except (InsecureIsolation, SettingsError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
