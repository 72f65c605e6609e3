"""The vLLM backend's process setup, with vLLM's modules stood in for (vLLM is GPU-only)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from recipe.retool.eval.backends import VLLMBackend


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """vLLM's import paths as stand-ins that record the environment the engine starts in."""
    started: list[dict] = []

    class AsyncLLM:
        @staticmethod
        def from_engine_args(args):
            started.append({"method": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")})
            return AsyncLLM()

    modules = {
        "vllm": types.SimpleNamespace(SamplingParams=object),
        "vllm.engine.arg_utils": types.SimpleNamespace(AsyncEngineArgs=lambda **kw: kw),
        "vllm.inputs": types.SimpleNamespace(TokensPrompt=dict),
        "vllm.v1.engine.async_llm": types.SimpleNamespace(AsyncLLM=AsyncLLM),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    return started


def test_engine_process_is_spawned_not_forked(fake_vllm: list[dict], tmp_path: Path):
    """A forked engine cannot use CUDA once the evaluating process has (H100: every evaluation
    failed with "Cannot re-initialize CUDA in forked subprocess")."""
    VLLMBackend(tmp_path, max_model_len=128)
    assert fake_vllm == [{"method": "spawn"}]


def test_an_explicit_start_method_is_kept(
    fake_vllm: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    VLLMBackend(tmp_path, max_model_len=128)
    assert fake_vllm == [{"method": "fork"}]
