"""Every command README.md shows exists: make targets, ``python -m`` modules, Modal apps and
functions. A renamed module or target fails here, not in a reader's terminal."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TARGETS = set(re.findall(r"^([A-Za-z0-9_-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))

MAKE = sorted(set(re.findall(r"(?:^|`|= )make ([a-z][a-z0-9-]*)", README, re.MULTILINE)))
MODULES = sorted(set(re.findall(r"python -m ([A-Za-z_][\w.]*)", README)))
MODAL = sorted(set(re.findall(r"modal (?:run|deploy) ([\w/]+\.py)(?:::(\w+))?", README)))


def test_readme_shows_commands_of_every_kind() -> None:
    assert len(MAKE) >= 10 and len(MODULES) >= 2 and len(MODAL) >= 10


@pytest.mark.parametrize("target", MAKE)
def test_make_targets_exist(target: str) -> None:
    assert target in TARGETS


@pytest.mark.parametrize("module", MODULES)
def test_python_modules_exist(module: str) -> None:
    assert importlib.util.find_spec(module) is not None


@pytest.mark.parametrize(("path", "function"), MODAL)
def test_modal_apps_and_functions_exist(path: str, function: str) -> None:
    assert (REPO / path).is_file()
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    if function:
        import modal

        entry = getattr(module, function)
        assert isinstance(entry, modal.Function | modal.app.LocalEntrypoint), entry
