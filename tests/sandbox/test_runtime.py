"""The packages user code may import: one list, installed by the image, preloaded, reported."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

from sandbox import runtime
from sandbox.isolation import detect
from sandbox.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_the_image_installs_the_pinned_runtime() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = dict(r.split("==") for r in extras["optional-dependencies"]["sandbox"])
    assert {name: pins.get(name) for name in runtime.USER_PACKAGES} == runtime.USER_PACKAGES


def test_the_zygote_preloads_every_user_package_and_setup_installs_them() -> None:
    assert set(runtime.USER_PACKAGES) <= set(Settings().preload.split(","))
    assert runtime.apt_packages() == "python3-numpy python3-sympy"
    assert '"$VENV/bin/python" -m sandbox.runtime' in (REPO / "scripts/setup.sh").read_text()


def test_start_up_names_what_user_code_cannot_import(caplog) -> None:
    settings = Settings(preload="math,no_such_module_here", allow_insecure=True, isolation="none")
    with caplog.at_level(logging.WARNING, logger="sandbox.isolation"):
        detect(settings)
    message = next(r.getMessage() for r in caplog.records if "cannot import" in r.getMessage())
    assert "no_such_module_here" in message and "math" not in message.split(":")[0]
    assert "apt-get install python3-no_such_module_here" in message and "SANDBOX_PYTHON" in message
