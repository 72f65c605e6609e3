"""A sandbox on every DAPO node: started before Ray, reached on loopback by the tool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from verl.tools.tool_registry import initialize_tools_from_config

from recipe.retool.core.constants import RAY_TOKEN_ENV
from recipe.retool.core.paths import Layout
from recipe.retool.core.request import LaunchError, LaunchRequest, parse
from recipe.retool.core.topology import Topology
from recipe.retool.launch.check import main
from recipe.retool.launch.commands import TOOL_CONFIG_FILE
from recipe.retool.stages import ray_cluster, tool_sandbox
from recipe.retool.stages.dapo import dapo_on_node
from sandbox.backends import TAG_KEY
from sandbox.fleet import REPORT_JSON
from sandbox.local_backend import LocalBackend
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
    with pytest.raises(LaunchError, match="--sandbox=local: choose node or deployed or modal"):
        dapo_on_node(layout, Topology(gpus_per_node=8), parse("dapo", ["--sandbox=local"]),
                            deployed_url=never_deployed, runner=NodeProcesses(layout))  # fmt: skip


def test_the_node_sandbox_refuses_mode_none(monkeypatch) -> None:
    """In mode none user code would run as the trainer's uid, next to its secrets."""
    monkeypatch.setenv("SANDBOX_ISOLATION", "none")
    with (
        pytest.raises(tool_sandbox.NodeSandboxError, match="--sandbox=modal or --sandbox=deployed"),
        tool_sandbox.node_sandbox(),
    ):
        pass


def test_a_required_mode_the_node_lacks_is_one_line(monkeypatch, tmp_path) -> None:
    """SANDBOX_ISOLATION=bwrap (the lent GPUs): no weaker mode, and no traceback, without it."""
    monkeypatch.setenv("SANDBOX_ISOLATION", "bwrap")
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    with (
        pytest.raises(
            tool_sandbox.NodeSandboxError,
            match=r"^node sandbox: no isolation mode works here \(bwrap: no bwrap on PATH\); or",
        ),
        tool_sandbox.node_sandbox(),
    ):
        pass


class Starts:
    """A stand-in for one way to start a tool sandbox: records that it was tried; fails with
    ``error`` when given."""

    def __init__(self, url: str, error: str | None = None) -> None:
        self.url, self.error, self.tried = url, error, 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[str]:
        self.tried += 1
        if self.error:
            raise tool_sandbox.NodeSandboxError(self.error)
        yield self.url


def chosen(choice: str | None, node: Starts, pool: Starts) -> str:
    with tool_sandbox.tool_sandbox(
        choice, deployed_url=never_deployed, start_node=node, start_pool=pool
    ) as url:
        return url


def test_production_takes_the_node_then_modal_sandboxes_then_stops(capsys) -> None:
    """No --sandbox: this node's sandbox when it starts (its self-test passed); else the pool of
    Modal Sandboxes; else one line with both reasons, before anything trains. Never none."""
    node, pool = Starts("http://node/run_code"), Starts("http://pool/run_code")
    assert chosen(None, node, pool) == "http://node/run_code" and pool.tried == 0
    refused = Starts("", "node sandbox: self-test failed: network: a call reached 10.0.0.2:1")
    assert chosen(None, refused, pool) == "http://pool/run_code" and refused.tried == 1
    assert "auto: this node's (bwrap/unshare, if its self-test passes), else Modal" in (
        capsys.readouterr().out
    )
    no_pool = Starts("", "modal sandboxes: no sandbox of pool p started")
    with pytest.raises(tool_sandbox.NodeSandboxError) as err:
        chosen(None, refused, no_pool)
    assert str(err.value) == (
        "no tool sandbox works: node sandbox: self-test failed: network: a call reached "
        "10.0.0.2:1; modal sandboxes: no sandbox of pool p started"
    )


def test_a_forced_choice_tries_nothing_else() -> None:
    refused = Starts("", "node sandbox: self-test failed: mount: ...")
    pool = Starts("http://pool/run_code")
    with pytest.raises(tool_sandbox.NodeSandboxError, match="self-test failed: mount"):
        chosen("node", refused, pool)
    assert pool.tried == 0
    node = Starts("http://node/run_code")
    assert chosen("modal", node, pool) == "http://pool/run_code" and node.tried == 0


def test_the_pool_is_sized_from_the_steps_expected_concurrency(monkeypatch) -> None:
    """64 prompts x 16 samples, but at most 64 calls in flight in each of verl's 8 agent-loop
    workers: 512 calls at once, 16 per sandbox."""
    assert tool_sandbox.expected_tool_concurrency() == 512
    assert tool_sandbox.pool_size() == 32
    assert tool_sandbox.pool_size(nodes=4) == 8  # each node's own pool serves its share
    small = ["data.train_batch_size=4", "actor_rollout_ref.rollout.n=4"]
    assert tool_sandbox.expected_tool_concurrency(small) == 16
    assert tool_sandbox.pool_size(small) == 1
    monkeypatch.setenv(tool_sandbox.POOL_SIZE_ENV, "3")
    assert tool_sandbox.pool_size() == 3
    monkeypatch.setenv(tool_sandbox.POOL_SIZE_ENV, "many")
    with pytest.raises(tool_sandbox.NodeSandboxError, match="expected a count"):
        tool_sandbox.pool_size()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None,
    reason="the local sandbox backend needs root and bubblewrap",
)
def test_dapo_with_sandbox_modal_sends_its_tool_calls_to_the_pool(
    layout, monkeypatch, tmp_path
) -> None:
    """--sandbox=modal, on this machine's own sandboxes (no Modal account here): the tool, built
    from its yaml as verl builds it, runs code in the pool through the node's loopback URL; at
    the end no sandbox of the pool is left and its report is written beside the run's. The
    pool is named after the experiment and node (what a retried attempt's start reaps by)."""
    experiment = f"d-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(tool_sandbox.POOL_SIZE_ENV, "1")
    started, modal_sandbox = [], tool_sandbox.modal_sandbox

    def pool(**kwargs):
        started.append(kwargs)
        return modal_sandbox(backend="local", **kwargs)

    monkeypatch.setattr(tool_sandbox, "modal_sandbox", pool)
    node = NodeProcesses(layout)
    result = dapo_on_node(
        layout,
        Topology(gpus_per_node=8),
        parse("dapo", [f"--experiment-name={experiment}", "--sandbox=modal"]),
        deployed_url=never_deployed, runner=node,
    )  # fmt: skip
    assert result.returncode == 0
    assert node.tool_urls == [tool_sandbox.NODE_SANDBOX_URL] and node.outputs == ["42"]
    assert not node_sandbox_answers()
    name = f"{experiment}-node0"
    assert [kw["name"] for kw in started] == [name]
    assert asyncio.run(LocalBackend().list({TAG_KEY: name})) == []
    report_dir = layout.experiment_dir("dapo", experiment)
    assert "## Tool calls (sandbox-pool.md)" in (report_dir / "report.md").read_text()
    report = json.loads((report_dir / REPORT_JSON).read_text())
    assert report["calls"] >= 2 and report["pool"]["backend"] == "local"  # self-test + the tool


def test_launch_check_with_sandbox_modal_stays_offline(monkeypatch, capsys) -> None:
    """``launch check dapo --sandbox=modal`` validates the launch and makes no sandbox."""
    import modal

    def no(*args, **kwargs):
        raise AssertionError("a sandbox was made")

    monkeypatch.setattr(modal.Sandbox, "create", no)
    monkeypatch.setattr(tool_sandbox, "modal_sandbox", no)
    assert main(["check", "dapo", "--sandbox=modal"]) == 0
    assert "ok:" in capsys.readouterr().out


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
