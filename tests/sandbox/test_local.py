"""sandbox/local.py: the launcher the smoke, the benchmarks and the learning curve share."""

from __future__ import annotations

import io
import sys

import pytest

from sandbox import local


def test_server_keeps_the_callers_import_path(monkeypatch) -> None:
    """On the GPU machines the packages live in an offline site dir on PYTHONPATH; replacing it
    with the repo alone made the server die with ``No module named 'uvicorn'``."""
    seen = {}

    class Exited:
        returncode = 1

        def __init__(self, argv, cwd, env, stderr):
            seen.update(env)
            self.stderr = io.BytesIO(b"")

        def poll(self):
            return 1

    monkeypatch.setenv("PYTHONPATH", "/opt/site")
    monkeypatch.setattr(local.subprocess, "Popen", Exited)
    with pytest.raises(local.ServerDidNotStart):
        local.start_server(["python", "-m", "sandbox"], local.free_port(), env={"X": None})
    assert seen["PYTHONPATH"].split(":") == [str(local.REPO), "/opt/site"]
    assert "X" not in seen


@pytest.mark.parametrize(
    ("env", "args", "why"),
    [
        ({"SANDBOX_PYTHON": "/nonexistent"}, (), "python='/nonexistent' is not an executable file"),
        ({}, ("--bogus",), "unrecognized arguments: --bogus"),
    ],
)
def test_a_server_that_exits_at_start_is_named_with_its_stderr(env, args, why: str) -> None:
    """The line names the program (it once named the last argument: "warning exited with code
    3") and ends with what the server said on stderr, here argparse's and Settings' own errors."""
    server = local.sandbox_service(*args, "--log-level", "warning", env=env)
    with pytest.raises(local.ServerDidNotStart) as caught, server:
        pass
    message = str(caught.value)
    assert message.startswith(f"{local.program([sys.executable])} -m sandbox serve exited with")
    assert "code 2; stderr: " in message and why in message, message


def test_program_is_what_a_reader_recognises() -> None:
    assert local.program(["/opt/venv/bin/python3", "-m", "sandbox", "serve", "--port", "9"]) == (
        "python3 -m sandbox serve"
    )
    assert local.program(["/usr/bin/python", "-c", "import x\nx.run()", "8"]) == "python -c"


@pytest.mark.parametrize("mode", ["none", "unshare", "bwrap-userns", "bwrap"])
def test_no_secret_reaches_user_code_in_any_mode(mode: str, monkeypatch) -> None:
    """In every isolation mode (in ``none`` user code runs as the server's uid and reads its
    /proc/<pid>/environ): a token in the caller's environment is not there (the server starts
    with an allow-list), and the server's own SANDBOX_API_TOKEN, which it must be given, is gone
    from its environment once read (sandbox/environ.py), yet still guards /run_code."""
    import shutil

    from sandbox.client import SandboxClient, SandboxRequestError

    if mode.startswith("bwrap") and shutil.which("bwrap") is None:
        pytest.skip("no bubblewrap here (scripts/setup.sh installs it as root)")

    fake = f"hf_caller_secret_{local.free_port()}"
    token = f"sandbox_token_{local.free_port()}"
    monkeypatch.setenv("HF_TOKEN", fake)
    monkeypatch.setenv("SANDBOX_SLOTS", "4")  # settings still come through
    code = """
import glob, os
print(dict(os.environ))
for path in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):
    try:
        print(path, open(path, 'rb').read().decode(errors='replace'))
    except OSError:
        pass
"""
    args = ("--allow-insecure", "--isolation", mode, "--log-level", "warning")
    with local.sandbox_service(*args, env={"SANDBOX_API_TOKEN": token}) as base:
        url = f"{base}/run_code"
        result = SandboxClient(url, max_retries=1, api_token=token).run_code_sync(code)
        with pytest.raises(SandboxRequestError, match="401"):
            SandboxClient(url, max_retries=1, api_token="").run_code_sync("print(1)")
    assert result.status == "Success", result
    assert "/proc/" in result.stdout  # it did read some of them
    assert fake not in result.stdout and token not in result.stdout
