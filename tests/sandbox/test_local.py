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
