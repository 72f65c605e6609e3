"""The Modal deployment's settings, checked offline (importing a Modal app needs no token), and the
app its container serves: the sandbox's own, or, where it must not run code, one that answers
every request with the line that says why. ``tests/modal`` runs the same file as Modal does."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("modal")  # dev-only: absent on a GPU box with the trainer image's set

from recipe.retool import modal_common
from recipe.retool import modal_fusion_sandbox as m
from sandbox import isolation
from sandbox.isolation import Isolation, IsolationUnavailable, detect
from sandbox.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MODULE = "recipe.retool.modal_fusion_sandbox"


def load(monkeypatch: pytest.MonkeyPatch, **env: str):
    monkeypatch.delenv("SANDBOX_ALLOW_INSECURE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sys.modules.pop(MODULE, None)
    try:
        return importlib.import_module(MODULE)
    finally:
        sys.modules.pop(MODULE, None)


def test_app_and_function_names() -> None:
    assert m.app.name == m.APP_NAME == "retool-sandbox"
    assert m.serve.info().web_info is not None  # an ASGI web endpoint


def test_function_settings() -> None:
    info = m.serve.info()
    assert info.timeout == 10 * 60
    assert not info.gpus
    assert info.concurrency_info.max_inputs >= m.SLOTS_PER_CONTAINER
    assert info.memory_mib >= m.SLOTS_PER_CONTAINER * 1024  # default 1 GiB per run fits
    # the deploy's settings and the endpoint's own access token; no HF or wandb key
    assert any("SANDBOX_ISOLATION" in secret for secret in info.secrets)
    assert not any("HF_TOKEN" in secret or "WANDB" in secret for secret in info.secrets)


def test_a_weaker_isolation_is_an_explicit_opt_in_at_deploy(monkeypatch) -> None:
    """Deployed plainly, the container allows no mode that is not secure; with the sandbox's own
    opt-in in the deploying shell, the container gets it (and reads the same at its import)."""
    from modal._utils.async_utils import synchronizer
    from modal.secret import _local_secret_env

    def container_env(module) -> dict[str, str]:
        return _local_secret_env(synchronizer._translate_in(module.serve)._spec.secrets)

    plain = container_env(load(monkeypatch))
    assert (plain["SANDBOX_ALLOW_INSECURE"], plain["SANDBOX_ISOLATION"]) == ("0", "auto")
    opted = load(monkeypatch, SANDBOX_ALLOW_INSECURE="1")
    assert opted.ALLOW_INSECURE and container_env(opted)["SANDBOX_ALLOW_INSECURE"] == "1"


def test_the_deployed_endpoint_takes_only_its_token(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SANDBOX_API_TOKEN", "deploy-token-1")
    monkeypatch.setenv("HF_TOKEN", "hf-not-for-the-sandbox")
    assert modal_common.deploy_token() == {"SANDBOX_API_TOKEN": "deploy-token-1"}
    monkeypatch.delenv("SANDBOX_API_TOKEN")
    dotenv = tmp_path / ".env"
    monkeypatch.setattr(modal_common, "DOTENV", dotenv)
    assert modal_common.deploy_token() == {}  # no .env either
    dotenv.write_text("HF_TOKEN=x\nexport SANDBOX_API_TOKEN='from-dotenv'\n")
    assert modal_common.deploy_token() == {"SANDBOX_API_TOKEN": "from-dotenv"}


def test_the_sandbox_module_imports_neither_dotenv_nor_httpx_at_its_top() -> None:
    """Its top runs where `pip install modal` is all there is, and in the sandbox image, which has
    no python-dotenv (defects 2 and 8 of issue 32; tests/modal runs it there)."""
    import ast

    for path in ("recipe/retool/modal_fusion_sandbox.py", "recipe/retool/modal_common.py"):
        tree = ast.parse((REPO / path).read_text())
        top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        assert not {"dotenv", "httpx", "yaml", "sandbox.client"} & top, (path, top)


async def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as client:
        return await client.request(method, path, **kwargs)


async def test_without_a_token_the_container_answers_why_instead_of_crash_looping(
    monkeypatch,
) -> None:
    """With min_containers=1 a container that raised at start would be restarted forever."""
    monkeypatch.delenv("SANDBOX_API_TOKEN", raising=False)
    app = m.serve.local()
    assert (await call(app, "GET", "/v1/ping")).json() == "pong"
    answer = (await call(app, "POST", "/run_code", json={"code": "print(1)"})).json()
    assert answer["status"] == "SandboxError" and answer["run_result"] is None
    assert answer["message"].startswith("the sandbox was deployed without SANDBOX_API_TOKEN")


def test_auto_never_falls_to_none(monkeypatch) -> None:
    """Where only `none` would start, `auto` refuses even when weaker modes are allowed (the
    deployed sandbox allowed them and got user code running as root beside its token); `none`
    stays available when asked for by name."""
    monkeypatch.setattr(isolation.shutil, "which", lambda name: "/usr/bin/" + name)
    tried = []

    def only_none(iso: Isolation, settings: Settings) -> dict:
        tried.append(iso.mode)
        return {} if iso.mode == "none" else {"probe_error": "refused"}

    monkeypatch.setattr(isolation, "run_probe", only_none)
    with pytest.raises(IsolationUnavailable, match="no isolation mode works here"):
        detect(Settings(isolation="auto", allow_insecure=True))
    assert "none" not in tried
    assert detect(Settings(isolation="none", allow_insecure=True)).mode == "none"


def test_dockerfile_and_extra_exist() -> None:
    import tomllib

    dockerfile = (REPO / "images" / "sandbox.Dockerfile").read_text()
    assert "bubblewrap" in dockerfile and "HEALTHCHECK" in dockerfile
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["sandbox"]
    assert all("==" in req for req in extra)
    assert {r.split("==")[0] for r in extra} >= {"fastapi", "uvicorn", "numpy", "sympy"}


def test_entrypoint_importable() -> None:
    from recipe.retool import test_sandbox_fusion

    assert test_sandbox_fusion.app.name.startswith(m.APP_NAME)
    # the request runs from a container of the sandbox's own image, with the deploy's token
    (secret,) = test_sandbox_fusion.run_snippet.info().secrets
    assert secret in ("Secret.from_dict([SANDBOX_API_TOKEN])", "Secret.from_dict([])")


def test_trainer_finds_the_sandbox_by_the_names_it_is_deployed_under() -> None:
    import modal

    from recipe.retool.core import paths

    assert m.app.name == paths.SANDBOX_APP_NAME
    assert isinstance(getattr(m, paths.SANDBOX_FUNCTION_NAME), modal.Function)


def test_a_mode_failing_its_self_test_is_served_as_one_line_not_a_failed_start(
    monkeypatch, caplog
) -> None:
    """The deployed app's start picks its mode in the lifespan (probe, then self-test). Where
    every mode fails there, the container must keep answering with that one line: a failed ASGI
    start-up makes Modal restart the container into the same failure (min_containers=1), and the
    trainer would see only timeouts. Here bwrap probes fine and its self-test is made to fail."""
    from starlette.testclient import TestClient

    from sandbox import startup
    from sandbox.selftest import SelfTestFailed

    async def mount_leaks(*args, **kwargs):
        raise SelfTestFailed("mount", "a marker written in /tmp is visible to the server")

    monkeypatch.setattr(startup, "self_test", mount_leaks)
    app = load(monkeypatch, SANDBOX_API_TOKEN="tok", SANDBOX_ISOLATION="bwrap").serve.local()
    auth = {"Authorization": "Bearer tok"}
    with TestClient(app) as client:  # runs the lifespan: start-up completes
        answer = client.post("/run_code", json={"code": "print(2+2)", "language": "python"},
                             headers=auth).json()  # fmt: skip
        assert client.get("/v1/ping").json() == "pong"
        assert client.post("/run_code", json={}).status_code == 401  # still behind the token
    assert answer["status"] == "SandboxError"
    assert answer["message"] == (
        "the deployed sandbox runs no code: no isolation mode works here (bwrap: self-test "
        "failed: mount: a marker written in /tmp is visible to the server)"
    )
    assert answer["message"] in caplog.text  # the container's log says it once, at start


def test_the_deployed_app_serves_code_where_a_mode_passes_its_self_test(monkeypatch) -> None:
    """The same start where bwrap works: the lifespan's pool runs the code."""
    from starlette.testclient import TestClient

    app = load(monkeypatch, SANDBOX_API_TOKEN="tok", SANDBOX_ISOLATION="bwrap",
               SANDBOX_SLOTS="2").serve.local()  # fmt: skip
    with TestClient(app) as client:
        answer = client.post("/run_code", json={"code": "print(2+2)", "language": "python"},
                             headers={"Authorization": "Bearer tok"}).json()  # fmt: skip
        mode = client.get("/v1/isolation", headers={"Authorization": "Bearer tok"}).json()
    assert (answer["status"], answer["run_result"]["stdout"]) == ("Success", "4\n")
    assert mode["mode"] == "bwrap" and mode["selftest"]
