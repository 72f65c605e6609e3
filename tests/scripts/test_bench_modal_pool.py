"""scripts/bench_modal_pool.py: its measurement against a real zygote, and its docs table."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from sandbox.settings import Settings
from sandbox.startup import start_isolated

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # it imports its sibling bench_sandbox
spec = importlib.util.spec_from_file_location("bench_pool", SCRIPTS / "bench_modal_pool.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.skipif(os.geteuid() != 0, reason="the secure sandbox needs root")
async def test_each_round_measures_latency_and_throughput() -> None:
    settings = Settings(slots=2, preload="math")
    pool = await start_isolated(settings)
    try:
        rows = await bench.measure(bench.via_pool(pool, settings), 5, 6, 2, runs=2)
    finally:
        await pool.close()
    assert len(rows) == 2
    for row in rows:
        assert row["failed"] == 0 and 0 < row["p50_ms"] <= row["p99_ms"] and row["calls_per_s"] > 0


def test_docs_section_is_replaced_from_the_row(tmp_path: Path) -> None:
    raw = json.loads((SCRIPTS.parent / "docs/cpu-runs/modal_pool.json").read_text())
    doc = tmp_path / "b.md"
    doc.write_text(f"# B\n\n{bench.HEADING}\n\nold table\n\n## Next\n")
    bench.write_docs(raw, doc)
    text = doc.read_text()
    node = raw["arms"]["node"]
    assert "old table" not in text and text.endswith("## Next\n")
    assert f"| node | {' / '.join(str(c['p50_ms']) for c in node)} |" in text
    assert raw["machine"] in text and "Modal Sandbox pool" in bench.HEADING


@pytest.mark.parametrize("argv", [["--runs", "0"], ["--slots", "7", "--sandboxes", "2"]])
def test_bad_arguments_are_one_line_errors(argv: list[str], monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_modal_pool.py", *argv])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
