"""A Ray head started as a multi-node DAPO node starts it (``ray_node_command`` with
``dapo_env`` and the cluster's token mode) serves nothing without the token on a port open
to every interface: Ray 2.60's three Prometheus exporters there stay off."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from recipe.retool.core.constants import RAY_TOKEN_ENV
from recipe.retool.core.topology import Topology
from recipe.retool.launch import commands
from recipe.retool.launch.commands import ray_node_command
from recipe.retool.stages.dapo import dapo_env
from recipe.retool.stages.ray_cluster import RAY_CLUSTER_ENV
from sandbox.local import free_port

WILDCARDS = {"0.0.0.0", "::", "::ffff:0.0.0.0"}


def routable_address() -> str:
    """The address Ray picks as this node's IP (its own routable-address lookup)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def processes_with(marker: str) -> list[psutil.Process]:
    """Processes whose environment holds ``marker`` (every process of one Ray session inherits
    its RAY_TMPDIR; other sessions on the machine do not share it)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if marker in Path(f"/proc/{proc.pid}/environ").read_bytes().decode(errors="replace"):
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


@pytest.mark.slow
def test_a_ray_head_opens_no_port_that_answers_without_the_token(tmp_path, monkeypatch):
    node_ip = routable_address()
    if node_ip.startswith("127."):
        pytest.skip("no routable address here: Ray would bind everything to loopback")
    monkeypatch.setattr(commands, "RAY_PORT", free_port())
    topo = Topology(gpus_per_node=1, nnodes=2, master_addr=node_ip, device="cpu")
    marker = f"/tmp/ray-ports-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ, **dapo_env("http://127.0.0.1:9/run_code"), **RAY_CLUSTER_ENV,
        RAY_TOKEN_ENV: uuid.uuid4().hex, "RAY_TMPDIR": marker,
    }  # fmt: skip
    started = subprocess.run(ray_node_command(topo), env=env, capture_output=True,
                             text=True, timeout=180, check=False)  # fmt: skip
    procs = processes_with(f"RAY_TMPDIR={marker}")
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        time.sleep(5)  # the dashboard and its agent bind their ports after `ray start` returns
        listening = {
            (c.laddr.ip, c.laddr.port)
            for proc in processes_with(f"RAY_TMPDIR={marker}")
            for c in proc.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert commands.RAY_PORT in {port for _, port in listening}  # found this head's sockets
        assert all(ip in WILDCARDS | {node_ip, "127.0.0.1", f"::ffff:{node_ip}", "::ffff:127.0.0.1"}
                   for ip, _ in listening), listening  # fmt: skip
        answered = {}
        for ip, port in sorted(listening):
            if ip in WILDCARDS:
                try:
                    answered[port] = httpx.get(f"http://{node_ip}:{port}/metrics", timeout=3)
                except httpx.HTTPError:
                    continue  # a gRPC port: no HTTP answer at all
        open_ports = {p: r.status_code for p, r in answered.items() if r.status_code == 200}
        assert open_ports == {}, f"answer without the token on every interface: {open_ports}"
    finally:
        for proc in procs + processes_with(f"RAY_TMPDIR={marker}"):
            with contextlib.suppress(psutil.Error):
                proc.kill()
