"""Isolation detection: the secure mode is found here, and weaker modes refuse unless allowed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import isolation
from sandbox.isolation import InsecureIsolation, Isolation, IsolationUnavailable, detect
from sandbox.settings import Settings
from tests.sandbox.conftest import REPO, demanded_modes

UNSHARE_ONLY = {
    "euid": 0,
    "pid": 1,
    "hostname": "sandbox",
    "readonly": False,  # gVisor of 2022: no read-only remount
    "net_ifaces": ["lo"],
    "mountns": True,
    "setuid": True,
    "slot_ns": True,
    "seccomp": True,
    "preloaded": [],
}


def test_bwrap_args_hide_host() -> None:
    argv = isolation.bwrap_prefix(isolation.root_layout("/usr/bin/python3"))
    for flag in ("--unshare-net", "--unshare-pid", "--clearenv", "--die-with-parent"):
        assert flag in argv
    binds = {argv[i + 1] for i, a in enumerate(argv) if a in ("--bind", "--ro-bind")}
    assert "/" not in binds and "/root" not in binds and "/work" not in binds
    assert "--bind" not in argv  # nothing of the host is writable


def test_root_layout_shows_the_interpreter_and_site_only(tmp_path) -> None:
    """A venv interpreter outside /usr brings its own tree, SANDBOX_SITE its dirs; nothing else
    of the host (and nothing twice: a site dir inside the venv is already there)."""
    venv = tmp_path / "opt" / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python3").symlink_to("/usr/bin/python3")
    site = venv / "lib" / "site-packages"
    site.mkdir(parents=True)
    other = tmp_path / "site2"
    other.mkdir()
    layout = isolation.root_layout(str(venv / "bin" / "python3"), (str(site), str(other)))
    extra = [b for b in layout["binds"] if not isolation.under(b, ("/usr", "/etc", "/lib"))]
    assert sorted(extra) == sorted([str(venv), str(other)])
    assert layout["binds"][0] == "/usr"


def test_refuses_insecure_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_probe(iso: Isolation, settings: Settings) -> dict | None:
        return None if iso.mode in ("bwrap", "bwrap-ownnet") else UNSHARE_ONLY

    monkeypatch.setattr(isolation, "run_probe", fake_probe)
    with pytest.raises(InsecureIsolation, match="--allow-insecure"):
        detect(Settings(isolation="auto"))
    chosen = detect(Settings(isolation="auto", allow_insecure=True))
    assert chosen.mode == "unshare" and not chosen.secure
    monkeypatch.setattr(isolation, "run_probe", lambda iso, s: {**UNSHARE_ONLY, "readonly": True})
    assert detect(Settings(isolation="unshare")).secure  # read-only binds: as strong as bwrap


def test_nothing_works_is_one_error_naming_each_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """gVisor of 2022 without the ioctl fix: the unshare probe failed, and detect raised a bare
    RuntimeError whose traceback the CLI printed."""
    monkeypatch.setattr(isolation.shutil, "which", lambda name: None)
    failing = {**UNSHARE_ONLY, "slot_ns": False, "slot_ns_error": "[Errno 25] ENOTTY"}
    monkeypatch.setattr(isolation, "run_probe", lambda iso, s: failing)
    with pytest.raises(IsolationUnavailable) as err:
        detect(Settings(isolation="unshare", allow_insecure=True))
    assert str(err.value) == (
        "no isolation mode works here (unshare: no network + IPC namespace per slot "
        "([Errno 25] ENOTTY))"
    )
    with pytest.raises(IsolationUnavailable, match="bwrap: no bwrap on PATH"):
        detect(Settings(isolation="bwrap"))


def test_probe_without_network_isolation_is_not_unshare(monkeypatch: pytest.MonkeyPatch) -> None:
    """A leaky probe is no mode at all: ``auto`` never falls to ``none`` (which would run)."""
    leaky = {**UNSHARE_ONLY, "net_ifaces": ["eth0", "lo"]}
    monkeypatch.setattr(isolation, "run_probe", lambda iso, s: leaky)
    with pytest.raises(IsolationUnavailable, match=r"unshare: network interfaces \['eth0', 'lo'\]"):
        detect(Settings(isolation="auto", allow_insecure=True))
    assert "none" not in isolation.candidate_modes("auto")
    assert detect(Settings(isolation="none", allow_insecure=True)).mode == "none"  # by name only


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
    assert chosen.zygote_argv()[0] == "/usr/bin/bwrap"  # as found on PATH, not the zygote's
    assert not chosen.drop_uid and not chosen.mountns


READ_PLANTED = """
import sys
for path in sys.stdin.read().split():
    try:
        print(open(path).read())
    except OSError as exc:
        print(type(exc).__name__)
"""


@pytest.fixture
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A fake RL parquet with its answers in a data dir outside /tmp, and a file in the project,
    both world-readable: only the sandbox's root can keep them from a run."""
    data = Path(tempfile.mkdtemp(prefix="sandbox-plant-", dir="/var/tmp"))
    secrets = {}
    try:
        (data / "rl").mkdir()
        for path in (data / "rl" / "x.parquet", REPO / f".sandbox-plant-{uuid.uuid4().hex}"):
            secrets[str(path)] = f"answer-{uuid.uuid4().hex}"
            path.write_text(secrets[str(path)])
            path.chmod(0o644)
        for d in (data, data / "rl"):
            d.chmod(0o755)
        yield secrets
    finally:
        shutil.rmtree(data, ignore_errors=True)
        for path in secrets:
            Path(path).unlink(missing_ok=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the modes with a sandbox of their own need root")
def test_no_mode_but_none_reads_files_outside_the_sandbox(planted: dict[str, str]) -> None:
    """``unshare`` mode showed the whole host: the project, /etc/passwd, the RL parquet with its
    ground-truth answers. Every mode that starts here is tried; only ``none`` may read them."""
    readable, started, why = {}, [], {}
    for mode in isolation.MODES:
        argv = ["-m", "sandbox", "run", "--isolation", mode, "--allow-insecure"]
        argv += ["--code", READ_PLANTED, "--stdin", " ".join(planted)]
        proc = subprocess.run(
            [sys.executable, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            env={**os.environ, "SANDBOX_PRELOAD": "math", "SANDBOX_SLOTS": "1"},
        )
        if proc.returncode == 3:  # this mode does not work here: one line says why
            why[mode] = proc.stderr.strip().splitlines()[-1]
            continue
        assert proc.returncode in (0, 1), proc.stderr[-2000:]
        started.append(mode)
        readable[mode] = [s for s in planted.values() if s in proc.stdout]
        why[mode] = proc.stdout[-300:] + proc.stderr[-300:]
    assert "none" in started, why  # none always starts: it proves the files can be read
    want = {m: list(planted.values()) if m == "none" else [] for m in started}
    assert readable == want, why
    assert demanded_modes() <= set(started), why


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare mode needs root")
def test_unshare_is_as_strong_as_bwrap_here() -> None:
    """Root on Linux: the zygote's own root is read-only like bubblewrap's, it is pid 1 of its
    own pid namespace, and the mode needs no --allow-insecure (gVisor: test_gvisor.py)."""
    chosen = detect(Settings(isolation="unshare", preload="math"))
    assert chosen.secure and chosen.probe["readonly"]
    assert chosen.probe["pid"] == 1 and chosen.probe["hostname"] == "sandbox"


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None, reason="needs root and bubblewrap"
)
def test_the_bwrap_first_on_path_is_the_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lent GPU machines have bubblewrap only as a ``dpkg -x`` copy (/tmp/bw/usr/bin): the
    server must run the one its PATH finds, not look it up on the zygote's fixed PATH."""
    copy = tmp_path / "bwrap"
    shutil.copy2(shutil.which("bwrap"), copy)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    chosen = detect(Settings(isolation="bwrap", preload="math"))
    assert chosen.bwrap == str(copy) and chosen.zygote_argv()[0] == str(copy)
    assert chosen.secure


# -- bwrap where gVisor refuses --unshare-net (google/gvisor#13438) -----------------------------
# gVisor's new network namespace already has 127.0.0.1 on lo, so bubblewrap's RTM_NEWADDR gets
# EEXIST and it stops. CI's gVisor (2022) stops earlier, at overflowuid, so the refusal is
# emulated: a bwrap that refuses --unshare-net with gVisor's message, and a namespace whose lo
# already has 127.0.0.1. Not verified on a real modern gVisor (docs/sandbox-security.md).
NEEDS_ROOT_BWRAP = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None, reason="needs root and bubblewrap"
)
REFUSES_UNSHARE_NET = """#!/bin/sh
for arg in "$@"; do
  if [ "$arg" = "--unshare-net" ]; then
    echo "bwrap: loopback: Failed RTM_NEWADDR: File exists" >&2
    exit 1
  fi
done
exec {bwrap} "$@"
"""


@pytest.fixture
def gvisor_like_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bwrap first on PATH that fails --unshare-net as bubblewrap does on gVisor."""
    fake = tmp_path / "bwrap"
    fake.write_text(REFUSES_UNSHARE_NET.format(bwrap=shutil.which("bwrap")))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return fake


def test_bwrap_ownnet_runs_bwrap_without_unshare_net_in_a_namespace_of_ours() -> None:
    argv = Isolation("bwrap-ownnet", "/usr/bin/python3").zygote_argv("{}")
    assert argv[:4] == ["/usr/bin/python3", "-I", "-B", str(isolation.NETNS_SRC)]
    assert argv[4] == "bwrap" and "--unshare-net" not in argv and "--unshare-pid" in argv
    assert "--unshare-net" in Isolation("bwrap", "/usr/bin/python3").zygote_argv("{}")
    assert Isolation("bwrap-ownnet", "python3").secure  # as strong as bwrap


@NEEDS_ROOT_BWRAP
def test_where_bwrap_refuses_unshare_net_bwrap_ownnet_serves(gvisor_like_bwrap: Path) -> None:
    code = "import socket; print([name for _, name in socket.if_nameindex()])"
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox", "run", "--code", code],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "SANDBOX_PRELOAD": "math", "SANDBOX_SLOTS": "2"},
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "['lo']\n", proc.stderr[-2000:]
    assert "sandbox isolation: bwrap-ownnet (secure)" in proc.stderr
    assert "not taken: bwrap: bwrap: loopback: Failed RTM_NEWADDR: File exists" in proc.stderr
    assert "sandbox isolation bwrap-ownnet: self-test passed: mount, network" in proc.stderr


@NEEDS_ROOT_BWRAP
async def test_bwrap_ownnet_is_taken_only_if_its_self_test_passes(
    gvisor_like_bwrap: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same host, with a check it cannot pass (a host directory every mode shows): the
    mode is refused by name and check, and so is every other one."""
    from sandbox import selftest
    from sandbox.startup import start_isolated

    monkeypatch.setattr(selftest, "HIDDEN_PATHS", ("/usr/lib",))
    with pytest.raises(IsolationUnavailable) as err:
        await start_isolated(Settings(slots=1, preload="math", allow_insecure=True))
    assert "bwrap-ownnet: self-test failed: hidden: a call sees /usr/lib" in str(err.value)
    assert "bwrap: bwrap: loopback: Failed RTM_NEWADDR" in str(err.value)


LO_ALREADY_UP = """
set -e
ip link set lo up                      # lo now has 127.0.0.1, as in gVisor's new namespace
if out=$(ip addr add 127.0.0.1/8 dev lo 2>&1); then echo "added"; else echo "$out"; fi
{python} -c 'import sys; sys.path.insert(0, "{zygote}"); import root; root.loopback_up()'
echo "lo: $(ip -o -4 addr show lo | grep -c 127.0.0.1)"
{python} -I -B {netns} /bin/sh -c 'echo "own: $(ip -o -4 addr show lo | grep -c 127.0.0.1)"'
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip",
)
def test_our_namespace_accepts_lo_already_having_127_0_0_1() -> None:
    """What bubblewrap does (add 127.0.0.1 over netlink) fails where lo has it already; what
    ``_netns.py`` does (bring lo up if it is down) does not."""
    script = LO_ALREADY_UP.format(
        python="/usr/bin/python3", zygote=isolation.ZYGOTE_SRC, netns=isolation.NETNS_SRC
    )
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # bubblewrap's RTM_NEWADDR, refused (EEXIST; iproute2 words it one way or the other)
    assert lines[0] in ("RTNETLINK answers: File exists", "Error: ipv4: Address already assigned.")
    assert lines[1:] == ["lo: 1", "own: 1"]
