"""What every Modal app of the project shares: the trainer image and the sandbox's address.

The image is built from ``images/trainer.Dockerfile`` — the file docker compose builds — so
"works in compose" means "builds on Modal". The project's code is added last, so a code edit
never rebuilds the CUDA layers.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import modal

from recipe.retool import paths

REPO_ROOT = Path(__file__).resolve().parents[2]
REMOTE_ROOT = Path("/root/retool-modal")  # where the code lives in the container (on PYTHONPATH)
_IGNORE = ["**/__pycache__", "**/.pytest_cache", ".venv", "runs", ".cache", ".git"]


def trainer_image() -> modal.Image:
    """CUDA + vLLM + verl (the Dockerfile), then ``recipe/`` and ``sandbox/`` on top."""
    image = modal.Image.from_dockerfile(
        REPO_ROOT / "images" / "trainer.Dockerfile", context_dir=REPO_ROOT
    )
    # HF_HOME on the models volume: hub datasets and files download once, not on every prep.
    image = image.env(
        {"PYTHONPATH": str(REMOTE_ROOT), "PYTHONUNBUFFERED": "1", "HF_HOME": str(paths.HF_CACHE)}
    )
    for package in ("recipe", "sandbox"):
        image = image.add_local_dir(REPO_ROOT / package, str(REMOTE_ROOT / package), ignore=_IGNORE)
    return image


RESOURCES_FILE = Path(__file__).resolve().parent / "config" / "resources.yaml"


def host_resources(stage: str, gpus: int) -> dict[str, float | int]:
    """``cpu`` (cores) and ``memory`` (MiB) for a GPU function of ``stage`` on ``gpus`` GPUs:
    the sum of ``config/resources.yaml``'s items, ``per_gpu`` ones times ``gpus``. Modal's
    default (0.125 core, 128 MiB guaranteed) ignores Ray, the dataloaders and the node sandbox."""
    import yaml

    spec = yaml.safe_load(RESOURCES_FILE.read_text())[stage]

    def total(items: dict[str, float]) -> float:
        return sum(v * gpus if k == "per_gpu" else v for k, v in items.items())

    return {"cpu": float(total(spec["cpu"])), "memory": int(total(spec["memory_gib"]) * 1024)}


def ray_cluster_secret() -> modal.Secret:
    """``RAY_AUTH_TOKEN`` for every node of a multi-node DAPO launch (``stages.join_ray_cluster``).

    The containers of a Modal cluster share no home directory, so the token Ray's head writes to
    its ``~/.ray/auth_token`` reaches no worker. A fresh 256-bit token is made where ``modal run``
    runs, once per launch, and Modal delivers it to every container of the cluster as it does
    the ``.env`` secrets: nothing to configure, no rendezvous a stranger could answer first, and
    never on a volume or in a log. Inside a container this returns an empty stand-in, as
    ``Secret.from_local_environ`` does: the function's secrets are the ones bound at launch.
    """
    from recipe.retool.stages import RAY_TOKEN_ENV

    return modal.Secret.from_dict(
        {RAY_TOKEN_ENV: secrets.token_hex(32)} if modal.is_local() else {}
    )


def env_count(name: str, default: int) -> int:
    """A positive whole number from the environment (a GPU, node or token count), read when an
    app is imported. Anything else prints one line naming the variable and ends the command with
    exit 2, before Modal builds or starts anything."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        print(f"error: {name}={raw!r} is not a whole number >= 1: set it to one "
              f"(e.g. {name}={default}), or unset it for {default}", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    return value


class SandboxNotDeployed(RuntimeError):
    """The sandbox app is not deployed and no SANDBOX_FUSION_ENDPOINT is set."""


def sandbox_url() -> str:
    """The sandbox's ``/run_code`` URL: SANDBOX_FUSION_ENDPOINT when set (compose, tests), else
    the deployed ``modal_fusion_sandbox.py`` web endpoint, looked up by name."""
    explicit = os.environ.get("SANDBOX_FUSION_ENDPOINT")
    if explicit:
        return explicit
    fn = modal.Function.from_name(paths.SANDBOX_APP_NAME, paths.SANDBOX_FUNCTION_NAME)
    try:
        return fn.get_web_url().rstrip("/") + "/run_code"
    except modal.exception.NotFoundError:
        raise SandboxNotDeployed(
            "the sandbox is not deployed: run `modal deploy recipe/retool/modal_fusion_sandbox.py`"
        ) from None
