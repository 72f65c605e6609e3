"""Shared fixtures: the offline tiny Qwen2 model, built once and cached across test runs; and the
``gpu`` marker's skip hook."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = Path(os.environ.get("RETOOL_TEST_CACHE", REPO_ROOT / ".cache" / "models"))


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as a machine without a wandb account should: ``WANDB_MODE=offline``, and no
    ``.env`` read by a launch check (tests/recipe/test_tracking.py takes these away to test the
    check itself)."""
    from recipe.retool.records import tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(tracking, "DOTENV", REPO_ROOT / ".cache" / "no-such.env")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Directory of the tiny random-init Qwen2 model + Qwen2.5-format tokenizer."""
    from recipe.retool.data.tiny_model import ensure_tiny_model

    return ensure_tiny_model(CACHE_ROOT)


@pytest.fixture(scope="session")
def vllm_model_dir() -> Path:
    """For ``gpu`` tests: the learning curve's small random-init Qwen2 (head size 64, one that
    vLLM's flash-attention kernels take; the tiny model's is 16), cached like the tiny one."""
    from recipe.retool.data.tiny_model import ensure_tiny_model
    from recipe.retool.workflows.learning_curve.settings import MODEL_SPEC

    return ensure_tiny_model(CACHE_ROOT, MODEL_SPEC)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def gpu_tests_cannot_run() -> str | None:
    """Why ``gpu`` tests cannot run here (no vLLM, no CUDA device), or ``None`` when they can."""
    if importlib.util.find_spec("vllm") is None:
        return "needs vLLM (the trainer image or a GPU box set up with it)"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA device"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests run where a CUDA device and vLLM are (a lent GPU machine) and are skipped,
    with the reason, everywhere else."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    reason = gpu_tests_cannot_run() if gpu_items else None
    for item in gpu_items if reason else ():
        item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))
