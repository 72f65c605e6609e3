"""# The sandbox as a Modal web endpoint

Serves the same FastAPI app as ``python -m sandbox serve`` (SandboxFusion's ``/run_code``), built
from ``images/sandbox.Dockerfile`` with the project's ``sandbox`` package added last, so a code
change does not rebuild the image (``modal_common.sandbox_image``).

    modal deploy recipe/retool/modal_fusion_sandbox.py     # prints the URL
    modal run recipe/retool/test_sandbox_fusion.py::test_single_request --code 'print(2+2)'

Modal runs this file alone, as ``/root/modal_fusion_sandbox.py``, with only the sandbox image's
packages: its top needs nothing but modal and the standard library (``modal_common.py``).

## Isolation on Modal

Modal containers run under gVisor, where bubblewrap may not start. The service detects at start
what works, strongest first (bubblewrap, then ``unshare``: the same sandbox built by the zygote
itself), and logs the mode it took in one line (``sandbox isolation: <mode> (secure ...)``, and
which stronger modes were not taken and why: docs/sandbox-security.md says how to read it).
Never ``none``: user code would run as root, with the network, beside the server that holds the
token. A mode that is not secure (bubblewrap in a user namespace, or ``unshare`` where bind
mounts cannot be made read-only) is taken only when deployed with ``SANDBOX_ALLOW_INSECURE=1``
(README, "On Modal", says what each gives up). Where no mode is left, the container still starts
(with ``min_containers=1`` a failing start would be retried forever) and answers every request
with one line saying why: ``SandboxError`` on ``/run_code``, which the clients retry and then
report (``check_sandbox_connection``, DAPO's start-up check).

## Access

The endpoint is public on the internet, so it always requires a bearer token: put
``SANDBOX_API_TOKEN=<random>`` in ``.env`` (``python -c 'import secrets;
print(secrets.token_urlsafe(32))'``) before ``modal deploy``. Only that one value is attached to
the container (no HF or wandb keys); the trainer's functions read the same ``.env`` and send it
with every tool call. Deployed without a token, the endpoint answers every request with the line
that says so.
"""

from __future__ import annotations

import modal

from recipe.retool import modal_common
from recipe.retool.core.paths import SANDBOX_APP_NAME as APP_NAME
from sandbox.environ import TOKEN_ENV

MINUTES = 60
SLOTS_PER_CONTAINER = 16  # concurrent runs per container (2 per CPU below)
CPU = 8.0
MEMORY_MB = 16 * 1024  # 16 slots x 1 GiB default run memory
INSECURE_ENV = "SANDBOX_ALLOW_INSECURE"  # the sandbox's own opt-in (sandbox/settings.py)

# Read at deploy (and again in the container, from the value the deploy sent): the opt-in to a
# mode that is not secure. `auto` itself never falls to `none`.
SETTINGS = modal_common.ImportSettings()
ALLOW_INSECURE = SETTINGS.flag(INSECURE_ENV)

app = modal.App(APP_NAME)
image = modal_common.sandbox_image()


def refusing_app(reason: str, token: str):
    """The app a container serves when it must not run code: every request is answered with
    ``reason`` (``/run_code``: a ``SandboxError``, as the service answers its own faults; the
    clients retry it, then show it); ``/v1/ping`` still answers. Behind the token if there is
    one."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from sandbox.api import PING_PATH
    from sandbox.asgi import RequireBearer
    from sandbox.schemas import RunCodeResponse, RunStatus

    async def refuse(request: Request) -> Response:
        body = RunCodeResponse(status=RunStatus.sandbox_error, message=reason)
        return Response(body.model_dump_json(), media_type="application/json")

    async def ping(request: Request) -> Response:
        return JSONResponse("pong")

    routes = [Route(PING_PATH, ping), Route("/{path:path}", refuse, methods=["GET", "POST"])]
    app = Starlette(routes=routes)
    if not token:
        return app
    return RequireBearer(app, token=token, open_paths={PING_PATH},
                         hint=f"Authorization: Bearer ${TOKEN_ENV}")  # fmt: skip


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
    # Only the token: its repr names the key, never the value.
    secrets=[modal.Secret.from_dict(modal_common.deploy_token())],
    env={
        **SETTINGS.env,
        "SANDBOX_ISOLATION": "auto",
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
    from sandbox.asgi import ServeOrRefuse
    from sandbox.environ import scrub_environ
    from sandbox.isolation import InsecureIsolation, IsolationUnavailable
    from sandbox.settings import Settings

    # INFO: the start-up log names the isolation mode that passed its self-test under gVisor
    # ("sandbox isolation bwrap: self-test passed ..."; docs/sandbox-security.md), the proof a
    # deploy gives.
    logging.basicConfig(level=logging.INFO)
    log = logging.getLogger("sandbox.modal")
    settings = Settings.from_env()
    scrub_environ(TOKEN_ENV)  # read: out of this process's /proc/<pid>/environ from here on
    if not settings.api_token:
        reason = f"the sandbox was deployed without {TOKEN_ENV}: add it to .env, then deploy again"
        log.error("%s", reason)
        return refusing_app(reason, "")

    def refuse(exc: BaseException):
        """No mode passed its probe and self-test (``create_app``'s start-up, sandbox/startup.py):
        serve that one line, never restart into the same failure."""
        reason = f"the deployed sandbox runs no code: {exc}"
        if isinstance(exc, InsecureIsolation):
            reason += (
                f" (here: {INSECURE_ENV}=1 modal deploy recipe/retool/modal_fusion_sandbox.py)"
            )
        log.error("%s", reason)
        return refusing_app(reason, settings.api_token)

    return ServeOrRefuse(create_app(settings), refuse, (IsolationUnavailable,))
