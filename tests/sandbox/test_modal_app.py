"""The Modal deployment's settings, checked offline (importing a Modal app needs no token)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("modal")  # dev-only: absent on a GPU box with the trainer image's set

from recipe.retool import modal_fusion_sandbox as m

REPO = Path(__file__).resolve().parents[2]


def test_app_and_function_names() -> None:
    assert m.app.name == m.APP_NAME == "retool-sandbox"
    assert m.serve.info().web_info is not None  # an ASGI web endpoint


def test_function_settings() -> None:
    info = m.serve.info()
    assert info.timeout == 10 * 60
    assert not info.gpus
    assert info.concurrency_info.max_inputs >= m.SLOTS_PER_CONTAINER
    assert info.memory_mib >= m.SLOTS_PER_CONTAINER * 1024  # default 1 GiB per run fits
    # the env dict (explicit opt-in to the best isolation Modal allows) and the endpoint's own
    # access token; no HF or wandb key reaches the container
    assert any("SANDBOX_ALLOW_INSECURE" in secret for secret in info.secrets)
    assert not any("HF_TOKEN" in secret or "WANDB" in secret for secret in info.secrets)


def test_deployed_endpoint_takes_only_its_token_and_refuses_to_start_without(monkeypatch) -> None:
    monkeypatch.setenv("SANDBOX_API_TOKEN", "deploy-token-1")
    monkeypatch.setenv("HF_TOKEN", "hf-not-for-the-sandbox")
    assert m.deploy_token() == {"SANDBOX_API_TOKEN": "deploy-token-1"}
    monkeypatch.delenv("SANDBOX_API_TOKEN")
    monkeypatch.setattr(m, "REPO", Path("/nonexistent"))  # no .env there either
    assert m.deploy_token() == {}
    with pytest.raises(RuntimeError, match="no SANDBOX_API_TOKEN"):
        m.serve.local()


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


def test_trainer_finds_the_sandbox_by_the_names_it_is_deployed_under() -> None:
    import modal

    from recipe.retool import modal_fusion_sandbox as m
    from recipe.retool import paths

    assert m.app.name == paths.SANDBOX_APP_NAME
    assert isinstance(getattr(m, paths.SANDBOX_FUNCTION_NAME), modal.Function)
