"""Qwen2.5 architectures the GPU benchmarks build random-init models of (no weights are needed:
speed and memory do not depend on the values).

Fields are the architecture keys of each model's ``config.json`` on the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

QWEN25_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
QWEN25_1_5B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
SHAPES = {"qwen2.5-7b": QWEN25_7B, "qwen2.5-1.5b": QWEN25_1_5B}


def param_count(config: dict) -> int:
    """Parameters of a Qwen2 model with these fields (q/k/v carry biases, o and the MLP don't)."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    layers = config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h
    per_layer = attention + 3 * h * inter + 2 * h
    embeddings = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + h


def model_params(model_dir: Path) -> int:
    """:func:`param_count` of the model saved in ``model_dir``."""
    return param_count(json.loads((model_dir / "config.json").read_text()))
