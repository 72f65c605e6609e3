"""sandbox/local.py: the launcher the smoke, the benchmarks and the learning curve share."""

from __future__ import annotations

import pytest

from sandbox import local


def test_server_keeps_the_callers_import_path(monkeypatch) -> None:
    """On the GPU machines the packages live in an offline site dir on PYTHONPATH; replacing it
    with the repo alone made the server die with ``No module named 'uvicorn'``."""
    seen = {}

    class Exited:
        returncode = 1

        def __init__(self, argv, cwd, env):
            seen.update(env)

        def poll(self):
            return 1

    monkeypatch.setenv("PYTHONPATH", "/opt/site")
    monkeypatch.setattr(local.subprocess, "Popen", Exited)
    with pytest.raises(local.ServerDidNotStart):
        local.start_server(["python", "-m", "sandbox"], local.free_port(), env={"X": None})
    assert seen["PYTHONPATH"].split(":") == [str(local.REPO), "/opt/site"]
    assert "X" not in seen


@pytest.mark.parametrize("mode", ["none", "unshare", "bwrap-userns", "bwrap"])
def test_callers_secrets_never_reach_the_server_or_user_code(mode: str, monkeypatch) -> None:
    """In every isolation mode (in the weak ones user code can read the server's
    /proc/<pid>/environ) a token in the caller's environment is not there: the server starts with
    an allow-list."""
    import shutil

    from sandbox.client import SandboxClient

    if mode.startswith("bwrap") and shutil.which("bwrap") is None:
        pytest.skip("no bubblewrap here (scripts/setup.sh installs it as root)")

    fake = f"hf_caller_secret_{local.free_port()}"
    monkeypatch.setenv("HF_TOKEN", fake)
    monkeypatch.setenv("SANDBOX_SLOTS", "4")  # settings still come through
    code = """
import glob
for path in glob.glob('/proc/*/environ'):
    try:
        print(open(path, 'rb').read().decode(errors='replace'))
    except OSError:
        pass
"""
    args = ("--allow-insecure", "--isolation", mode, "--log-level", "warning")
    with local.sandbox_service(*args) as base:
        result = SandboxClient(f"{base}/run_code", max_retries=1).run_code_sync(code)
    assert result.status == "Success", result
    assert "/proc" not in result.stderr and fake not in result.stdout
