"""Hostile programs against local ``/run_code`` servers: which hold, and what happens to the rest.

    python scripts/sandbox_hostile.py ours=http://127.0.0.1:8080 sf=http://127.0.0.1:8081 \\
        --restart sf='bash /path/to/start-sf.sh'

Each case sends one program to each server, then checks the server still answers ``/v1/ping`` and
looks on this host for processes the run left behind. A server that died is restarted with its
``--restart`` command (if given) before the next case. Only loopback URLs are accepted: these
programs kill their parent, read secrets and write outside their directory, so point this only
at servers on this machine that you started (and whose secrets are fake). Prints a markdown table
(used in docs/benchmarks.md, "Against the real SandboxFusion").

Deliberately left out: ``os.kill(-1, 9)`` and an unbounded fork bomb, which on an unconfined
server running as root would take down every process of the machine, not just the server. The
bounded fork below shows the same missing limit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

MARK = uuid.uuid4().hex[:8]
OUTSIDE = f"/etc/sandbox-hostile-{MARK}"  # removed again by this script if a run created it
SLEEP = f"17.{int(MARK, 16) % 10**6:06d}"  # an argv no other process has: counts the leftovers


@dataclass
class Case:
    name: str
    code: str
    judge: Callable[[dict], str]  # response body -> short outcome
    run_timeout: float = 5


def out(body: dict) -> str:
    run = body.get("run_result") or {}
    return (run.get("stdout") or "").strip()


def first_line(text: str, limit: int = 70) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return (lines[-1] if lines else "")[:limit]


def verdict(body: dict) -> str:
    """The run's stdout (else the last line of its stderr), then how it ended."""
    run = body.get("run_result") or {}
    text = out(body) or first_line(run.get("stderr") or "")
    if run.get("status") == "TimeLimitExceeded":
        end = "time-out"
    elif run.get("status") == "Finished":
        end = f"exit {run.get('return_code')}"
    else:
        end = f"{body.get('status')}: {first_line(body.get('message') or '')}"
    return f"{text} ({end})"


CASES = [
    Case(
        "read the server's secrets (env of the run, and of its parent via /proc)",
        "import os\n"
        "mine = [k for k in ('HF_TOKEN', 'WANDB_API_KEY') if k in os.environ]\n"
        "try:\n"
        "    env = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
        "    parent = 'parent env readable, secret in it: %s' % (b'hf_fake' in env)\n"
        "except OSError as e:\n"
        "    parent = 'parent env: ' + type(e).__name__\n"
        "print('own env has', mine or 'none', ';', parent)",
        verdict,
    ),
    Case(
        "read /proc/1/environ and /etc/shadow",
        "res = []\n"
        "for p in ('/proc/1/environ', '/etc/shadow'):\n"
        "    try:\n"
        "        open(p, 'rb').read(1)\n"
        "        res.append(p + ' readable')\n"
        "    except OSError as e:\n"
        "        res.append(p + ' ' + type(e).__name__)\n"
        "print('; '.join(res))",
        verdict,
    ),
    Case(
        f"write outside the temp dir ({OUTSIDE})",
        f"open({OUTSIDE!r}, 'w').write('x')\nprint('wrote {OUTSIDE}')",
        verdict,
    ),
    Case(
        "connect to the server's own port",
        "import socket\n"
        "socket.create_connection(('127.0.0.1', PORT), timeout=2)\n"
        "print('connected')",
        verdict,
    ),
    Case(
        "3 GiB allocation with the default memory_limit_MB (-1)",
        "x = bytearray(3 * 1024**3)\nprint('allocated 3 GiB')",
        verdict,
    ),
    Case(
        "bounded fork bomb: 300 forks, each sleeping 17 s (run_timeout 2)",
        "import os, time\nn = 0\n"
        "try:\n"
        "    for _ in range(300):\n"
        "        if os.fork() == 0:\n"
        f"            os.execv('/bin/sleep', ['sleep', '{SLEEP}'])\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, 'forks, then', type(e).__name__, flush=True)\n"
        "else:\n"
        "    print(n, 'forks', flush=True)\n"
        "time.sleep(30)",
        verdict,
        run_timeout=2,
    ),
    Case(
        "daemon (setsid + double fork) outliving the run",
        "import os\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{SLEEP}'])\n"
        "    os._exit(0)\n"
        "print('daemon started')",
        verdict,
    ),
    Case(
        "kill the parent: os.kill(os.getppid(), 9)",
        "import os\nprint('ppid', os.getppid(), flush=True)\nos.kill(os.getppid(), 9)",
        verdict,
    ),
    Case(
        "kill the process group: os.killpg(os.getpgid(0), 9)",
        "import os\nprint('pgid', os.getpgid(0), flush=True)\nos.killpg(os.getpgid(0), 9)",
        verdict,
    ),
]


def leftovers() -> list[int]:
    """Pids on this host still running this script's marked ``sleep``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if SLEEP.encode() in argv:
                pids.append(int(entry.name))
    return pids


def alive(client: httpx.Client, url: str) -> bool:
    for _ in range(3):
        try:
            if client.get(f"{url}/v1/ping", timeout=3).status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(0.5)
    return False


def wait_up(client: httpx.Client, url: str, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if alive(client, url):
            return True
        time.sleep(0.5)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("servers", nargs="+", help="NAME=URL (loopback only)")
    parser.add_argument("--restart", action="append", default=[], help="NAME=shell command")
    args = parser.parse_args()
    servers = dict(s.split("=", 1) for s in args.servers)
    restart = dict(s.split("=", 1) for s in args.restart)
    for name, url in servers.items():
        if urlparse(url).hostname not in {"127.0.0.1", "localhost", "::1"}:
            raise SystemExit(f"{name}: {url} is not a loopback URL; refusing")
    rows = []
    with httpx.Client(timeout=60) as client:
        for case in CASES:
            cells = []
            for name, url in servers.items():
                url = url.rstrip("/")
                port = urlparse(url).port or 80
                code = case.code.replace("PORT", str(port))
                try:
                    resp = client.post(
                        f"{url}/run_code",
                        json={"code": code, "language": "python", "run_timeout": case.run_timeout},
                    )
                    got = (
                        case.judge(resp.json())
                        if resp.status_code == 200
                        else (f"HTTP {resp.status_code}")
                    )
                except httpx.HTTPError as exc:
                    got = f"no response ({type(exc).__name__})"
                time.sleep(1)
                strays = leftovers()
                if strays:
                    got += f"; {len(strays)} processes left running after the response"
                    for pid in strays:  # this script's own sleeps, by pid
                        with contextlib.suppress(OSError):
                            os.kill(pid, 9)
                if not alive(client, url):
                    got += "; **server dead**"
                    if name in restart:
                        subprocess.Popen(restart[name], shell=True, start_new_session=True)
                        got += " (restarted)" if wait_up(client, url) else " (restart failed)"
                cells.append(got.replace("|", "/"))
                print(f"[{name}] {case.name}: {got}", flush=True)
            rows.append((case.name, cells))
    Path(OUTSIDE).unlink(missing_ok=True)
    names = list(servers)
    print()
    print("| hostile program | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for case_name, cells in rows:
        print(f"| {case_name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
