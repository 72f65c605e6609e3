"""A sandbox on every DAPO node: started before Ray, reached on loopback by the tool."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
from verl.tools.tool_registry import initialize_tools_from_config

from recipe.retool import tool_sandbox
from recipe.retool.core.constants import RAY_TOKEN_ENV
from recipe.retool.core.paths import Layout
from recipe.retool.core.request import LaunchError, LaunchRequest, parse
from recipe.retool.core.topology import Topology
from recipe.retool.launch import TOOL_CONFIG_FILE
from recipe.retool.stages import ray_cluster
from recipe.retool.stages.dapo import dapo_on_node
from sandbox.isolation import Isolation
from tests.recipe.test_paths import make_step, mark_tracked


def never_deployed() -> str:
    raise AssertionError("the deployed endpoint was looked up")


class NodeProcesses:
    """This node's ``ray start`` and ``main_ppo``. At each, what a Ray worker of the node does with
    the environment it inherits: verl builds the tool from its yaml (OmegaConf resolves
    SANDBOX_FUSION_ENDPOINT there) and the tool runs code."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.tool_urls: list[str] = []
        self.outputs: list[str] = []

    def __call__(self, command: Sequence[str], env: dict[str, str]) -> int:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            (tool,) = initialize_tools_from_config(str(TOOL_CONFIG_FILE))
        response, _, _ = asyncio.run(tool.execute("call-1", {"code": "6 * 7"}))
        self.tool_urls.append(tool.client.url)
        self.outputs.append(response.text.strip())
        exp = next((a.split("=", 1)[1] for a in command if "trainer.experiment_name=" in a), None)
        if exp:  # main_ppo: one complete step
            make_step(self.layout, "dapo", exp, 1)
            mark_tracked(self.layout, "dapo", exp, 1)
        return 0


@pytest.fixture
def layout(tmp_path: Path, monkeypatch) -> Layout:
    monkeypatch.delenv("SANDBOX_FUSION_ENDPOINT", raising=False)
    layout = Layout.local(tmp_path)
    make_step(layout, "sft", "s1", 3)
    mark_tracked(layout, "sft", "s1", 3)
    return layout


def node_sandbox_answers() -> bool:
    try:
        return httpx.get(tool_sandbox.NODE_SANDBOX_URL.replace("run_code", "v1/ping")).is_success
    except httpx.TransportError:
        return False


def test_a_ray_worker_node_starts_its_sandbox_first_and_its_tools_use_it(
    layout, monkeypatch
) -> None:
    """Node 1 of 2: by the time ``ray start`` runs, the node's sandbox answers at the loopback
    URL that the node's Ray workers inherit; it stops when the node's part of the job ends."""
    monkeypatch.setenv(RAY_TOKEN_ENV, "t" * 64)
    monkeypatch.setattr(ray_cluster, "_head_listens", lambda topo: True)  # the head at 10.0.0.5
    worker = Topology(gpus_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.5")
    node = NodeProcesses(layout)
    result = dapo_on_node(
        layout,
        worker,
        LaunchRequest("dapo", experiment="d"),
        deployed_url=never_deployed,
        runner=node,
    )
    assert result is None  # a worker node runs no main_ppo
    assert node.tool_urls == [tool_sandbox.NODE_SANDBOX_URL]
    assert node.outputs == ["42"]
    assert not node_sandbox_answers()


def test_a_single_node_run_sends_its_tool_calls_to_its_own_sandbox(layout) -> None:
    node = NodeProcesses(layout)
    result = dapo_on_node(
        layout,
        Topology(gpus_per_node=8),
        LaunchRequest("dapo", experiment="d"),
        deployed_url=never_deployed,
        runner=node,
    )
    assert result.returncode == 0 and result.checkpoint.step == 1
    assert node.tool_urls == [tool_sandbox.NODE_SANDBOX_URL] and node.outputs == ["42"]


def test_an_explicit_endpoint_or_deployed_option_starts_no_node_sandbox(monkeypatch) -> None:
    def no_node():
        raise AssertionError("a node sandbox was started")

    def url(choice: str | None) -> str:
        with tool_sandbox.tool_sandbox(
            choice, deployed_url=lambda: "https://deployed/run_code", start_node=no_node
        ) as found:
            return found

    assert url("deployed") == "https://deployed/run_code"
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://sandbox:8080/run_code")
    assert url(None) == url("node") == url("deployed") == "http://sandbox:8080/run_code"


def test_a_wrong_sandbox_option_is_one_line_before_anything_starts(layout) -> None:
    with pytest.raises(LaunchError, match="--sandbox=local: choose node or deployed"):
        dapo_on_node(layout, Topology(gpus_per_node=8), parse("dapo", ["--sandbox=local"]),
                            deployed_url=never_deployed, runner=NodeProcesses(layout))  # fmt: skip


def test_the_node_sandbox_refuses_mode_none(monkeypatch) -> None:
    """In mode none user code would run as the trainer's uid, next to its secrets."""
    import sandbox.isolation

    monkeypatch.setattr(sandbox.isolation, "detect", lambda s: Isolation("none", "python3"))
    with (
        pytest.raises(tool_sandbox.NodeSandboxError, match="--sandbox=deployed"),
        tool_sandbox.node_sandbox(),
    ):
        pass


def test_a_required_mode_the_node_lacks_is_one_line(monkeypatch) -> None:
    """SANDBOX_ISOLATION=bwrap (the lent GPUs): no weaker mode, and no traceback, without it."""
    import sandbox.isolation

    monkeypatch.setenv("SANDBOX_ISOLATION", "bwrap")
    monkeypatch.setattr(sandbox.isolation.shutil, "which", lambda name: None)
    with (
        pytest.raises(
            tool_sandbox.NodeSandboxError,
            match=r"^node sandbox: no isolation mode works here \(bwrap: no bwrap on PATH\); or",
        ),
        tool_sandbox.node_sandbox(),
    ):
        pass


def test_a_taken_node_port_is_one_line_not_someone_elses_server() -> None:
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", tool_sandbox.NODE_SANDBOX_PORT))
        other.listen()
        with (
            pytest.raises(tool_sandbox.NodeSandboxError, match=r"is taken.*--sandbox=deployed"),
            tool_sandbox.node_sandbox(),
        ):
            pass
