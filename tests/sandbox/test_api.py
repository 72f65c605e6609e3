"""Contract tests of /run_code and /v1/ping: SandboxFusion's behaviour, against any endpoint."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.sandbox.conftest import run


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_ping(http: httpx.Client, endpoint: str) -> None:
    assert http.get(f"{endpoint}/v1/ping").json() == "pong"


def test_print(http: httpx.Client, endpoint: str) -> None:
    body = run(http, endpoint, "print(2 + 2)")
    assert body["status"] == "Success"
    assert body["run_result"]["status"] == "Finished"
    assert body["run_result"]["return_code"] == 0
    assert body["run_result"]["stdout"] == "4\n"
    assert body["run_result"]["stderr"] == ""


def test_timeout_is_failed_tle_without_return_code(http: httpx.Client, endpoint: str) -> None:
    body = run(
        http, endpoint, "import time\nprint('start', flush=True)\ntime.sleep(30)", run_timeout=1
    )
    assert body["status"] == "Failed"
    assert body["run_result"]["status"] == "TimeLimitExceeded"
    assert body["run_result"]["return_code"] is None
    assert body["run_result"]["stdout"] == "start\n"


def test_assertion_error_has_traceback(http: httpx.Client, endpoint: str) -> None:
    body = run(http, endpoint, "def f(x):\n    assert x == 1, 'boom'\nf(2)\n")
    assert body["status"] == "Failed"
    assert body["run_result"]["status"] == "Finished"
    assert body["run_result"]["return_code"] == 1
    stderr = body["run_result"]["stderr"]
    assert "Traceback (most recent call last)" in stderr
    assert "AssertionError: boom" in stderr
    assert "line 2, in f" in stderr


def test_syntax_error(http: httpx.Client, endpoint: str) -> None:
    body = run(http, endpoint, "print('a'\n")
    assert body["status"] == "Failed"
    assert body["run_result"]["return_code"] == 1
    assert "SyntaxError" in body["run_result"]["stderr"]


def test_sys_exit_code(http: httpx.Client, endpoint: str) -> None:
    body = run(http, endpoint, "import sys\nprint('x')\nsys.exit(3)")
    assert body["status"] == "Failed"
    assert body["run_result"]["return_code"] == 3
    assert body["run_result"]["stdout"] == "x\n"


def test_stdin(http: httpx.Client, endpoint: str) -> None:
    code = "import sys\nnums = [int(x) for x in sys.stdin.read().split()]\nprint(sum(nums))"
    body = run(http, endpoint, code, stdin="1 2 3\n4\n")
    assert body["run_result"]["stdout"] == "10\n"


def test_files_relative_nested_and_absolute(http: httpx.Client, endpoint: str) -> None:
    code = (
        "print(open('data/in/a.txt').read())\n"
        "print(open('/tmp/abs_dir/b.txt').read())\n"
        "print(open('top.txt').read())\n"
    )
    files = {"data/in/a.txt": b64("alpha"), "/tmp/abs_dir/b.txt": b64("beta"), "top.txt": b64("g")}
    body = run(http, endpoint, code, files=files)
    assert body["status"] == "Success", body
    assert body["run_result"]["stdout"] == "alpha\nbeta\ng\n"


def test_request_modules_import_whatever_their_name(http: httpx.Client, endpoint: str) -> None:
    """A request's own modules import as under ``python main.py``, also under the names our
    sandbox's program uses for its own modules (``sandbox/zygote/``)."""
    names = ("run", "root", "worker", "child", "syscalls", "reaping")
    files = {f"{name}.py": b64(f"NAME = {name!r}\n") for name in names}
    code = f"import {', '.join(names)}\nprint({', '.join(f'{n}.NAME' for n in names)})"
    body = run(http, endpoint, code, files=files)
    assert body["status"] == "Success", body
    assert body["run_result"]["stdout"] == " ".join(names) + "\n"


def test_null_file_entry_is_skipped_empty_string_is_empty_file(
    http: httpx.Client, endpoint: str
) -> None:
    code = "import os\nprint(os.path.exists('skip.txt'), repr(open('empty.txt').read()))"
    body = run(http, endpoint, code, files={"skip.txt": None, "empty.txt": ""})
    assert body["status"] == "Success", body
    assert body["run_result"]["stdout"] == "False ''\n"


@pytest.mark.parametrize("memory_limit_mb", [-1, 0, 512])
def test_memory_limit_values_accepted(
    http: httpx.Client, endpoint: str, memory_limit_mb: int
) -> None:
    body = run(http, endpoint, "print('ok')", memory_limit_MB=memory_limit_mb)
    assert body["status"] == "Success", body
    assert body["run_result"]["stdout"] == "ok\n"


def test_fetch_files(http: httpx.Client, endpoint: str) -> None:
    code = (
        "import os\nos.makedirs('out', exist_ok=True)\n"
        "open('out/r.txt', 'w').write('result 42')\nopen('/tmp/abs.txt', 'w').write('abs')"
    )
    body = run(http, endpoint, code, fetch_files=["out/r.txt", "/tmp/abs.txt"])
    assert body["status"] == "Success"
    assert base64.b64decode(body["files"]["out/r.txt"]) == b"result 42"
    assert base64.b64decode(body["files"]["/tmp/abs.txt"]) == b"abs"


def test_math_stack_available(http: httpx.Client, endpoint: str) -> None:
    code = (
        "import sympy, numpy\nx = sympy.symbols('x')\n"
        "print(sympy.solve(x**2 - 4, x), numpy.sum([1, 2]))"
    )
    body = run(http, endpoint, code)
    assert body["run_result"]["stdout"] == "[-2, 2] 3\n"


@pytest.mark.parametrize(
    "payload",
    [
        {"code": "print(1)", "language": "cobol"},
        {"language": "python"},
        {"code": 5, "language": "python"},
        {"code": "print(1)", "language": "python", "run_timeout": "soon"},
        {"code": "print(1)", "language": "python", "run_timeout": -1},
        {"code": "print(1)", "language": "python", "files": {"../escape.txt": "aGk="}},
        {"code": "print(1)", "language": "python", "files": {"/etc/x": "aGk="}},
        {"code": "print(1)", "language": "python", "files": {"a.txt": "not base64!"}},
        {"code": "print(1)", "language": "python", "fetch_files": ["../../etc/passwd"]},
    ],
)
def test_bad_requests_get_4xx(http: httpx.Client, local_endpoint: str, payload: dict) -> None:
    resp = http.post(f"{local_endpoint}/run_code", json=payload)
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.json()["detail"]


def test_malformed_json_and_oversize(http: httpx.Client, local_endpoint: str) -> None:
    resp = http.post(
        f"{local_endpoint}/run_code",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 422
    resp = http.post(
        f"{local_endpoint}/run_code", json={"code": "#" * (2 * 1024 * 1024), "language": "python"}
    )
    assert resp.status_code == 413
    assert "bytes" in resp.json()["detail"]


def test_openapi_served(http: httpx.Client, local_endpoint: str) -> None:
    schema = http.get(f"{local_endpoint}/openapi.json").json()
    assert "/run_code" in schema["paths"]
    props = schema["components"]["schemas"]["RunCodeRequest"]["properties"]
    assert {"code", "language", "run_timeout", "memory_limit_MB", "files", "fetch_files"} <= set(
        props
    )
