"""scripts/import_cycles.py finds circles, the ones closed by imports inside functions too."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("import_cycles", REPO / "scripts/import_cycles.py")
import_cycles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_cycles)


def test_circles_are_the_strongly_connected_components() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert import_cycles.circles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert import_cycles.circles({"a": {"b"}, "b": set(), "c": {"a"}}) == []


def test_a_long_chain_needs_no_recursion() -> None:
    chain = {f"m{i}": {f"m{i + 1}"} for i in range(5000)} | {"m5000": {"m0"}}
    assert [len(c) for c in import_cycles.circles(chain)] == [5001]


def _package(root: Path, name: str, files: dict[str, str]) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    for module, body in files.items():
        (root / name / f"{module}.py").write_text(body)


def test_an_import_inside_a_function_closes_a_circle(tmp_path, monkeypatch, capsys) -> None:
    _package(
        tmp_path,
        "lazypkg",
        {
            "low": "def f():\n    from lazypkg import high\n    return high\n",
            "high": "from lazypkg import low\n",
            "alone": "import json\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles.main(["lazypkg"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("1 import circle(s), 2 module(s) in them")
    assert "circle 1 (2 modules): lazypkg.high lazypkg.low" in out


def test_a_package_without_circles_passes(tmp_path, monkeypatch, capsys) -> None:
    _package(tmp_path, "flatpkg", {"low": "import json\n", "high": "from flatpkg import low\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles.main(["flatpkg"]) == 0
    assert capsys.readouterr().out.startswith("0 import circle(s), 0 module(s)")


def test_a_program_directory_counts_its_bare_name_imports(tmp_path, monkeypatch, capsys) -> None:
    """A directory run as ``python dir`` (``__main__.py``, no ``__init__.py``) inside a package."""
    _package(tmp_path, "progpkg", {"lib": "import json\n"})
    program = tmp_path / "progpkg" / "prog"
    program.mkdir()
    (program / "__main__.py").write_text("import worker\n")
    (program / "worker.py").write_text("import json\nimport steps\n")
    (program / "steps.py").write_text("def later():\n    import worker\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles.program_dirs(["progpkg"]) == [program]
    assert import_cycles.main(["progpkg"]) == 1
    assert "circle 1 (2 modules): prog:steps prog:worker" in capsys.readouterr().out
    (program / "steps.py").write_text("import json\n")
    assert import_cycles.main(["progpkg"]) == 0


def test_the_zygote_is_a_program_directory_without_circles() -> None:
    (zygote,) = import_cycles.program_dirs(["sandbox"])
    graph = import_cycles.program_graph(zygote)
    assert zygote.name == "zygote" and "zygote:syscalls" in graph["zygote:__main__"]
    assert import_cycles.circles(graph) == []


@pytest.mark.parametrize("package", import_cycles.PACKAGES)
def test_the_project_packages_build_a_graph(package: str) -> None:
    graph = import_cycles.import_graph([package])
    assert f"{package}.__init__" not in graph and package in graph and len(graph) > 5
