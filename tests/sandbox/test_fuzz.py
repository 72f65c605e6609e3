"""Schemathesis fuzzing of the OpenAPI schema against the in-process ASGI app: never a 5xx."""

from __future__ import annotations

import os

import pytest

if os.geteuid() != 0:
    pytest.skip("the secure sandbox needs root (per-run uids)", allow_module_level=True)

import schemathesis
from hypothesis import HealthCheck, settings

from sandbox.api import create_app
from sandbox.settings import Settings

# Small limits keep hypothesis' examples cheap; the contract is the same.
app = create_app(Settings.from_env(slots=4, max_run_timeout_s=2.0, queue_timeout_s=30.0))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if case.path == "/run_code" and response.status_code == 200:
        assert response.json()["status"] in {"Success", "Failed"}, response.text[:500]
