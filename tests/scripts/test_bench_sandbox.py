"""``make bench-sandbox``: its table names the isolation our server actually ran in."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from sandbox.client import SandboxClient
from sandbox.local import free_port, stop

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_sandbox.py"
spec = importlib.util.spec_from_file_location("bench_sandbox", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

CELL = {"n": 4, "errors": 0, "rps": 100.0, "p50": 5.0, "p99": 9.0}


@pytest.mark.parametrize("wanted", ["none", "auto"])
def test_the_table_names_the_isolation_that_ran(
    wanted: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What user code sees in the benched server matches the mode the table names: a per-run uid
    only in ``bwrap``/``unshare``, bubblewrap's hostname only in the bwrap modes."""
    if os.geteuid() != 0 and shutil.which("bwrap") is None and wanted == "auto":
        pytest.skip("not root and no bubblewrap: auto would find only 'none', as the other case")
    monkeypatch.setenv("SANDBOX_ISOLATION", wanted)
    monkeypatch.setenv("SANDBOX_ALLOW_INSECURE", "1")
    port = free_port()
    proc, isolation = bench.start_ours(port)
    try:
        client = SandboxClient(f"http://127.0.0.1:{port}", max_retries=1)
        code = "import os, socket; print(os.getuid(), socket.gethostname())"
        uid, hostname = client.run_code_sync(code).stdout.split()
    finally:
        stop(proc)
    if wanted != "auto":
        assert isolation.mode == wanted
    assert (int(uid) != os.getuid()) == isolation.drop_uid, (isolation.mode, uid)
    assert (hostname == "sandbox") == isolation.mode.startswith("bwrap"), (isolation.mode, hostname)

    out = tmp_path / "benchmarks.md"
    section = bench.write_markdown([("print(2+2)", 1, CELL, CELL, None)], out, 1.0, isolation)
    assert f"`python -m sandbox serve --isolation {isolation.mode}` (" in section
    assert ("(secure;" in section) == (isolation.mode == "bwrap")
    if wanted == "none":
        assert "bubblewrap" not in section and "INSECURE: user code runs as this user" in section
    assert out.read_text().startswith("# Benchmarks\n\n## Sandbox\n")
