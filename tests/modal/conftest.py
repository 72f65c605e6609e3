"""Session fixtures of the Modal harness (``harness.py``): one copy of the repository to run the
client in, each app file described once, the sandbox app served from its container."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.modal import harness

APP_FILES = {
    "sft": "recipe/retool/retool_modal_sft.py",
    "sandbox": "recipe/retool/modal_fusion_sandbox.py",
    "check": "recipe/retool/test_sandbox_fusion.py",
    "serve": "recipe/retool/serve.py",
}


@pytest.fixture(scope="session")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> harness.Checkout:
    return harness.Checkout.make(tmp_path_factory.mktemp("checkout"))


@pytest.fixture(scope="session")
def describe(checkout: harness.Checkout) -> Callable[..., dict[str, Any]]:
    """``describe(name, **env)``: what the client makes of ``APP_FILES[name]`` (memoized)."""
    seen: dict[tuple, dict[str, Any]] = {}

    def run(name: str, **env: str) -> dict[str, Any]:
        key = (name, tuple(sorted(env.items())))
        if key not in seen:
            result = harness.describe(checkout, APP_FILES[name], env)
            assert result.exit == 0, result.stderr[-3000:]
            seen[key] = result.record
        return seen[key]

    return run


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("containers")


@pytest.fixture(scope="session")
def containers(workspace: Path) -> Path:
    """The containers are bubblewrap binds made as root, as Modal's run as root."""
    if os.geteuid() != 0:
        pytest.skip("the emulated containers need root (bubblewrap binds, as Modal runs as root)")
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is missing: apt-get install bubblewrap (scripts/setup.sh does)")
    return workspace


def _served(describe, containers: Path, isolation: bool) -> Iterator[harness.Served]:
    app = describe("sandbox")
    with harness.Container(app, "serve", containers, isolation=isolation).serving() as served:
        yield served


@pytest.fixture(scope="session")
def sandbox(describe, containers) -> Iterator[harness.Served]:
    """``modal deploy recipe/retool/modal_fusion_sandbox.py``'s container, serving."""
    yield from _served(describe, containers, isolation=True)


@pytest.fixture(scope="session")
def sandbox_without_isolation(describe, containers) -> Iterator[harness.Served]:
    """The same, on a host where no namespace can be made (every capability dropped)."""
    yield from _served(describe, containers, isolation=False)


def deployed(served: harness.Served) -> dict[str, str]:
    """Modal's name lookup of the deployed sandbox, answered with ``served``'s URL."""
    return {"retool-sandbox/serve": served.url}
