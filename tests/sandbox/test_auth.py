"""Bearer-token access: with SANDBOX_API_TOKEN set, every route needs it, checked before the body
is read; /v1/ping stays open."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from sandbox.client import SandboxClient, SandboxRequestError
from sandbox.local import sandbox_service
from sandbox.settings import Settings
from tests.live_server import send_headers_then_wait

TOKEN = "test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded() -> Iterator[str]:
    env = {"SANDBOX_API_TOKEN": TOKEN, "SANDBOX_SLOTS": "2"}
    with sandbox_service("--allow-insecure", "--log-level", "warning", env=env) as base:
        yield base


def test_requests_without_the_token_get_401_and_ping_stays_open(guarded: str) -> None:
    body = SandboxClient.build_payload("print(1)")
    assert httpx.get(f"{guarded}/v1/ping").json() == "pong"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
        resp = httpx.post(f"{guarded}/run_code", json=body, headers=headers, timeout=30)
        assert resp.status_code == 401, headers
        assert resp.headers["www-authenticate"] == "Bearer"
    ok = httpx.post(
        f"{guarded}/run_code", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    assert ok.status_code == 200 and ok.json()["run_result"]["stdout"] == "1\n"


def test_the_client_sends_the_token_from_the_environment(guarded: str, monkeypatch) -> None:
    monkeypatch.setenv("SANDBOX_API_TOKEN", TOKEN)
    assert SandboxClient(f"{guarded}/run_code").run_code_sync("print(2+2)").stdout.strip() == "4"
    monkeypatch.delenv("SANDBOX_API_TOKEN")
    with pytest.raises(SandboxRequestError, match="401"):
        SandboxClient(f"{guarded}/run_code", max_retries=1).run_code_sync("print(1)")


def test_the_token_never_shows_in_the_settings_repr(monkeypatch) -> None:
    monkeypatch.setenv("SANDBOX_API_TOKEN", TOKEN)
    settings = Settings.from_env()
    assert settings.api_token == TOKEN and TOKEN not in repr(settings)


@pytest.mark.parametrize(
    "length", [{"Content-Length": str(60 << 20)}, {}], ids=["sized", "chunked"]
)
def test_no_token_is_refused_before_the_body_is_read(guarded: str, length) -> None:
    """The 401 comes back while 64 KB of a 60 MB body has been sent: the server never waits for
    (or holds) the body of a request it refuses."""
    assert send_headers_then_wait(guarded, "/run_code", length) == 401
    right = {"Authorization": f"Bearer {TOKEN}", "Content-Length": str(65 << 20)}
    assert send_headers_then_wait(guarded, "/run_code", right) == 413  # over the cap, unread


def test_every_route_but_ping_needs_the_token(guarded: str) -> None:
    for path in ("/docs", "/openapi.json", "/no-such-route"):
        assert httpx.get(f"{guarded}{path}").status_code == 401, path
        assert httpx.get(f"{guarded}{path}", headers=AUTH).status_code != 401, path
