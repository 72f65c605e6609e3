"""Service settings, read once from ``SANDBOX_*`` environment variables.

Every limit below is part of the service's documented contract (README "Sandbox"); the defaults are
safe for untrusted model-written code because the official ``sandbox-fusion`` 0.3.7 client drops
``memory_limit_MB`` and verl often sends ``-1``, so the *server default* is what usually applies.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sandbox.runtime import preload_default

MiB = 1024 * 1024


class SettingsError(ValueError):
    """A setting that cannot work; the message names the variable or flag and what it accepts."""


_TYPE_WORDS = {int: "an integer", float: "a number"}
# Directories every run sees as its own empty tmpfs (zygote/run.py SCRATCH_VIEWS mounts them): a
# SANDBOX_SITE under one would be hidden from user code.
RUN_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def _env(name: str, default: Any) -> Any:
    var = f"SANDBOX_{name.upper()}"
    raw = os.environ.get(var)
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    try:
        return type(default)(raw)
    except ValueError:
        raise SettingsError(
            f"{var}={raw!r}: expected {_TYPE_WORDS[type(default)]}; fix or unset it"
        ) from None


@dataclass(frozen=True)
class Settings:
    """Limits and pool shape; field ``x`` is set by env ``SANDBOX_X`` (e.g. SANDBOX_SLOTS=8)."""

    # --- per-run limits -------------------------------------------------------------------------
    memory_mb: int = 1024  # address-space budget of one run (memory_limit_MB=-1 uses this)
    max_memory_mb: int = 4096  # a request asking for more is clamped to this
    max_run_timeout_s: float = 300.0  # run_timeout above this is rejected (422)
    max_processes: int = 64  # RLIMIT_NPROC per run (processes + threads): contains fork bombs
    max_file_size_mb: int = 64  # RLIMIT_FSIZE: largest single file a run may write
    scratch_mb: int = 256  # size of the run's private tmpfs (its cwd and /tmp)
    max_open_files: int = 256  # RLIMIT_NOFILE
    output_cap_bytes: int = 1 * MiB  # stdout and stderr are each cut to this many bytes
    # --- request size limits (4xx beyond these) -------------------------------------------------
    max_code_bytes: int = 1 * MiB
    max_stdin_bytes: int = 8 * MiB
    max_files_bytes: int = 32 * MiB  # sum of decoded ``files`` contents
    max_fetch_bytes: int = 32 * MiB  # sum of returned ``fetch_files`` contents
    max_request_bytes: int = 64 * MiB  # whole HTTP body (base64 inflates files by 4/3)
    # --- pool and queue -------------------------------------------------------------------------
    slots: int = field(default_factory=lambda: max(4, 2 * (os.cpu_count() or 1)))  # concurrent runs
    max_queue: int = 1024  # requests waiting for a slot; beyond this: HTTP 504 at once
    queue_timeout_s: float = 60.0  # longest wait for a slot before HTTP 504 (clients retry 504)
    base_uid: int = 61000  # slot i runs as uid/gid base_uid + i (no such user needed)
    # --- isolation ------------------------------------------------------------------------------
    isolation: str = "auto"  # auto | bwrap | unshare | bwrap-userns | none
    allow_insecure: bool = False  # permit a mode weaker than bwrap (Modal/gVisor opts in)
    python: str = ""  # interpreter of the warm zygote; "" = first of /usr/bin/python3, ...
    # Extra import directories for user code (os.pathsep-separated), e.g. a site-packages dir
    # holding numpy/sympy built for that interpreter where its own has none (the GPU machines,
    # the trainer image's /opt/venv). The zygote runs with -I, so PYTHONPATH never reaches user
    # code: this is the one way. Bound read-only into bubblewrap; must be readable by any uid
    # and not under /tmp (each run gets a /tmp of its own).
    site: str = ""
    preload: str = field(default_factory=preload_default)  # sandbox/runtime.py
    # Addresses (``host:port``, comma-separated) no run may reach, beside the ones the start-up
    # self-test always tries (this host's own addresses, the internet; sandbox/selftest.py): the
    # Ray head and the other nodes of a cluster, which only the launcher knows.
    selftest_targets: str = ""
    pod_name: str = field(default_factory=lambda: os.environ.get("HOSTNAME", "local"))
    # --- access -----------------------------------------------------------------------------------
    # When set, every route needs ``Authorization: Bearer <token>`` (401, before the body is
    # read, otherwise); only /v1/ping stays open. Unset, loopback SandboxFusion clients work as
    # before. Never shown in a repr or log.
    api_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise SettingsError(
                f"slots={self.slots}: at least 1 run must fit (--slots / SANDBOX_SLOTS)"
            )
        if self.python and not os.access(self.python, os.X_OK):
            raise SettingsError(
                f"python={self.python!r} is not an executable file; set SANDBOX_PYTHON to an "
                "interpreter's path, or unset it to use the first of /usr/bin/python3, ..."
            )

        for path in self.site_dirs:
            if not Path(path).is_absolute() or not Path(path).is_dir():
                raise SettingsError(
                    f"site entry {path!r} is not an absolute path to a directory; fix "
                    "SANDBOX_SITE (directories separated by ':') or unset it"
                )
            shadowed = next(
                (d for d in RUN_PRIVATE_DIRS if Path(path).resolve().is_relative_to(d)), None
            )
            if shadowed:
                raise SettingsError(
                    f"site entry {path!r} is under {shadowed}, which each run replaces with its "
                    "own; move it elsewhere (e.g. /opt, /srv) for SANDBOX_SITE"
                )

    def run_limits(self, run_timeout: float, memory_mb: int) -> dict[str, int]:
        """The per-run limits the zygote applies (``zygote/child.py``), for one request."""
        return {
            "memory_bytes": memory_mb * MiB,
            "cpu_s": math.ceil(run_timeout) + 1,
            "nproc": self.max_processes,
            "fsize": self.max_file_size_mb * MiB,
            "nofile": self.max_open_files,
            "output_cap": self.output_cap_bytes,
            "fetch_bytes": self.max_fetch_bytes,
        }

    @property
    def site_dirs(self) -> tuple[str, ...]:
        return tuple(filter(None, self.site.split(os.pathsep)))

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        values: dict[str, Any] = {}
        defaults = cls()
        for f in fields(cls):
            values[f.name] = _env(f.name, getattr(defaults, f.name))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
