"""The trainer image's pip sets, computed from the project's own files (stdlib only: it runs in the
image build, before anything is installed, and in ``scripts/check_images.py``).

    python images/trainer_requirements.py trainer [--root DIR]   # the trainer's virtualenv
    python images/trainer_requirements.py sandbox [--root DIR]   # the sandbox's interpreter

- ``trainer``: ``verl[vllm]`` (which pins vLLM 0.24.0, torch 2.11.0 and transformers 5.9.0, and
  brings transferqueue) and liger-kernel, at constraints.txt's versions, plus pyproject.toml's
  ``dependencies``: one resolve, so the project's pins and vLLM's must agree.
- ``sandbox``: the packages user code may import (``sandbox/runtime.py``), for the system python the
  sandbox runs user code with.

``--root`` is where ``constraints.txt``, ``pyproject.toml`` and ``sandbox/runtime.py`` lie (the
repository, or the image's copy of those files).
"""

from __future__ import annotations

import argparse
import ast
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Installed only in the GPU image, at constraints.txt's versions (verl's extra brings the rest).
GPU_PACKAGES = ("verl[vllm]", "liger-kernel")
# Where the image must differ from constraints.txt (resolved on CPU with torch 2.13): the vLLM 0.24
# stack pins these lower; with constraints.txt's versions the trainer set does not resolve.
GPU_OVERRIDES = {
    "fastapi": "vllm 0.24.0 requires fastapi<0.137",
    "numpy": "the vLLM 0.24 stack resolves only below constraints.txt's numpy 2.4.6",
}
LOCK_FILE = "images/trainer-constraints.txt"  # every trainer-image package, pinned (pip -c)


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503), extras dropped."""
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def constraints(root: Path) -> dict[str, str]:
    """constraints.txt as {canonical name: version}."""
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version.strip()
    return pins


def user_packages(root: Path) -> dict[str, str]:
    """``sandbox/runtime.py``'s USER_PACKAGES, read without importing the sandbox package."""
    tree = ast.parse((root / "sandbox" / "runtime.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "USER_PACKAGES":
            return ast.literal_eval(node.value)
    raise ValueError("sandbox/runtime.py defines no USER_PACKAGES")


def trainer(root: Path) -> list[str]:
    pins = constraints(root)
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    gpu = [f"{name}=={pins[canonical(name)]}" for name in GPU_PACKAGES]
    return [*gpu, *project["dependencies"]]


def sandbox(root: Path) -> list[str]:
    return [f"{name}=={version}" for name, version in user_packages(root).items()]


SETS = {"trainer": trainer, "sandbox": sandbox}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("set", choices=sorted(SETS))
    parser.add_argument("--root", type=Path, default=REPO)
    args = parser.parse_args(argv)
    print("\n".join(SETS[args.set](args.root)))


if __name__ == "__main__":
    main()
