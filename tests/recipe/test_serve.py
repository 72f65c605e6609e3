"""The serving app offline: function settings via Function.info(), the vLLM command, the chat app
built by the Modal function, and which checkpoint a spec resolves to on a temp layout."""

from __future__ import annotations

import importlib
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

pytest.importorskip("modal")  # dev-only: absent on a GPU box with the trainer image's set

import modal
from modal_proto import api_pb2

from recipe.retool.core import paths
from recipe.retool.core.paths import CheckpointNotFound, Layout, resolve_model_dir
from tests.recipe.test_paths import make_step, mark_tracked, write_weights

REPO = Path(__file__).resolve().parents[2]
MODULE = "recipe.retool.serve"


def load_serve(monkeypatch: pytest.MonkeyPatch, **env: str):
    for key in ("RETOOL_SERVE_CHECKPOINT", "RETOOL_SERVE_GPU", "RETOOL_SERVE_API_KEY",
                "RETOOL_SERVE_MAX_MODEL_LEN", "RETOOL_SERVE_ALLOW_OPEN"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sys.modules.pop(MODULE, None)
    return importlib.import_module(MODULE)


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch):
    yield load_serve(monkeypatch)
    sys.modules.pop(MODULE, None)


def webhook(fn: modal.Function):
    """The web endpoint config Modal will deploy (a private attribute; FunctionInfo omits it)."""
    from modal._utils.async_utils import synchronizer

    return synchronizer._translate_in(fn)._webhook_config


# --- the Modal functions -------------------------------------------------------------------------


def test_app_imports_without_a_token_and_has_two_web_endpoints(serve) -> None:
    assert serve.app.name == "retool-serve"
    for fn in (serve.vllm, serve.chat):
        assert isinstance(fn, modal.Function)
        assert fn.info().web_info is not None


def test_vllm_endpoint_one_h100_read_only_volumes_the_app_public_on_8000(serve) -> None:
    info = serve.vllm.info()
    assert info.gpus == [("H100", 1)]
    assert {path: (v.name, v.read_only) for path, v in info.volumes.items()} == {
        "/checkpoints": (paths.CHECKPOINTS_VOLUME, True),
        "/models": (paths.MODELS_VOLUME, True),
    }
    assert info.concurrency_info.max_inputs == 64
    assert info.timeout == 30 * 60
    config = webhook(serve.vllm)
    assert config.type == api_pb2.WEBHOOK_TYPE_WEB_SERVER
    assert config.web_server_port == 8000 == serve.PUBLIC_PORT != serve.VLLM_PORT
    assert config.web_server_startup_timeout == 20 * 60


def test_chat_endpoint_is_a_cpu_asgi_app_without_volumes(serve) -> None:
    info = serve.chat.info()
    assert info.gpus == [] and info.volumes == {}
    assert info.concurrency_info.max_inputs == 32
    assert webhook(serve.chat).type == api_pb2.WEBHOOK_TYPE_ASGI_APP
    # no key configured: only the deploy's settings, the opt-out flag "0" among them (the
    # container then refuses)
    assert info.secrets == [SETTINGS_KEYS]
    assert container_env(serve.chat)["RETOOL_SERVE_ALLOW_OPEN"] == "0"


SETTINGS_KEYS = ("Secret.from_dict([RETOOL_SERVE_GPU, RETOOL_SERVE_CHECKPOINT, "
                 "RETOOL_SERVE_MAX_MODEL_LEN, RETOOL_SERVE_ALLOW_OPEN])")  # fmt: skip


def container_env(fn: modal.Function) -> dict[str, str]:
    """What the function's own secrets (``Secret.from_dict``, ``env=``) put in its container."""
    from modal._utils.async_utils import synchronizer
    from modal.secret import _local_secret_env

    return _local_secret_env(synchronizer._translate_in(fn)._spec.secrets)


def test_every_setting_read_at_deploy_reaches_the_containers(monkeypatch) -> None:
    """serve.py is imported again in each container: RETOOL_SERVE_MAX_MODEL_LEN, documented in
    docs/serving.md, took 32768 there whatever the deploy said (issue 32, defect 7)."""
    module = load_serve(monkeypatch, RETOOL_SERVE_MAX_MODEL_LEN="16384", RETOOL_SERVE_GPU="H200",
                        RETOOL_SERVE_CHECKPOINT="sft/x")  # fmt: skip
    try:
        wanted = {"RETOOL_SERVE_MAX_MODEL_LEN": "16384", "RETOOL_SERVE_GPU": "H200",
                  "RETOOL_SERVE_CHECKPOINT": "sft/x", "RETOOL_SERVE_ALLOW_OPEN": "0"}  # fmt: skip
        for fn in (module.vllm, module.chat):
            assert container_env(fn).items() >= wanted.items()
        assert module.MAX_MODEL_LEN == 16384
    finally:
        sys.modules.pop(MODULE, None)


def test_chat_sends_the_sandbox_token_when_one_is_configured(monkeypatch) -> None:
    module = load_serve(monkeypatch, SANDBOX_API_TOKEN="t-123")
    assert "Secret.from_dict([SANDBOX_API_TOKEN])" in module.chat.info().secrets


def test_knobs_gpu_checkpoint_and_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_serve(monkeypatch, RETOOL_SERVE_GPU="H200", RETOOL_SERVE_CHECKPOINT="sft/exp",
                        RETOOL_SERVE_API_KEY="sekrit")  # fmt: skip
    try:
        assert module.vllm.info().gpus == [("H200", 1)]
        assert module.CHECKPOINT == "sft/exp"
        for fn in (module.vllm, module.chat):  # the key travels as a secret, by name only
            assert "Secret.from_dict([RETOOL_SERVE_API_KEY])" in fn.info().secrets
            assert not any("sekrit" in s for s in fn.info().secrets)
    finally:
        sys.modules.pop(MODULE, None)


def test_a_bad_context_length_is_one_line_at_import(monkeypatch, capsys) -> None:
    try:
        with pytest.raises(SystemExit) as exc:
            load_serve(monkeypatch, RETOOL_SERVE_MAX_MODEL_LEN="32k")
    finally:
        sys.modules.pop(MODULE, None)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: RETOOL_SERVE_MAX_MODEL_LEN='32k' is not a whole number >= 1")
    assert err.count("\n") == 1


def test_image_is_the_trainer_dockerfile(monkeypatch, dockerfile_builds) -> None:
    load_serve(monkeypatch)
    sys.modules.pop(MODULE, None)
    assert dockerfile_builds == [(REPO / "images" / "trainer.Dockerfile", REPO)]


# --- what the containers do ----------------------------------------------------------------------


def test_vllm_command_has_the_tool_parser_and_falls_back_to_the_base_tokenizer(serve, tmp_path):
    layout = Layout.local(tmp_path)
    model = tmp_path / "ckpt"
    model.mkdir()
    command = serve.vllm_server.vllm_command(
        model, fallback_tokenizer=layout.model_dir(), max_model_len=serve.MAX_MODEL_LEN
    )
    assert command[:5] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model)]
    joined = " ".join(command)
    for flag in ("--served-model-name retool", "--enable-auto-tool-choice",
                 "--tool-call-parser hermes", "--port 8001", "--host 127.0.0.1"):  # fmt: skip
        assert flag in joined
    assert command[-2:] == ["--tokenizer", str(layout.model_dir())]
    (model / "tokenizer_config.json").write_text("{}")
    assert "--tokenizer" not in serve.vllm_server.vllm_command(
        model, fallback_tokenizer=layout.model_dir(), max_model_len=serve.MAX_MODEL_LEN
    )


def test_vllm_container_resolves_the_checkpoint_at_start(serve, tmp_path, monkeypatch) -> None:
    layout = Layout.local(tmp_path)
    step = make_step(layout, "dapo", "rl", 40)
    mark_tracked(layout, "dapo", "rl", 40)
    started, fronted = [], threading.Event()
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: started.append((cmd, kw["env"])))

    def front(upstream, **kw):
        fronted.set()
        started.append((upstream, kw))

    monkeypatch.setattr(serve.vllm_server, "front_when_serving", front)
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    monkeypatch.setenv("RETOOL_SERVE_CHECKPOINT", "latest")
    monkeypatch.setenv("RETOOL_SERVE_API_KEY", "sekrit")
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://sandbox.test/run_code")
    serve.vllm.local()
    assert fronted.wait(10)
    (command, env), (upstream, front) = started
    assert command[4] == str(step / "actor" / "huggingface")
    # the key reaches vLLM in its environment, never on its command line (visible in `ps`)
    assert env["VLLM_API_KEY"] == "sekrit" and "sekrit" not in " ".join(command)
    # vLLM on loopback; the app in front of it, with the sandbox for /chat
    assert upstream == "http://127.0.0.1:8001" and "--host 127.0.0.1 --port 8001" in " ".join(
        command
    )
    assert front["sandbox_url"] == "http://sandbox.test/run_code"


def test_serving_refuses_to_start_without_a_key_unless_opted_out(serve, tmp_path, monkeypatch):
    """The opt-out is read at deploy, and again in the container from the value the deploy sent
    (the function's env)."""
    make_step(Layout.local(tmp_path), "dapo", "rl", 40)
    mark_tracked(Layout.local(tmp_path), "dapo", "rl", 40)
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: started.append(kw["env"]))
    monkeypatch.setattr(serve.vllm_server, "front_when_serving", lambda *a, **kw: None)
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://sandbox.test")
    for endpoint in (serve.vllm, serve.chat):
        with pytest.raises(RuntimeError, match="no RETOOL_SERVE_API_KEY"):
            endpoint.local()
    opened = load_serve(monkeypatch, RETOOL_SERVE_ALLOW_OPEN="1")
    monkeypatch.setattr(opened.vllm_server, "front_when_serving", lambda *a, **kw: None)
    try:
        opened.vllm.local()
    finally:
        sys.modules.pop(MODULE, None)
    assert "VLLM_API_KEY" not in started[0]


async def test_chat_container_builds_the_app_with_the_sandbox(serve, monkeypatch) -> None:
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://sandbox.test")
    monkeypatch.setenv("RETOOL_SERVE_API_KEY", "sekrit")
    api = serve.chat.local()
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://chat") as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        resp = await http.post("/chat", json={"messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 401  # the key set at deploy time guards the chat endpoint


# --- which checkpoint a spec means ---------------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout.local(tmp_path)


def complete(layout: Layout, stage: str, exp: str, step: int) -> Path:
    step_dir = make_step(layout, stage, exp, step)
    mark_tracked(layout, stage, exp, step)
    return step_dir


def test_latest_prefers_dapo_then_sft(layout: Layout) -> None:
    sft = complete(layout, "sft", "cold", 62)
    assert resolve_model_dir(layout, "latest") == sft / "huggingface"
    assert resolve_model_dir(layout, None) == sft / "huggingface"
    dapo = complete(layout, "dapo", "rl", 10)
    assert resolve_model_dir(layout, "latest") == dapo / "actor" / "huggingface"


def test_partial_saves_are_never_served(layout: Layout) -> None:
    sft = complete(layout, "sft", "cold", 62)
    make_step(layout, "dapo", "rl", 10)  # no tracker: interrupted save
    assert resolve_model_dir(layout, "latest") == sft / "huggingface"


def test_experiment_name_with_or_without_stage(layout: Layout) -> None:
    complete(layout, "sft", "a", 5)
    sft_b = complete(layout, "sft", "b", 7)
    assert resolve_model_dir(layout, "b") == sft_b / "huggingface"
    assert resolve_model_dir(layout, "sft/b") == sft_b / "huggingface"
    dapo_b = complete(layout, "dapo", "b", 3)
    with pytest.raises(CheckpointNotFound, match="both stages: say sft/b or dapo/b"):
        resolve_model_dir(layout, "b")
    assert resolve_model_dir(layout, "dapo/b") == dapo_b / "actor" / "huggingface"


def test_paths_absolute_relative_step_or_hf_dir(layout: Layout) -> None:
    step = complete(layout, "sft", "cold", 62)
    hf = step / "huggingface"
    assert resolve_model_dir(layout, str(step)) == hf
    assert resolve_model_dir(layout, str(hf)) == hf
    assert resolve_model_dir(layout, "sft-experiments/cold/global_step_62") == hf


def test_a_directory_without_weights_says_merge_first(layout: Layout) -> None:
    step = make_step(layout, "dapo", "rl", 10, weights=False)
    with pytest.raises(CheckpointNotFound, match="merge the checkpoint first"):
        resolve_model_dir(layout, str(step))


def test_base_model(layout: Layout) -> None:
    with pytest.raises(CheckpointNotFound, match="run download_model first"):
        resolve_model_dir(layout, "base")
    base = layout.model_dir()
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    write_weights(base)
    assert resolve_model_dir(layout, "base") == base


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("latest", "no complete DAPO or SFT checkpoint"),
        ("nope", "neither `latest`, `base`, a checkpoint directory nor an experiment"),
        ("sft/nope", "no complete sft checkpoint"),
        ("/does/not/exist", "no checkpoint directory at /does/not/exist"),
        ("x/y/z", "no checkpoint directory"),
        ("..hidden", "no checkpoint directory"),
    ],
)
def test_nothing_found_is_a_clear_error(layout: Layout, spec: str, message: str) -> None:
    with pytest.raises(CheckpointNotFound, match=message):
        resolve_model_dir(layout, spec)
