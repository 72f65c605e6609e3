"""What every Modal app of the project shares: its images and secrets, the settings read when an
app is imported, the sandbox's address, and how a failed launch stays failed across retries.

Modal imports an app file twice (``/work/shared/FACTS.md``, "How Modal 1.6.4 loads an app
file"): where ``modal run`` / ``modal deploy`` runs, as a top-level module, with whatever the user
installed (the README's ``pip install modal``); and again in every container, mounted alone at
``/root/<file>.py``, with only the image's packages and the container's environment. So this
module, and everything an app file imports at its top, needs only modal and the standard
library; the rest is imported inside function bodies. ``make check-modal`` runs both sides.

The trainer image is built from ``images/trainer.Dockerfile`` — the file docker compose builds —
so "works in compose" means "builds on Modal". The project's code is added last, so a code edit
never rebuilds the CUDA layers.
"""

from __future__ import annotations

import os
import secrets
import sys
import tomllib
from pathlib import Path
from typing import NoReturn

import modal

from recipe.retool.core import paths
from recipe.retool.core.constants import RAY_TOKEN_ENV
from recipe.retool.core.envfile import DOTENV, read_dotenv
from sandbox.environ import TOKEN_ENV

# The repository where `modal run` runs (images are built from it). In a container this module
# lies under /root/..., and nothing there reads this path: an image definition is evaluated but
# never built in a container.
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
    # What `--sandbox=modal` builds its sandboxes' image from, in the container
    # (sandbox/modal_backend.py: images/sandbox.Dockerfile, whose context needs pyproject.toml).
    for build_file in ("images/sandbox.Dockerfile", "pyproject.toml", ".dockerignore"):
        image = image.add_local_file(REPO_ROOT / build_file, str(REMOTE_ROOT / build_file))
    return image


def sandbox_image() -> modal.Image:
    """``images/sandbox.Dockerfile`` (the sandbox service's packages, bubblewrap), then the
    ``sandbox`` package and the apps' shared modules (``recipe``) as Python source, mounted at
    ``/root/sandbox`` and ``/root/recipe``: last, so a code change does not rebuild the image."""
    return modal.Image.from_dockerfile(
        REPO_ROOT / "images" / "sandbox.Dockerfile", context_dir=REPO_ROOT
    ).add_local_python_source("sandbox", "recipe")


RESOURCES_FILE = Path(__file__).resolve().parent / "config" / "resources.toml"


def host_resources(stage: str, gpus: int) -> dict[str, float | int]:
    """``cpu`` (cores) and ``memory`` (MiB) for a GPU function of ``stage`` on ``gpus`` GPUs:
    the sum of ``config/resources.toml``'s items, ``per_gpu`` ones times ``gpus``. Modal's
    default (0.125 core, 128 MiB guaranteed) ignores Ray, the dataloaders and the node sandbox."""
    spec = tomllib.loads(RESOURCES_FILE.read_text())[stage]

    def total(items: dict[str, float]) -> float:
        return sum(v * gpus if k == "per_gpu" else v for k, v in items.items())

    return {"cpu": float(total(spec["cpu"])), "memory": int(total(spec["memory_gib"]) * 1024)}


def dotenv_secret() -> modal.Secret:
    """The ``.env`` (see ``.env.example``) as a secret: read where ``modal run`` runs, without
    python-dotenv (``Secret.from_dotenv`` needs it); its repr names the keys, never a value. In a
    container the file is not there and the secret is the one the launch sent."""
    return modal.Secret.from_dict(read_dotenv(DOTENV))


def deploy_token() -> dict[str, str]:
    """``{SANDBOX_API_TOKEN: ...}`` from this shell or ``.env``: what the deployed sandbox
    requires and what its callers send. Empty where none is configured. In a container the
    function's secret has set the variable, so the same dict comes back there (the number of
    secrets a function has must be the same on both sides)."""
    token = os.environ.get(TOKEN_ENV) or read_dotenv(DOTENV).get(TOKEN_ENV) or ""
    return {TOKEN_ENV: token} if token else {}


def ray_cluster_secret() -> modal.Secret:
    """``RAY_AUTH_TOKEN`` for every node of a multi-node DAPO launch (``stages.join_ray_cluster``).

    The containers of a Modal cluster share no home directory, so the token Ray's head writes to
    its ``~/.ray/auth_token`` reaches no worker. A fresh 256-bit token is made where ``modal run``
    runs, once per launch, and Modal delivers it to every container of the cluster as it does
    the ``.env`` secrets: nothing to configure, no rendezvous a stranger could answer first, and
    never on a volume or in a log. Inside a container this returns an empty stand-in, as
    ``Secret.from_local_environ`` does: the function's secrets are the ones bound at launch.
    """
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


class ImportSettings:
    """The settings an app file reads from the environment when it is imported, each recorded
    as it is read so that the app passes them all (``env=self.env``) to every function.

    Modal imports the file again in each container, with the container's environment: a value
    read there from a variable that only the launching shell had would take its default (8 GPUs
    where ``RETOOL_GPUS=2`` asked Modal for 2). Carried in the function's environment, the
    container reads the value the launch read."""

    def __init__(self) -> None:
        self.env: dict[str, str] = {}

    def count(self, name: str, default: int) -> int:
        """:func:`env_count`, recorded."""
        value = env_count(name, default)
        self.env[name] = str(value)
        return value

    def text(self, name: str, default: str) -> str:
        """A string setting (``default`` when unset or empty), recorded."""
        value = os.environ.get(name) or default
        self.env[name] = value
        return value

    def flag(self, name: str) -> bool:
        """An opt-in: true only when set to ``1``, recorded as ``1`` or ``0``."""
        value = os.environ.get(name) == "1"
        self.env[name] = "1" if value else "0"
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


# ---- failures that no retry can fix --------------------------------------------------------------
#
# Modal retries every failure of a function that has retries (SystemExit too: it has no
# non-retryable exception), and each retry pays for another GPU start. A mistake found on the GPU
# node that no retry can fix (a bad override, a missing checkpoint, no sandbox) is therefore kept
# on the checkpoints volume under the function call's id, which every attempt of one call
# shares: the next attempt reads it back before anything else and fails at once with the same
# line, and the call ends failed, never as success.


def refuse_retry(layout: paths.Layout, call_id: str | None) -> None:
    """Exit 2 with the recorded line when an earlier attempt of this call failed for good."""
    marker = layout.failed_call_file(call_id) if call_id else None
    if marker is not None and marker.is_file():
        print(marker.read_text().rstrip("\n"), file=sys.stderr)
        raise SystemExit(2)


def fail_for_good(layout: paths.Layout, call_id: str | None, line: str) -> NoReturn:
    """Print ``line``, record it for this call's retries (commit the checkpoints volume after),
    and exit 2."""
    print(line, file=sys.stderr)
    if call_id:
        marker = layout.failed_call_file(call_id)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(line + "\n")
    raise SystemExit(2)
