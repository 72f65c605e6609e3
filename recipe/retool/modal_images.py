"""The trainer image for every Modal app (training, evaluation, serving), built once, one way.

Built from ``images/trainer.Dockerfile`` — the file docker compose builds — so "works in compose"
means "builds on Modal". The project's code is added last, so a code edit never rebuilds the
CUDA layers.
"""

from __future__ import annotations

from pathlib import Path

import modal

REPO_ROOT = Path(__file__).resolve().parents[2]
REMOTE_ROOT = Path("/root/retool-modal")  # where the code lives in the container (on PYTHONPATH)
_IGNORE = ["**/__pycache__", "**/.pytest_cache", ".venv", "runs", ".cache", ".git"]


def trainer_image() -> modal.Image:
    """CUDA + vLLM + verl (the Dockerfile), then ``recipe/`` and ``sandbox/`` on top."""
    image = modal.Image.from_dockerfile(
        REPO_ROOT / "images" / "trainer.Dockerfile", context_dir=REPO_ROOT
    )
    image = image.env({"PYTHONPATH": str(REMOTE_ROOT), "PYTHONUNBUFFERED": "1"})
    for package in ("recipe", "sandbox"):
        image = image.add_local_dir(REPO_ROOT / package, str(REMOTE_ROOT / package), ignore=_IGNORE)
    return image
