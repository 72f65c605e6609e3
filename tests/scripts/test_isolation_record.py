"""``scripts/isolation_record.py``: the record of which isolation modes work on a machine, and
what one run in the server's mode sees (run here for real)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from sandbox.isolation import MODES

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "isolation_record.py"
spec = importlib.util.spec_from_file_location("isolation_record", SCRIPT)
record = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("bwrap") is None, reason="needs root + bwrap")
def test_the_record_shows_bwrap_hides_the_planted_file(tmp_path: Path) -> None:
    out = tmp_path / "isolation.json"
    assert record.main(["--out", str(out), "--mode", "bwrap"]) == 0
    seen = json.loads(out.read_text())
    assert seen["server_mode"] == "bwrap" and seen["euid"] == 0
    modes = {m["mode"]: m for m in seen["modes"]}
    assert list(modes) == list(MODES)  # every mode is probed and recorded
    assert modes["bwrap"]["works"] and modes["bwrap"]["secure"] and modes["none"]["works"]
    inside = seen["inside"]
    assert inside["planted_file"].startswith("refused") and inside["hostname"] == "sandbox"
    assert inside["net_ifaces"] == ["lo"] and inside["uid"] >= 61000
    assert not list(SCRIPT.parent.parent.glob(".planted-*"))  # the planted file is removed


@pytest.mark.skipif(
    os.geteuid() != 0, reason="mode none needs no root, but the record runs as root"
)
def test_a_mode_that_reads_the_planted_file_fails_the_record(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SANDBOX_ALLOW_INSECURE", "1")
    out = tmp_path / "isolation.json"
    assert record.main(["--out", str(out), "--mode", "none"]) == 1
    assert json.loads(out.read_text())["inside"]["planted_file"] == "read"
