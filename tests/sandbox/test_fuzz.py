"""Schemathesis fuzzing of the OpenAPI schema against the in-process ASGI app: never a 5xx.

The bodies come from the published schema narrowed to what the executor accepts. The published
one says ``language`` is any string, ``run_timeout`` any positive number and ``files`` any
strings, so bodies drawn from it almost never ran (180 of 199 got 422, a rejection before any
code runs). Drawn from the narrowed one, valid bodies reach the worker with random code, stdin,
limits and files, and invalid ones probe exactly the executor's own checks.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from typing import Any

import pytest

if os.geteuid() != 0:
    pytest.skip("the secure sandbox needs root (per-run uids)", allow_module_level=True)
pytest.importorskip("hypothesis")  # dev-only: absent where only the trainer image's packages are
pytest.importorskip("schemathesis")

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from sandbox.api import create_app
from sandbox.schemas import SUPPORTED_LANGUAGES
from sandbox.settings import Settings

# Small limits keep hypothesis' examples cheap; the contract is the same.
SETTINGS = Settings.from_env(slots=4, max_run_timeout_s=2.0, queue_timeout_s=30.0)
app = create_app(SETTINGS)
published = schemathesis.openapi.from_asgi("/openapi.json", app)
HYPOTHESIS = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
# Relative or under /tmp, at most one directory deep; a directory never ends in ".txt", so no
# path is both a file and a directory, and none is the code file (main.py, main.sh).
FILE_NAME = r"^(?:/tmp/)?(?:[a-z]{1,8}/)?[a-z]{1,8}\.txt$"


def executable(raw: dict[str, Any], limits: Settings) -> dict[str, Any]:
    """``raw`` with ``RunCodeRequest`` narrowed to what the executor runs rather than rejects
    (sandbox/executor.py checks these beyond the published schema)."""
    narrowed = copy.deepcopy(raw)
    request = narrowed["components"]["schemas"]["RunCodeRequest"]
    props = request["properties"]
    props["language"] = {**props["language"], "enum": list(SUPPORTED_LANGUAGES)}
    # Its default (10 s, SandboxFusion's) may be over this server's bound: always give one.
    request["required"].append("run_timeout")
    props["run_timeout"]["maximum"] = limits.max_run_timeout_s
    props["code"]["pattern"] = r"^[^\x00]*$"
    name = {"type": "string", "pattern": FILE_NAME}
    props["files"]["propertyNames"] = name
    props["files"]["maxProperties"] = 3  # a few files test the layout checks; more only cost
    props["files"]["additionalProperties"]["anyOf"][0]["pattern"] = BASE64
    props["fetch_files"]["items"] = name
    props["fetch_files"]["maxItems"] = 3
    return narrowed


schema = schemathesis.openapi.from_dict(executable(published.raw_schema, SETTINGS))
schema.app = app


def check(case: schemathesis.Case) -> int:
    """Send ``case``; any answer but a 5xx is fine, and a run that happened succeeded or failed
    as user code does (a ``SandboxError`` is the sandbox failing)."""
    response = case.call()
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if case.path == "/run_code" and response.status_code == 200:
        assert response.json()["status"] in {"Success", "Failed"}, response.text[:500]
    return response.status_code


# Sizes: schemathesis' boundary cases (~100, mostly invalid on purpose) and 10 random bodies of
# each kind, then 60 valid ones; over half of all /run_code bodies run, in about the time the
# published schema's 100 examples took.
@schema.parametrize()
@settings(HYPOTHESIS, max_examples=10)
def test_no_server_errors(case: schemathesis.Case) -> None:
    """Every operation, valid and invalid bodies (schemathesis' boundary cases first)."""
    check(case)


def test_generated_bodies_reach_the_executor() -> None:
    """Valid bodies of the narrowed schema all run (HTTP 200); none is a 5xx."""
    statuses: Counter[int] = Counter()

    @given(case=schema["/run_code"]["POST"].as_strategy(GenerationMode.POSITIVE))
    @settings(HYPOTHESIS, max_examples=60)
    def fuzz(case: schemathesis.Case) -> None:
        statuses[check(case)] += 1

    fuzz()
    total = sum(statuses.values())
    assert statuses[200] >= 0.9 * total, statuses
