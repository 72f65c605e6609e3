"""The ``gpu`` marker's skip hook (tests/conftest.py), checked on any machine."""

from __future__ import annotations

import importlib.util

import pytest

from tests import conftest


class Item:
    """What the hook reads of a collected test: its ``gpu`` marker; what it adds."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu
        self.added: list[pytest.MarkDecorator] = []

    def get_closest_marker(self, name: str):
        return pytest.mark.gpu.mark if name == "gpu" and self.gpu else None

    def add_marker(self, marker: pytest.MarkDecorator) -> None:
        self.added.append(marker)


def test_gpu_tests_are_skipped_with_the_reason_where_they_cannot_run(monkeypatch) -> None:
    monkeypatch.setattr(conftest, "gpu_tests_cannot_run", lambda: "needs a CUDA device")
    gpu, cpu = Item(gpu=True), Item(gpu=False)
    conftest.pytest_collection_modifyitems(None, [gpu, cpu])
    assert [(m.name, m.kwargs) for m in gpu.added] == [
        ("skip", {"reason": "gpu test: needs a CUDA device"})
    ]
    assert cpu.added == []


def test_gpu_tests_run_where_cuda_and_vllm_are(monkeypatch) -> None:
    monkeypatch.setattr(conftest, "gpu_tests_cannot_run", lambda: None)
    gpu = Item(gpu=True)
    conftest.pytest_collection_modifyitems(None, [gpu])
    assert gpu.added == []


def test_without_vllm_the_reason_names_it(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "needs vLLM" in conftest.gpu_tests_cannot_run()
