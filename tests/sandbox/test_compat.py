"""Unchanged third-party clients against a real server: sandbox-fusion 0.3.7 and verl 0.9.1.

They use ``endpoint``, so with ``SANDBOX_FUSION_ENDPOINT`` set they run against the real
SandboxFusion too (same results there: see docs/benchmarks.md).
"""

from __future__ import annotations

import importlib
import uuid

import pytest

from sandbox.client import SandboxClient

sandbox_fusion = pytest.importorskip("sandbox_fusion")


def test_official_client_run_code(endpoint: str) -> None:
    from sandbox_fusion import RunCodeRequest, RunStatus, run_code

    resp = run_code(RunCodeRequest(code="print(2 + 2)", language="python"), endpoint=endpoint)
    assert resp.status == RunStatus.Success
    assert resp.run_result.stdout == "4\n"
    failed = run_code(
        RunCodeRequest(code="raise SystemExit(2)", language="python"), endpoint=endpoint
    )
    assert failed.status == RunStatus.Failed and failed.run_result.return_code == 2


def test_official_client_env_endpoint_and_run_concurrent(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", endpoint)
    from sandbox_fusion import RunCodeRequest, config, run_code, run_concurrent

    importlib.reload(config)  # the client reads the env var at import time
    try:
        tokens = [uuid.uuid4().hex for _ in range(24)]
        requests = [[RunCodeRequest(code=f"print({t!r})", language="python")] for t in tokens]
        results = run_concurrent(run_code, args=requests, concurrency=12)
        assert [r.run_result.stdout for r in results] == [t + "\n" for t in tokens]
    finally:
        monkeypatch.delenv("SANDBOX_FUSION_ENDPOINT")
        importlib.reload(config)


def test_verl_call_sandbox_api(endpoint: str) -> None:
    from verl.utils.reward_score.sandbox_fusion.utils import call_sandbox_api

    body, error = call_sandbox_api(
        f"{endpoint}/run_code",
        "import sys\nprint(sys.stdin.read().upper())",
        "hi",
        10,
        10,
        1024,
    )
    assert error is None
    assert body["status"] == "Success"
    assert body["run_result"]["stdout"] == "HI\n"
    body, error = call_sandbox_api(f"{endpoint}/run_code", "while True: pass", None, 10, 1, 1024)
    assert error is None
    assert body["status"] == "Failed" and body["run_result"]["status"] == "TimeLimitExceeded"


async def test_our_client_against_server(endpoint: str) -> None:
    client = SandboxClient(endpoint)
    result = await client.run_code("print(6 * 7)")
    timeout = await client.run_code("import time\ntime.sleep(5)", run_timeout=0.5)
    await client.aclose()
    assert result.ok and result.stdout == "42\n" and result.latency_s > 0
    assert timeout.status == "Failed" and timeout.timed_out and timeout.return_code is None
