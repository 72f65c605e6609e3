"""The benchmark shapes' parameter counts match the published model sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "qwen_shapes.py"
spec = importlib.util.spec_from_file_location("qwen_shapes", SCRIPT)
shapes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shapes)


@pytest.mark.parametrize(("name", "billions"), [("qwen2.5-7b", 7.62), ("qwen2.5-1.5b", 1.54)])
def test_param_count_is_the_model_cards(name: str, billions: float) -> None:
    assert round(shapes.param_count(shapes.SHAPES[name]) / 1e9, 2) == billions


def test_param_count_equals_a_built_models(tmp_path: Path) -> None:
    from recipe.retool.data.tiny_model import build

    model = build(tmp_path / "m")
    from safetensors.torch import load_file

    built = sum(t.numel() for f in model.glob("*.safetensors") for t in load_file(f).values())
    assert shapes.model_params(model) == built
    assert json.loads((model / "config.json").read_text())["tie_word_embeddings"] is False
