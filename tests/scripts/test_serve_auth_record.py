"""``scripts/serve_auth_record.py``: the routes it asks come from vLLM's own OpenAPI document,
state-changing ones are never sent with the key, and any route open without the key fails it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "serve_auth_record.py"
spec = importlib.util.spec_from_file_location("serve_auth_record", SCRIPT)
record = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record)

OPENAPI = {
    "paths": {
        "/invocations": {"post": {}},
        "/v1/responses/{response_id}": {"get": {}, "delete": {}},
        "/health": {"get": {}},
        "/sleep": {"post": {}},
        "/v1/models": {"get": {}, "parameters": []},  # not an operation
    }
}


def test_routes_are_every_operation_with_path_parameters_filled():
    assert sorted(record.routes_of(OPENAPI)) == [
        ("DELETE", "/v1/responses/x1"),
        ("GET", "/health"),
        ("GET", "/v1/models"),
        ("GET", "/v1/responses/x1"),
        ("POST", "/invocations"),
        ("POST", "/sleep"),
    ]
    assert record.STATEFUL.search("/sleep") and record.STATEFUL.search("/v1/load_lora_adapter")
    assert not record.STATEFUL.search("/invocations") and not record.STATEFUL.search("/tokenize")


def test_a_route_open_without_the_key_fails_the_record(tmp_path: Path, monkeypatch, capsys):
    rows = [
        {"route": "POST /invocations", "without_key": 401, "with_key": 200},
        {"route": "GET /health", "without_key": 200, "with_key": 200},
    ]
    monkeypatch.setattr(record, "record", lambda model: {"vllm": "0.24.0", "routes": rows})
    out = tmp_path / "serve_auth.json"
    assert record.main(["--out", str(out), "--model", str(tmp_path)]) == 0
    assert json.loads(out.read_text())["routes"] == rows
    rows.append({"route": "GET /metrics", "without_key": 200, "with_key": 200})
    assert record.main(["--out", str(out), "--model", str(tmp_path)]) == 1
    assert "open without the key through the app: ['GET /metrics']" in capsys.readouterr().out
