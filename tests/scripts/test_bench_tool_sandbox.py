"""scripts/bench_tool_sandbox.py: the DAPO-like load against a real sandbox, and its docs table."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # it imports its sibling bench_sandbox
spec = importlib.util.spec_from_file_location("bench_tool", SCRIPTS / "bench_tool_sandbox.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_rollouts_make_their_sequential_calls_against_the_sandbox(local_endpoint: str) -> None:
    cell = asyncio.run(bench.drive(local_endpoint, rollouts=3, calls=2, think_s=0.01))
    assert (cell["calls"], cell["failed"]) == (6, 0)  # every snippet printed its answer
    assert 0 < cell["p50_ms"] <= cell["p99_ms"]


def test_docs_section_is_replaced_from_the_row(tmp_path: Path) -> None:
    raw = json.loads((SCRIPTS.parent / "docs/cpu-runs/tool_sandbox.json").read_text())
    doc = tmp_path / "b.md"
    doc.write_text(f"# B\n\n{bench.HEADING}\n\nold table\n\n## Next\n")
    bench.write_docs(raw, doc)
    text = doc.read_text()
    node = raw["loads"]["with generation"]["node"]
    assert "old table" not in text and text.endswith("## Next\n")
    assert f"| with generation | node | {node['p50_ms']} | {node['p99_ms']} |" in text
    assert f"offered load of {raw['utilization']:.0%}" in text


@pytest.mark.parametrize(
    "argv", [["--utilization", "0"], ["--utilization", "1.5"], ["--calls", "0"]]
)
def test_bad_arguments_are_one_line_errors(argv: list[str], monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_tool_sandbox.py", *argv])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
