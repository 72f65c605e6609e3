"""A real sandbox server for the whole session, on a free 127.0.0.1 port.

Contract tests use ``endpoint``: ``SANDBOX_FUSION_ENDPOINT`` if set (e.g. the real
volcengine/sandbox-fusion image, or SandboxFusion run from source), else the local server; they
get the ``contract`` marker, so ``pytest tests/sandbox -m contract`` (or ``-k contract``) selects
exactly them. Security, soak and compatibility tests
use ``local_endpoint`` (always our server). The server is started with fake secrets in its
environment so the tests can prove they never reach user code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandbox.local import ServerDidNotStart, sandbox_service

REPO = Path(__file__).resolve().parents[2]
FAKE_SECRETS = {"HF_TOKEN": "hf_fake_secret_4242", "WANDB_API_KEY": "wandb_fake_secret_4242"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "endpoint" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.contract)


@pytest.fixture(scope="session")
def local_endpoint() -> Iterator[str]:
    if os.geteuid() != 0 and not os.environ.get("SANDBOX_ALLOW_INSECURE"):
        pytest.skip("the secure sandbox needs root (per-run uids); run the tests as root")
    env = {**FAKE_SECRETS, "SANDBOX_SLOTS": "8", "SANDBOX_FUSION_ENDPOINT": None}
    try:
        with sandbox_service("--log-level", "warning", env=env) as url:
            yield url
    except ServerDidNotStart as exc:
        pytest.fail(f"sandbox server did not start: {exc}")


@pytest.fixture(scope="session")
def endpoint(request: pytest.FixtureRequest) -> str:
    external = os.environ.get("SANDBOX_FUSION_ENDPOINT")
    return external.rstrip("/") if external else request.getfixturevalue("local_endpoint")


@pytest.fixture(scope="session")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


def run(http: httpx.Client, url: str, code: str, **extra) -> dict:
    """POST one python run and return the JSON body (asserting HTTP 200)."""
    resp = http.post(f"{url}/run_code", json={"code": code, "language": "python", **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()
