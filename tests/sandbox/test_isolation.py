"""Isolation detection: the secure mode is found here, and weaker modes refuse unless allowed."""

from __future__ import annotations

import os
import shutil

import pytest

from sandbox import isolation
from sandbox.isolation import InsecureIsolation, Isolation, detect
from sandbox.settings import Settings

UNSHARE_ONLY = {
    "euid": 0,
    "unshare_net": True,
    "net_ifaces": ["lo"],
    "mountns": True,
    "setuid": True,
    "slot_ns": True,
    "preloaded": [],
}


def test_bwrap_args_hide_host() -> None:
    argv = isolation.bwrap_prefix()
    for flag in ("--unshare-net", "--unshare-pid", "--clearenv", "--die-with-parent"):
        assert flag in argv
    binds = {argv[i + 1] for i, a in enumerate(argv) if a in ("--bind", "--ro-bind")}
    assert "/" not in binds and "/root" not in binds and "/work" not in binds
    assert "--bind" not in argv  # nothing of the host is writable


def test_refuses_insecure_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_probe(iso: Isolation, settings: Settings) -> dict | None:
        return None if iso.mode == "bwrap" else UNSHARE_ONLY

    monkeypatch.setattr(isolation, "run_probe", fake_probe)
    with pytest.raises(InsecureIsolation, match="--allow-insecure"):
        detect(Settings(isolation="auto"))
    chosen = detect(Settings(isolation="auto", allow_insecure=True))
    assert chosen.mode == "unshare" and not chosen.secure


def test_probe_without_network_isolation_is_not_unshare(monkeypatch: pytest.MonkeyPatch) -> None:
    leaky = {**UNSHARE_ONLY, "net_ifaces": ["eth0", "lo"]}
    monkeypatch.setattr(isolation, "run_probe", lambda iso, s: leaky)
    chosen = detect(Settings(isolation="auto", allow_insecure=True))
    assert chosen.mode == "none"


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None, reason="needs root and bubblewrap"
)
def test_detects_bwrap_here() -> None:
    chosen = detect(Settings())
    assert chosen.mode == "bwrap" and chosen.secure
    assert chosen.probe["net_ifaces"] == ["lo"]
    assert {"numpy", "sympy"} <= set(chosen.probe["preloaded"])


def test_non_root_gets_bubblewrap_in_a_user_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root (a laptop): bubblewrap still hides the network and the home directory."""
    non_root = {**UNSHARE_ONLY, "euid": 1000, "mountns": False, "setuid": False, "seccomp": True}

    def fake_probe(iso: Isolation, settings: Settings) -> dict | None:
        return non_root if iso.mode.startswith("bwrap") else {**non_root, "net_ifaces": ["eth0"]}

    monkeypatch.setattr(isolation, "run_probe", fake_probe)
    monkeypatch.setattr(isolation.shutil, "which", lambda name: "/usr/bin/" + name)
    with pytest.raises(InsecureIsolation, match="no per-run uid"):
        detect(Settings(isolation="auto"))
    chosen = detect(Settings(isolation="auto", allow_insecure=True))
    assert chosen.mode == "bwrap-userns" and not chosen.secure
    assert chosen.zygote_argv()[0] == "bwrap" and not chosen.drop_uid and not chosen.mountns
