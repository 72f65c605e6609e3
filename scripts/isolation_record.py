"""Which sandbox isolation modes work on this machine, and what one run sees inside the mode the
server takes: the record ``docs/gpu-runs/isolation_<gpu>.json`` keeps for a lent GPU machine.

    python scripts/isolation_record.py --out docs/gpu-runs/isolation_h100.json [--mode bwrap]

For each mode (strongest first) the start-up probe's result: taken or why not. Then a real server
in ``--mode`` (default: what ``auto`` picks) runs one program that looks around: its pid and
hostname, its uid, the network interfaces it has, whether it can read a file planted outside the
sandbox (beside this script) or ``/etc/shadow``, and what ``/`` holds. Exit 1 when the program
read the planted file. Run it as root, the way the DAPO nodes run the sandbox.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.isolation import MODES, IsolationUnavailable, detect  # noqa: E402
from sandbox.local import sandbox_service  # noqa: E402
from sandbox.settings import Settings  # noqa: E402

LOOK_AROUND = """
import json, os, socket
def read(path):
    try:
        with open(path) as f:
            f.read(1)
            return "read"
    except OSError as exc:
        return f"refused: {type(exc).__name__}"
print(json.dumps({
    "pid": os.getpid(), "hostname": socket.gethostname(), "uid": os.getuid(),
    "net_ifaces": sorted(name for _, name in socket.if_nameindex()),
    "planted_file": read(PLANTED), "etc_shadow": read("/etc/shadow"),
    "root_listing": sorted(os.listdir("/")),
}))
"""


def probe_modes() -> list[dict]:
    """Each mode tried alone (weak ones allowed, so the probe itself decides)."""
    found = []
    base = Settings.from_env()
    for mode in MODES:
        try:
            iso = detect(replace(base, isolation=mode, allow_insecure=True))
        except IsolationUnavailable as exc:
            found.append({"mode": mode, "works": False, "why_not": str(exc)})
            continue
        found.append({"mode": mode, "works": True, "secure": iso.secure})
    return found


def look_around(mode: str, planted: Path) -> dict:
    code = LOOK_AROUND.replace("PLANTED", repr(str(planted)))
    with sandbox_service("--isolation", mode, "--log-level", "warning") as base:
        resp = httpx.post(f"{base}/run_code", json={"code": code, "language": "python"}, timeout=60)
    resp.raise_for_status()
    run = resp.json().get("run_result") or {}
    try:
        return json.loads(run.get("stdout") or "")
    except ValueError:
        return {"run_result": run}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default=None, help="the server's mode (default: auto's pick)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    modes = probe_modes()
    picked = detect(Settings.from_env()).mode  # what a server started with defaults takes
    planted = REPO / f".planted-{uuid.uuid4().hex[:8]}"
    planted.write_text("host secret: the sandbox must not read this\n")
    try:
        seen = look_around(args.mode or picked, planted)
    finally:
        planted.unlink()
    record = {
        "kernel": platform.release(),
        "euid": os.geteuid(),
        "bwrap": shutil.which("bwrap"),
        "modes": modes,
        "auto_picks": picked,
        "server_mode": args.mode or picked,
        "inside": seen,
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    planted_read = seen.get("planted_file")
    if planted_read is None:
        print("isolation record: the program in the sandbox did not report (see run_result)")
        return 1
    if not planted_read.startswith("refused"):
        print(f"isolation record: the run read the planted file in mode {record['server_mode']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
