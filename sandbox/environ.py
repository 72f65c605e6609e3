"""Take the service's own token out of its process environment once it has been read.

In the weak isolation mode ``none`` user code runs as the server's uid, so it can read
``/proc/<server pid>/environ``. That file is not ``os.environ``: the kernel shows the block of
``NAME=value`` strings the process was *started* with, and removing a variable (``unsetenv``)
only drops a pointer to it. So besides ``os.environ.pop`` the value's bytes are overwritten in
place, at the address ``/proc/self/stat`` gives for that block (``env_start``, field 50 of
proc_pid_stat(5)): afterwards the file shows ``SANDBOX_API_TOKEN=`` and zero bytes. The value
lives on only in the server's heap, which another process reads only with ptrace rights over it.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

log = logging.getLogger("sandbox.environ")
# The service's bearer token (Settings.api_token reads it; the client sends it). Here, in a module
# of the standard library alone, so a Modal app file can name it where only modal is installed.
TOKEN_ENV = "SANDBOX_API_TOKEN"

_ENV_START_FIELD = 50  # proc_pid_stat(5) numbering, 1-based; env_end follows


def _env_block_address() -> int:
    """Start address of this process's initial environment block (0 where /proc won't say)."""
    stat = Path("/proc/self/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # fields from 3 (state) on; comm may hold spaces
    index = _ENV_START_FIELD - 3
    return int(fields[index]) if len(fields) > index else 0


def scrub_environ(name: str) -> str | None:
    """Remove ``name`` from this process's environment, in ``/proc/self/environ`` too; return its
    value (``None`` if unset). Logs a warning, never the value, where the block cannot be
    cleared (a kernel without those stat fields)."""
    value = os.environ.pop(name, None)
    if not value:
        return value
    entry = f"{name}=".encode() + os.fsencode(value)
    try:
        block = Path("/proc/self/environ").read_bytes()
        start = _env_block_address()
    except (OSError, ValueError):
        block, start = b"", 0
    offset = 0
    for item in block.split(b"\0"):
        if item == entry:
            address = start + offset + len(name) + 1
            secret = entry[len(name) + 1 :]
            if not start or ctypes.string_at(address, len(secret)) != secret:
                log.warning("%s could not be cleared from /proc/self/environ", name)
                break
            ctypes.memset(address, 0, len(secret))
        offset += len(item) + 1
    return value
