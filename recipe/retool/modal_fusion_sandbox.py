"""# The sandbox as a Modal web endpoint

Serves the same FastAPI app as ``python -m sandbox serve`` (SandboxFusion's ``/run_code``), built
from ``images/sandbox.Dockerfile`` with the project's ``sandbox`` package added last, so a code
change does not rebuild the image.

    modal deploy recipe/retool/modal_fusion_sandbox.py     # prints the URL
    modal run recipe/retool/test_sandbox_fusion.py::test_single_request --code 'print(2+2)'

## Isolation on Modal

Modal containers run under gVisor, where bubblewrap may not start. The service detects what
works at start and logs it in one line (``sandbox isolation: <mode> (secure|INSECURE ...)``, and
which stronger modes were not taken and why: docs/sandbox-security.md says how to read it); here
we explicitly opt in to the best mode available (``SANDBOX_ALLOW_INSECURE=1``): ``bwrap`` if gVisor
allows it, else ``unshare`` (the same sandbox built by the zygote itself), and the container
itself is the outer boundary.

## Access

The endpoint is public on the internet, so it always requires a bearer token: put
``SANDBOX_API_TOKEN=<random>`` in ``.env`` (``python -c 'import secrets;
print(secrets.token_urlsafe(32))'``) before ``modal deploy``. Only that one value is attached to
the container (no HF or wandb keys); the trainer's functions read the same ``.env`` and send it
with every tool call. Without a token the container refuses to start.
"""

from __future__ import annotations

import os
from pathlib import Path

import modal

from recipe.retool.paths import SANDBOX_APP_NAME as APP_NAME
from sandbox.client import TOKEN_ENV

REPO: Path = Path(__file__).resolve().parents[2]
MINUTES = 60
SLOTS_PER_CONTAINER = 16  # concurrent runs per container (2 per CPU below)
CPU = 8.0
MEMORY_MB = 16 * 1024  # 16 slots x 1 GiB default run memory

app = modal.App(APP_NAME)


def deploy_token() -> dict[str, str]:
    """``{SANDBOX_API_TOKEN: ...}`` from the deploying shell or ``.env``; empty in the container
    (there the attached secret sets the variable) or where none is configured."""
    from dotenv import dotenv_values

    token = os.environ.get(TOKEN_ENV) or dotenv_values(REPO / ".env").get(TOKEN_ENV) or ""
    return {TOKEN_ENV: token} if token else {}


image = modal.Image.from_dockerfile(
    REPO / "images" / "sandbox.Dockerfile", context_dir=REPO
).add_local_python_source("sandbox", "recipe")  # last: code changes do not rebuild the image


@app.function(
    image=image,
    cpu=CPU,
    memory=MEMORY_MB,
    # One warm container answers the first tool call of a rollout at once; idle ones stay 10
    # minutes, long enough to bridge the gap between RL steps.
    min_containers=1,
    scaledown_window=10 * MINUTES,
    max_containers=32,
    timeout=10 * MINUTES,
    secrets=[modal.Secret.from_dict(deploy_token())],  # its repr names the key, never the value
    env={
        "SANDBOX_ISOLATION": "auto",
        "SANDBOX_ALLOW_INSECURE": "1",
        "SANDBOX_SLOTS": str(SLOTS_PER_CONTAINER),
    },
)
# More inputs than slots: the surplus queues inside the container (bounded), which is cheaper than
# a new container for short bursts; Modal scales out when target_inputs is exceeded.
@modal.concurrent(max_inputs=4 * SLOTS_PER_CONTAINER, target_inputs=2 * SLOTS_PER_CONTAINER)
@modal.asgi_app()
def serve():
    import logging

    from sandbox.api import create_app
    from sandbox.environ import scrub_environ
    from sandbox.settings import Settings

    settings = Settings.from_env()
    scrub_environ(TOKEN_ENV)  # read: out of this process's /proc/<pid>/environ from here on
    if not settings.api_token:
        raise RuntimeError(f"no {TOKEN_ENV}: add it to .env, then modal deploy again")
    # INFO: the start-up log names the isolation mode the probe found under gVisor
    # ("sandbox isolation: unshare ..."; docs/sandbox-security.md), the proof a deploy gives.
    logging.basicConfig(level=logging.INFO)
    return create_app(settings)
