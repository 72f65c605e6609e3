"""The code_interpreter tool: code preparation, output shaping, metrics, and real sandbox calls."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
from verl.tools.tool_registry import initialize_tools_from_config

from recipe.retool.core.constants import TOOL_CALLS_KEY, TOOL_SCHEMA
from recipe.retool.launch.commands import TOOL_CONFIG_FILE as TOOL_CONFIG
from recipe.retool.verl_plugins.interpreter import (
    extract_code,
    print_last_expression,
    truncate_middle,
)
from recipe.retool.verl_plugins.tools import CodeInterpreterTool, ToolSettings
from sandbox.client import SandboxClient


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("x", "print(x)"),
        ("x = 5", "x = 5"),
        ("x = 5\nx", "x = 5\nprint(x)"),
        ("x = 5\nx\n\n", "x = 5\nprint(x)\n\n"),
        ("print(x)", "print(x)"),
        ("x = 5\nprint(x)\n", "x = 5\nprint(x)\n"),
        ("print(x) if x else None", "print(print(x) if x else None)"),
        ("a = 1; a", "a = 1; print(a)"),
        ("sum(range(10))  # total", "print(sum(range(10)))  # total"),
        ("f(\n  1,\n  2)\n", "print(f(\n  1,\n  2))\n"),
        ("for i in range(3):\n    i", "for i in range(3):\n    i"),
        ("def f():\n    return 1", "def f():\n    return 1"),
        ("import math", "import math"),
        ("'héllo' + 'ü'", "print('héllo' + 'ü')"),
        ("x = (", "x = ("),  # syntax error: sent as is, the sandbox reports it
        ("", ""),
        ("# only a comment", "# only a comment"),
        ("sp.solve(x**2 - 4, x)", "print(sp.solve(x**2 - 4, x))"),
    ],
)
def test_print_last_expression(code: str, expected: str):
    assert print_last_expression(code) == expected


def test_extract_code_takes_first_fenced_block_else_raw():
    assert extract_code("```python\na = 1\n```\n```python\nb\n```") == "a = 1\n"
    assert extract_code("print(1)") == "print(1)"
    assert extract_code("text\n```\nx\n```") == "x\n"


def test_truncate_middle_keeps_head_and_tail():
    text = "A" * 50 + "B" * 100 + "C" * 50
    out, cut = truncate_middle(text, 100)
    assert cut and out.startswith("A" * 50) and out.endswith("C" * 50)
    assert "[100 characters truncated]" in out
    assert truncate_middle("short", 100) == ("short", False)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown code_interpreter config keys"):
        ToolSettings.from_config({"type": "native", "defualt_timeout": 3})


def test_yaml_schema_is_the_single_source_of_truth(monkeypatch):
    monkeypatch.delenv("SANDBOX_FUSION_ENDPOINT", raising=False)
    (tool,) = initialize_tools_from_config(str(TOOL_CONFIG))
    dumped = tool.tool_schema.model_dump(exclude_unset=True, exclude_none=True)
    assert json.dumps(dumped) == json.dumps(TOOL_SCHEMA)  # same keys *and* order
    assert tool.name == "code_interpreter"
    assert tool.client.url == "http://127.0.0.1:8080/run_code"
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "https://sandbox.example.modal.run")
    (tool,) = initialize_tools_from_config(str(TOOL_CONFIG))
    assert tool.client.url == "https://sandbox.example.modal.run/run_code"


def fake_tool(handler, **config) -> tuple[CodeInterpreterTool, list[dict]]:
    """A tool whose client talks to an in-process fake /run_code (httpx.MockTransport)."""
    seen: list[dict] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return handler(request)

    tool = CodeInterpreterTool({"type": "native", "max_retries": 1, **config})
    tool.client = SandboxClient(
        "http://fake:1", max_retries=1, backoff_base_s=0.0, transport=httpx.MockTransport(record)
    )
    return tool, seen


def sandbox_json(status="Success", run_status="Finished", stdout="", stderr="", rc=0, message=""):
    run = {"status": run_status, "execution_time": 0.01, "return_code": rc,
           "stdout": stdout, "stderr": stderr}  # fmt: skip
    return {"status": status, "message": message, "compile_result": None, "run_result": run}


async def call(tool: CodeInterpreterTool, code, agent_data=None):
    instance, _ = await tool.create(create_kwargs={"ground_truth": "1"})
    try:
        return await tool.execute(instance, {"code": code}, agent_data=agent_data)
    finally:
        await tool.release(instance)


async def test_execute_sends_prepared_code_and_records_metrics():
    tool, seen = fake_tool(lambda r: httpx.Response(200, json=sandbox_json(stdout="4\n")),
                           default_timeout=7, memory_limit_mb=256)  # fmt: skip
    agent = SimpleNamespace(extra_fields={})
    resp, reward, metrics = await call(tool, "Here:\n```python\nx = 2\nx * 2\n```", agent)
    assert resp.text == "4" and reward == 0.0
    assert seen[0]["code"] == "x = 2\nprint(x * 2)\n"
    assert (seen[0]["run_timeout"], seen[0]["memory_limit_MB"]) == (7, 256)
    assert seen[0]["language"] == "python"
    assert metrics["status"] == "Success" and metrics["run_status"] == "Finished"
    assert metrics["latency_s"] > 0 and not metrics["timed_out"]
    assert agent.extra_fields[TOOL_CALLS_KEY] == [metrics]
    assert tool._instances == {}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (sandbox_json(stdout=""), "(no output)"),
        (sandbox_json(stdout="a\n", stderr="warn\n"), "a\nwarn"),
        (sandbox_json("Failed", stderr="Traceback...\nZeroDivisionError\n", rc=1),
         "Traceback...\nZeroDivisionError"),
        (sandbox_json("Failed", rc=3), "Execution failed (exit code 3)."),
        (sandbox_json("Failed", "TimeLimitExceeded", stdout="partial", rc=None),
         "partial\nTimeoutError: execution exceeded the 30 s time limit."),
    ],
)  # fmt: skip
async def test_results_are_rendered_for_the_model(body, expected):
    tool, _ = fake_tool(lambda r: httpx.Response(200, json=body))
    resp, _, metrics = await call(tool, "print(1)")
    assert resp.text == expected
    assert metrics["timed_out"] == (body["run_result"]["status"] == "TimeLimitExceeded")


async def test_sandbox_outage_becomes_a_message_not_an_exception():
    tool, seen = fake_tool(lambda r: httpx.Response(503, text="busy"))
    resp, _, metrics = await call(tool, "print(1)")
    assert resp.text.startswith("SandboxError: the code was not run")
    assert metrics["status"] == "Unavailable"
    assert len(seen) == 2  # one retry (max_retries=1)


async def test_bad_arguments_never_reach_the_sandbox():
    tool, seen = fake_tool(lambda r: httpx.Response(200, json=sandbox_json()))
    for bad in ("", "   ", None, 42):
        resp, _, metrics = await call(tool, bad)
        assert resp.text.startswith("Error: `code` must be")
        assert metrics["status"] == "InvalidArguments"
    assert seen == []


async def test_long_output_is_capped_keeping_head_and_tail():
    out = "HEAD" + "x" * 10_000 + "TAIL"
    tool, _ = fake_tool(lambda r: httpx.Response(200, json=sandbox_json(stdout=out)),
                        output_cap_chars=200)  # fmt: skip
    resp, _, metrics = await call(tool, "print('...')")
    assert resp.text.startswith("HEAD") and resp.text.endswith("TAIL")
    assert len(resp.text) < 260 and metrics["truncated"]


# --- against the real local sandbox, through verl's own tool loader -----------------------------


@pytest.fixture
def sandbox_tool(local_endpoint: str, monkeypatch) -> CodeInterpreterTool:
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", local_endpoint)
    (tool,) = initialize_tools_from_config(str(TOOL_CONFIG))
    assert tool.client.url == f"{local_endpoint}/run_code"
    return tool


async def test_real_sandbox_runs_code_and_prints_last_expression(sandbox_tool):
    resp, _, metrics = await call(sandbox_tool, "```python\nimport math\nmath.factorial(5)\n```")
    assert resp.text == "120"
    assert metrics["status"] == "Success"


async def test_real_sandbox_reports_errors_the_model_can_read(sandbox_tool):
    resp, _, metrics = await call(sandbox_tool, "1 / 0")
    assert "ZeroDivisionError" in resp.text
    assert metrics["status"] == "Failed"


async def test_real_sandbox_timeout_is_reported(sandbox_tool):
    sandbox_tool.settings = ToolSettings(default_timeout=1, sandbox_fusion_url=None)
    resp, _, metrics = await call(sandbox_tool, "print('start', flush=True)\nwhile True: pass")
    assert metrics["timed_out"], resp.text
    assert "TimeoutError: execution exceeded the 1 s time limit." in resp.text
