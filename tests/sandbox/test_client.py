"""Unit tests of sandbox.client against an in-memory transport (no server needed)."""

from __future__ import annotations

import json

import httpx
import pytest

from sandbox.client import (
    RunResult,
    SandboxClient,
    SandboxRequestError,
    SandboxUnavailable,
    normalize_endpoint,
)

OK_BODY = {
    "status": "Success",
    "message": "",
    "compile_result": None,
    "run_result": {
        "status": "Finished",
        "execution_time": 0.01,
        "return_code": 0,
        "stdout": "4\n",
        "stderr": "",
    },
    "executor_pod_name": None,
    "files": {},
}


def scripted(responses: list[httpx.Response | Exception], seen: list[dict]) -> httpx.MockTransport:
    """A transport that answers with ``responses`` in order and records the request bodies."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        item = responses.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return httpx.MockTransport(handler)


def fast_client(transport: httpx.MockTransport, **kw) -> SandboxClient:
    return SandboxClient(
        "http://sandbox.test", transport=transport, backoff_base_s=0.001, backoff_max_s=0.01, **kw
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://h:1", "http://h:1/run_code"),
        ("http://h:1/", "http://h:1/run_code"),
        ("http://h:1/run_code", "http://h:1/run_code"),
        ("h:1", "http://h:1/run_code"),
    ],
)
def test_normalize_endpoint(given: str, expected: str) -> None:
    assert normalize_endpoint(given) == expected


def test_endpoint_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://from-env:9")
    assert SandboxClient().url == "http://from-env:9/run_code"
    monkeypatch.delenv("SANDBOX_FUSION_ENDPOINT")
    assert SandboxClient().url == "http://127.0.0.1:8080/run_code"


async def test_payload_matches_sandboxfusion_contract() -> None:
    seen: list[dict] = []
    client = fast_client(scripted([httpx.Response(200, json=OK_BODY)], seen))
    result = await client.run_code("print(2+2)", stdin="x", memory_limit_mb=512)
    await client.aclose()
    assert result.ok and result.stdout == "4\n" and result.return_code == 0
    assert seen == [
        {
            "code": "print(2+2)",
            "language": "python",
            "compile_timeout": 10,
            "run_timeout": 10,
            "memory_limit_MB": 512,
            "stdin": "x",
            "files": {},
            "fetch_files": [],
        }
    ]


async def test_retries_on_saturation_and_transport_errors() -> None:
    seen: list[dict] = []
    responses: list[httpx.Response | Exception] = [
        httpx.ConnectError("refused"),
        httpx.Response(504, text="busy", headers={"Retry-After": "0"}),
        httpx.Response(429, text="slow down"),
        httpx.Response(200, json={**OK_BODY, "status": "SandboxError", "run_result": None}),
        httpx.Response(200, json=OK_BODY),
    ]
    client = fast_client(scripted(responses, seen), max_retries=4)
    result = await client.run_code("print(2+2)")
    await client.aclose()
    assert result.stdout == "4\n"
    assert len(seen) == 5


async def test_gives_up_with_clear_exception() -> None:
    seen: list[dict] = []
    client = fast_client(scripted([httpx.Response(503)] * 3, seen), max_retries=2)
    with pytest.raises(SandboxUnavailable, match="after 3 attempts"):
        await client.run_code("print(1)")
    await client.aclose()


async def test_bad_request_is_not_retried() -> None:
    seen: list[dict] = []
    client = fast_client(scripted([httpx.Response(422, text="bad language")], seen))
    with pytest.raises(SandboxRequestError, match="422"):
        await client.run_code("print(1)", language="cobol")
    await client.aclose()
    assert len(seen) == 1


async def test_user_code_failure_is_a_result_not_an_exception() -> None:
    body = {
        **OK_BODY,
        "status": "Failed",
        "run_result": {
            "status": "TimeLimitExceeded",
            "execution_time": 1.0,
            "return_code": None,
            "stdout": "",
            "stderr": "",
        },
    }
    client = fast_client(scripted([httpx.Response(200, json=body)], []))
    result = await client.run_code("while True: pass", run_timeout=1)
    await client.aclose()
    assert result.status == "Failed" and result.timed_out and result.return_code is None


def test_sync_wrapper() -> None:
    client = fast_client(scripted([httpx.Response(200, json=OK_BODY)], []))
    result = client.run_code_sync("print(2+2)")
    client.close()
    assert isinstance(result, RunResult)
    assert result.stdout == "4\n"
