# # Serving a ReTool checkpoint on Modal
#
# Two web endpoints in one app:
#
# - `vllm`: an OpenAI-compatible server (vLLM) for a trained checkpoint. vLLM's hermes tool
#   parser turns the model's `<tool_call>` blocks into OpenAI `tool_calls`, so any OpenAI client
#   can drive the model and run the code itself. vLLM listens on 127.0.0.1 only; the public port
#   is the project's app (`serving/chat_api.py`), which relays vLLM's routes behind the key
#   (vLLM's own key guards only `/v1`) and serves `POST /chat` there too.
# - `chat`: `POST /chat` runs the tool loop on the server side - every `code_interpreter` call
#   goes to the deployed sandbox, exactly as in training - and returns the final answer, the
#   `\boxed{}` answer and the whole trace.
#
# Deploy (the sandbox first; the chat endpoint calls it):
#
#     modal deploy recipe/retool/modal_fusion_sandbox.py
#     modal deploy recipe/retool/serve.py
#
# Which checkpoint is chosen when a vLLM container starts, from `RETOOL_SERVE_CHECKPOINT` at
# deploy time: `latest` (default: the latest complete DAPO checkpoint, else the latest SFT one),
# `base`, an experiment (`my-exp`, `sft/my-exp`, `dapo/my-exp`) or a directory on the
# checkpoints volume (`dapo-experiments/my-exp/global_step_200`):
#
#     RETOOL_SERVE_CHECKPOINT=sft/my-exp modal deploy recipe/retool/serve.py
#
# Deploy with `RETOOL_SERVE_API_KEY=<key>`: both endpoints then require `Authorization: Bearer
# <key>` on every route but `/health`. Without a key the containers refuse to start, unless
# deployed with
# `RETOOL_SERVE_ALLOW_OPEN=1`. Client examples: `docs/serving.md`.

from __future__ import annotations

import os
import subprocess
import threading

import modal

from recipe.retool import modal_common
from recipe.retool.core import paths
from recipe.retool.serving import vllm_server
from recipe.retool.serving.vllm_server import (
    LOOPBACK,
    PUBLIC_PORT,
    SERVED_MODEL_NAME,
    VLLM_PORT,
)
from recipe.retool.serving.vllm_server import SERVE_API_KEY_ENV as API_KEY_ENV

APP_NAME = "retool-serve"
# Read at deploy, and again in each container from the values the deploy sent (env= below).
SETTINGS = modal_common.ImportSettings()
GPU_TYPE = SETTINGS.text("RETOOL_SERVE_GPU", "H100")
CHECKPOINT = SETTINGS.text("RETOOL_SERVE_CHECKPOINT", "latest")
# Qwen2.5-7B's context; the ReTool evaluation budget (16k response tokens) fits with the prompt.
MAX_MODEL_LEN = SETTINGS.count("RETOOL_SERVE_MAX_MODEL_LEN", 32768)
# Serving without a key needs this set to 1 at deploy: /chat runs model-written code and vLLM is a
# paid GPU, so an open endpoint is a choice, never a default.
ALLOW_OPEN_ENV = "RETOOL_SERVE_ALLOW_OPEN"
ALLOW_OPEN = SETTINGS.flag(ALLOW_OPEN_ENV)
MINUTES = 60
STARTUP_S = 20 * MINUTES  # weights from the volume and CUDA graphs, then the app in front

app = modal.App(APP_NAME)

# ## Image
#
# The trainer image (CUDA, vLLM, verl), built from the Dockerfile docker compose uses, with the
# project's code added last, as in the training app: a code edit never rebuilds CUDA layers.


image = modal_common.trainer_image()

# ## Volumes and the API key
#
# Serving only reads: the checkpoints volume (and the models volume, for `base` and for a
# checkpoint saved without its tokenizer) are mounted read-only, so a serving container can
# never damage a training run's files. The key, when given, travels as a Modal secret, never in
# the function's environment or in logs.

checkpoints_volume = modal.Volume.from_name(paths.CHECKPOINTS_VOLUME, create_if_missing=True)
models_volume = modal.Volume.from_name(paths.MODELS_VOLUME, create_if_missing=True)
VOLUMES = {
    str(paths.CHECKPOINTS_MOUNT): checkpoints_volume.read_only(),
    str(paths.MODELS_MOUNT): models_volume.read_only(),
}
_api_key = os.environ.get(API_KEY_ENV, "")
secrets = [modal.Secret.from_dict({API_KEY_ENV: _api_key})] if _api_key else []
# /chat runs code in the deployed sandbox, which needs its bearer token (modal_fusion_sandbox.py).
sandbox_secrets = [modal.Secret.from_dict(t)] if (t := modal_common.deploy_token()) else []


def require_key() -> str | None:
    """The serving key, or None where the deployer opted out; a clear error otherwise."""
    key = os.environ.get(API_KEY_ENV) or None
    if key is None and not ALLOW_OPEN:
        raise RuntimeError(
            f"no {API_KEY_ENV}: deploy with {API_KEY_ENV}=<key> (or {ALLOW_OPEN_ENV}=1 to serve "
            "without one)"
        )
    return key


# ## The OpenAI-compatible endpoint
#
# One H100 holds the 7B model in bf16 with room for a large KV cache; vLLM batches the concurrent
# requests Modal lets into one container. The container resolves the checkpoint when it starts,
# so `latest` means the latest at that moment. Startup (weights from the volume, CUDA graphs)
# takes a few minutes; the first request after an idle period waits for it: the public app
# starts only once vLLM serves, so Modal routes no request to a container still loading.


@app.function(
    image=image,
    gpu=GPU_TYPE,
    volumes=VOLUMES,
    secrets=secrets + sandbox_secrets,
    env=SETTINGS.env,
    timeout=30 * MINUTES,  # per request: a 16k-token answer, with room
    scaledown_window=15 * MINUTES,
)
@modal.concurrent(max_inputs=64)
@modal.web_server(port=PUBLIC_PORT, startup_timeout=STARTUP_S)
def vllm() -> None:
    layout = paths.Layout.from_env()
    model_dir = paths.resolve_model_dir(layout, CHECKPOINT)
    print(f"serving {model_dir} as {SERVED_MODEL_NAME!r}", flush=True)
    key = require_key()
    # The key goes in vLLM's environment, never its arguments (vllm_server.API_KEY_ENV).
    env = {**os.environ, vllm_server.API_KEY_ENV: key} if key else dict(os.environ)
    command = vllm_server.vllm_command(
        model_dir, fallback_tokenizer=layout.model_dir(), max_model_len=MAX_MODEL_LEN
    )
    server = subprocess.Popen(command, env=env)
    front = {
        "sandbox_url": modal_common.sandbox_url(),
        "timeout_s": STARTUP_S,
        "alive": lambda: server.poll() is None,
    }
    upstream = f"http://{LOOPBACK}:{VLLM_PORT}"
    threading.Thread(
        target=vllm_server.front_when_serving, args=(upstream,), kwargs=front, daemon=True
    ).start()


# ## The chat endpoint
#
# A CPU container: it only relays. `chat_with_tools` (`recipe/retool/serving/tool_chat.py`) asks
# the vLLM endpoint for a turn, runs each tool call in the deployed sandbox (the one DAPO used),
# and repeats; `recipe/retool/serving/chat_api.py` is the FastAPI app around it. Requests running
# past Modal's 150 s web limit are answered with a 303 to a result URL: follow redirects
# (`curl -L`).


@app.function(
    image=image,
    secrets=secrets + sandbox_secrets,
    env=SETTINGS.env,
    cpu=2.0,
    timeout=60 * MINUTES,
)
@modal.concurrent(max_inputs=32)
@modal.asgi_app()
def chat():
    from recipe.retool.serving.chat_api import create_app
    from recipe.retool.serving.tool_chat import OpenAIChatBackend
    from sandbox.client import SandboxClient

    api_key = require_key()
    sandbox = SandboxClient(modal_common.sandbox_url(), timeout_s=90.0)

    def backend() -> OpenAIChatBackend:
        # Looked up on the first request: the URL exists once the app is deployed.
        return OpenAIChatBackend(vllm.get_web_url(), SERVED_MODEL_NAME, api_key=api_key)

    return create_app(backend, sandbox, api_key=api_key)
