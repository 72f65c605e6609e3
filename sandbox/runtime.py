"""What user code may import beyond the standard library: the one list of it.

ReTool traces import numpy and sympy (and the standard library's math, fractions, itertools...).
The sandbox runs user code with a plain system interpreter (readable by the per-run uids), not the
project's virtualenv, so these packages have to be installed for *that* interpreter wherever the
sandbox runs. Everything that installs or checks them reads this module:

- ``pyproject.toml``'s ``sandbox`` extra pins the same names (images/sandbox.Dockerfile installs it;
  tests/sandbox/test_runtime.py checks the two agree);
- ``scripts/setup.sh`` installs Debian's builds for ``/usr/bin/python3`` (``apt_packages()``);
- :class:`sandbox.settings.Settings` preloads them into the warm zygote;
- at start the service logs which of them the zygote's interpreter cannot import, and how to fix it;
- where the interpreter has none (the GPU machines), ``SANDBOX_SITE`` names a directory that has
  them (:class:`sandbox.settings.Settings`), e.g. the trainer venv's site-packages.
"""

from __future__ import annotations

# name -> version pinned for the images (Debian's own build is used on a bare host).
USER_PACKAGES: dict[str, str] = {"numpy": "2.4.6", "sympy": "1.14.0"}
# Standard-library modules worth importing once in the zygote rather than in every run.
STDLIB_PRELOAD = (
    "math",
    "fractions",
    "itertools",
    "functools",
    "collections",
    "decimal",
    "re",
    "json",
)


def preload_default() -> str:
    return ",".join((*STDLIB_PRELOAD, *USER_PACKAGES))


def apt_packages(names: object = USER_PACKAGES) -> str:
    """Debian package names for the system interpreter (``python3-numpy python3-sympy``)."""
    return " ".join(f"python3-{name}" for name in names)


def missing_message(python: str, missing: set[str]) -> str:
    """The start-up warning: what user code cannot import, and the ways to fix it."""
    return (
        f"user code cannot import {', '.join(sorted(missing))}: install them for {python} "
        f"(Debian/Ubuntu: apt-get install {apt_packages(sorted(missing))}; or pip, pins in "
        "sandbox/runtime.py), or point SANDBOX_PYTHON at an interpreter that has them, or "
        "SANDBOX_SITE at a site-packages directory built for this one"
    )


if __name__ == "__main__":  # `python -m sandbox.runtime`: the apt names, for scripts/setup.sh
    print(apt_packages())
