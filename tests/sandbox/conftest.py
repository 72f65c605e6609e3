"""A real sandbox server for the whole session, on a free 127.0.0.1 port.

Contract tests use ``endpoint``: ``SANDBOX_FUSION_ENDPOINT`` if set (e.g. the real
volcengine/sandbox-fusion image, or SandboxFusion run from source), else the local server; they
get the ``contract`` marker, so ``pytest tests/sandbox -m contract`` (or ``-k contract``) selects
exactly them. Soak and compatibility tests use ``local_endpoint`` (always our server, in the
mode it detects). The hostile programs (test_security, test_redteam) use ``isolated_endpoint``:
our server in each secure mode in turn (``bwrap``, ``unshare``), a mode this machine lacks
skipped with its reason; ``SANDBOX_TEST_MODES`` (e.g. ``bwrap,unshare`` in CI) names the modes
that must run, the others are skipped.
The servers are started with fake secrets in their environment so the tests can prove they never
reach user code.
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
SUITE_MODES = ("bwrap", "unshare")  # the modes the hostile programs must not get out of
MODES_ENV = "SANDBOX_TEST_MODES"  # comma-separated modes that must start here (CI: no skip)


def demanded_modes() -> set[str]:
    return set(filter(None, os.environ.get(MODES_ENV, "").split(",")))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "endpoint" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.contract)


SERVER_ENV = {**FAKE_SECRETS, "SANDBOX_SLOTS": "8", "SANDBOX_FUSION_ENDPOINT": None}


@pytest.fixture(scope="session")
def local_endpoint() -> Iterator[str]:
    if os.geteuid() != 0 and not os.environ.get("SANDBOX_ALLOW_INSECURE"):
        pytest.skip("the secure sandbox needs root (per-run uids); run the tests as root")
    try:
        with sandbox_service("--log-level", "warning", env=SERVER_ENV) as url:
            yield url
    except ServerDidNotStart as exc:
        pytest.fail(f"sandbox server did not start: {exc}")


@pytest.fixture(scope="session", params=SUITE_MODES)
def isolated_endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    """Our server pinned to one secure mode (``--isolation``: that mode or no start)."""
    mode = request.param
    if os.geteuid() != 0:
        pytest.skip(f"{mode} needs root (per-run uids); run the tests as root")
    if demanded_modes() and mode not in demanded_modes():
        pytest.skip(f"{mode} is not in {MODES_ENV}={os.environ[MODES_ENV]}")
    try:
        with sandbox_service("--isolation", mode, "--log-level", "warning", env=SERVER_ENV) as url:
            yield url
    except ServerDidNotStart as exc:
        if mode in demanded_modes():
            pytest.fail(f"{mode} is demanded by {MODES_ENV} but did not start: {exc}")
        pytest.skip(f"{mode} does not start here: {exc}")


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
