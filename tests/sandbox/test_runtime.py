"""The packages user code may import: one list, installed by the image, preloaded, reported."""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

import pytest

from sandbox import runtime
from sandbox.isolation import detect
from sandbox.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[2]


def test_the_image_installs_the_pinned_runtime() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = dict(r.split("==") for r in extras["optional-dependencies"]["sandbox"])
    assert {name: pins.get(name) for name in runtime.USER_PACKAGES} == runtime.USER_PACKAGES


def test_the_zygote_preloads_every_user_package_and_setup_installs_them() -> None:
    assert set(runtime.USER_PACKAGES) <= set(Settings().preload.split(","))
    assert runtime.apt_packages() == "python3-numpy python3-sympy"
    assert '"$VENV/bin/python" -m sandbox.runtime' in (REPO / "scripts/setup.sh").read_text()
    # each training node runs a sandbox on the trainer image's system python, which gets them
    trainer = (REPO / "images/trainer.Dockerfile").read_text()
    assert "pip --python /usr/bin/python3 install" in trainer
    assert f'/usr/bin/python3 -c "import {", ".join(runtime.USER_PACKAGES)}"' in trainer


def test_start_up_names_what_user_code_cannot_import(caplog) -> None:
    settings = Settings(preload="math,no_such_module_here", allow_insecure=True, isolation="none")
    with caplog.at_level(logging.WARNING, logger="sandbox.isolation"):
        detect(settings)
    message = next(r.getMessage() for r in caplog.records if "cannot import" in r.getMessage())
    assert "no_such_module_here" in message and "math" not in message.split(":")[0]
    assert "apt-get install python3-no_such_module_here" in message and "SANDBOX_PYTHON" in message


@pytest.mark.parametrize("mode", ["none", "unshare", "bwrap-userns", "bwrap"])
def test_sandbox_site_reaches_user_code_and_pythonpath_does_not(mode: str) -> None:
    """The GPU machines' system python has no numpy/sympy; their packages sit in a directory on
    PYTHONPATH, which the zygote (``python -I``) ignores. SANDBOX_SITE is the way in, in every
    mode (bubblewrap binds it read-only)."""
    import shutil
    import tempfile

    from sandbox.client import SandboxClient
    from sandbox.local import sandbox_service

    if mode.startswith("bwrap") and shutil.which("bwrap") is None:
        pytest.skip("no bubblewrap here (scripts/setup.sh installs it as root)")
    # World-readable, for the per-run uids (pytest's tmp_path is 0700), and not under /tmp or
    # /var/tmp, which every run replaces with its own.
    parent = next((d for d in ("/srv", "/opt") if os.access(d, os.W_OK)), None)
    if parent is None:
        pytest.skip("needs a writable directory outside /tmp and /var/tmp (runs as root in CI)")
    root = Path(tempfile.mkdtemp(prefix="sandbox-site-", dir=parent))
    try:
        for name, value in (("via_site", 42), ("via_pythonpath", 7)):
            (root / name).mkdir(mode=0o755)
            (root / name / f"retool_{name}.py").write_text(f"VALUE = {value}\n")
            (root / name / f"retool_{name}.py").chmod(0o644)
        root.chmod(0o755)
        env = {"SANDBOX_SITE": str(root / "via_site"), "PYTHONPATH": str(root / "via_pythonpath")}
        code = (
            "import retool_via_site\nprint(retool_via_site.VALUE)\n"
            "try:\n    import retool_via_pythonpath\nexcept ImportError:\n    print('no')\n"
        )
        args = ("--allow-insecure", "--isolation", mode, "--log-level", "warning")
        with sandbox_service(*args, env=env) as base:
            result = SandboxClient(base, max_retries=1).run_code_sync(code)
    finally:
        shutil.rmtree(root)
    assert (result.status, result.stdout.split()) == ("Success", ["42", "no"]), result


def test_sandbox_site_entries_must_be_directories_outside_tmp(tmp_path) -> None:
    for wrong in ("relative/site-packages", str(tmp_path / "missing"), str(tmp_path), "/var/tmp"):
        with pytest.raises(SettingsError, match="SANDBOX_SITE"):
            Settings(site=wrong)
    assert Settings(site="/usr/lib:").site_dirs == ("/usr/lib",)
