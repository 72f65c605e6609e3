"""The Modal deployment's settings, checked offline (importing a Modal app needs no token)."""

from __future__ import annotations

from pathlib import Path

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
    # the only "secret" is the env dict (explicit opt-in to the best isolation Modal allows);
    # no token of ours reaches the container, so user code has nothing to steal
    assert len(info.secrets) == 1 and "SANDBOX_ALLOW_INSECURE" in info.secrets[0]
    assert "HF_TOKEN" not in info.secrets[0] and "WANDB" not in info.secrets[0]


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
