"""Shared fixtures: the offline tiny Qwen2 model, built once and cached across test runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = Path(os.environ.get("RETOOL_TEST_CACHE", REPO_ROOT / ".cache" / "models"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Directory of the tiny random-init Qwen2 model + Qwen2.5-format tokenizer."""
    from recipe.retool.local.tiny_model import ensure_tiny_model

    return ensure_tiny_model(CACHE_ROOT)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
