"""A multi-node DAPO job's Ray cluster: node 0 starts the head, the others join it, every node
with the same token and without Ray's open metrics ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from recipe.retool.core.constants import RAY_TOKEN_ENV
from recipe.retool.core.request import LaunchError
from recipe.retool.core.topology import Topology
from recipe.retool.launch import commands
from recipe.retool.launch.commands import ray_address, ray_node_command
from recipe.retool.stages.process import Runner, run_subprocess

# Ray 2.60 serves Prometheus metrics, without its token, on every interface from three processes,
# whatever --node-ip-address says (a loopback one is replaced by the routable address):
# - the dashboard agent's exporter (--metrics-export-port): off with enable_metrics_collection=0,
#   which the raylet turns into the agent's --disable-metrics-collection;
# - the dashboard head's (44227) and the autoscaler monitor's (44217): Ray offers no host for
#   them and catches any error starting them (dashboard/head.py, autoscaler/_private/monitor.py),
#   so a port they cannot bind leaves them off. Nothing in a run reads these metrics.
# What stays open then (docs/sandbox-security.md, "What stays open"): Ray's gRPC ports (GCS,
# raylets, workers, the agent), which demand RAY_AUTH_TOKEN; the dashboard on 127.0.0.1 and the
# agents on the node's own address, which answer 401 without it.
RAY_METRICS_OFF_ENV = {
    "RAY_enable_metrics_collection": "0",
    "DASHBOARD_METRIC_PORT": "-1",
    "AUTOSCALER_METRIC_PORT": "-1",
}


# Ray 2.60 turns token authentication on by itself only for a process that starts a cluster
# (`ray start --head`, a local ray.init); a node joining with `ray start --address`, or a driver
# connecting, leaves it off and sends no token, and the head refuses it ("InvalidAuthToken")
# (ray/_private/authentication/authentication_token_setup.py). Every process of a multi-node run
# names the mode, and every node holds the same token in RAY_AUTH_TOKEN, which Ray reads before
# ~/.ray/auth_token: the containers of a Modal cluster share no home directory, so a token the
# head generated there would reach no other node. The Modal app hands every node the same
# per-launch token as a secret (modal_common.ray_cluster_secret).
RAY_CLUSTER_ENV = {"RAY_AUTH_MODE": "token"}


def _alive_ray_nodes(env: dict[str, str]) -> int:
    """Alive nodes of the cluster at ``RAY_ADDRESS`` (0 while it does not answer)."""
    probe = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, **env}, check=False)  # fmt: skip
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout else 0


def _head_listens(topo: Topology) -> bool:
    """Whether the Ray head's GCS port accepts connections yet."""
    try:
        with socket.create_connection((topo.master_addr, commands.RAY_PORT), timeout=2):
            return True
    except OSError:
        return False


def join_ray_cluster(
    topo: Topology,
    env: dict[str, str],
    *,
    runner: Runner = run_subprocess,
    alive_nodes: Callable[[dict[str, str]], int] = _alive_ray_nodes,
    head_listens: Callable[[Topology], bool] | None = None,
    timeout_s: float = 900,
    poll_s: float = 5,
) -> None:
    """Multi-node DAPO: node 0 starts the Ray head and waits for every node; the others join
    once the head listens (a ``ray start`` aimed at no head waits minutes for the GCS before it
    fails, measured with Ray 2.60) and serve until the cluster ends. Every node must hold the
    same ``RAY_AUTH_TOKEN`` (in ``env`` or this process's environment)."""
    if not (env.get(RAY_TOKEN_ENV) or os.environ.get(RAY_TOKEN_ENV)):
        raise LaunchError(
            f"multi-node DAPO needs {RAY_TOKEN_ENV}, the same on every node (the Modal app's "
            "train_dapo_multinode sets it)"
        )
    command = ray_node_command(topo)
    env = {**env, **RAY_CLUSTER_ENV}
    deadline = time.monotonic() + timeout_s
    if topo.node_rank == 0:
        if runner(command, env) != 0:
            raise RuntimeError("the Ray head did not start")
        head_env = env | {"RAY_ADDRESS": ray_address(topo)}
        while (alive := alive_nodes(head_env)) < topo.nnodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{alive} of {topo.nnodes} nodes joined within {timeout_s:.0f} s"
                )
            time.sleep(poll_s)
        return
    while True:
        if (head_listens or _head_listens)(topo):
            started = time.monotonic()
            if runner(command, env) == 0 or time.monotonic() - started > 60:
                return  # joined and served until the cluster went away
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not join the Ray head at {topo.master_addr}")
        time.sleep(poll_s)
