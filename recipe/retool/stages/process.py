"""How a stage runs its trainer: a subprocess with the project importable, so verl's own entry
points (torchrun, main_ppo) run unmodified, and the environment every training process gets."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

# What runs a command with extra environment and returns its exit status (tests pass fakes).
Runner = Callable[[Sequence[str], dict[str, str]], int]

# Environment for every training subprocess. expandable_segments breaks CUDA IPC weight sync
# (pidfd_getfd: Operation not permitted) on Modal; NVLink multicast is unsupported there.
TRAINING_ENV = {
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False",
    "NCCL_NVLS_ENABLE": "0",
    "TOKENIZERS_PARALLELISM": "true",
    "HYDRA_FULL_ERROR": "1",
}


def run_subprocess(command: Sequence[str], env: dict[str, str], stdout: IO | None = None) -> int:
    """Run a training command with the project importable, streaming its output (to ``stdout``,
    stderr included, when given)."""
    repo_root = str(Path(__file__).resolve().parents[3])
    merged = {**os.environ, **env}
    merged["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, merged.get("PYTHONPATH")]))
    stderr = subprocess.STDOUT if stdout is not None else None
    return subprocess.run(
        list(command), env=merged, check=False, stdout=stdout, stderr=stderr
    ).returncode
