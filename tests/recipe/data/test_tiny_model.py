"""The offline fixture must load and render exactly like Qwen2.5-7B-Instruct does."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipe.retool.data.tiny_model import TinySpec, ensure_tiny_model

CODE_TOOL = {
    "type": "function",
    "function": {
        "name": "code_interpreter",
        "description": "A tool for executing code.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The code to execute."}},
            "required": ["code"],
        },
    },
}

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {
        "role": "assistant",
        "content": "Let me compute.",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "code_interpreter", "arguments": {"code": "print(2+2)"}},
            }
        ],
    },
    {"role": "tool", "content": "4"},
    {"role": "assistant", "content": "The answer is \\boxed{4}."},
]

# What Qwen2.5-7B-Instruct's own template renders for CONVERSATION with tools=[CODE_TOOL].
EXPECTED = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "code_interpreter", "description": "A tool for '
    'executing code.", "parameters": {"type": "object", "properties": {"code": {"type": "string", '
    '"description": "The code to execute."}}, "required": ["code"]}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\nLet me compute.\n<tool_call>\n"
    '{"name": "code_interpreter", "arguments": {"code": "print(2+2)"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nThe answer is \\boxed{4}.<|im_end|>\n"
)


def test_renders_qwen25_tool_calling_format(tiny_tokenizer) -> None:
    text = tiny_tokenizer.apply_chat_template(CONVERSATION, tools=[CODE_TOOL], tokenize=False)
    assert text == EXPECTED


def test_generation_prompt_and_default_system_without_tools(tiny_tokenizer) -> None:
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_consecutive_tool_messages_share_one_user_turn(tiny_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "tool", "content": "a"},
        {"role": "tool", "content": "b"},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<tool_response>\na\n</tool_response>"
        "\n<tool_response>\nb\n</tool_response><|im_end|>\n"
    )


def test_special_tokens_are_single_ids_and_round_trip(tiny_tokenizer) -> None:
    for token in ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_response>"]:
        ids = tiny_tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, token
    text = 'Résumé ∑ 中文 <tool_call>\n{"a": 1}\n</tool_call>'
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert tiny_tokenizer.pad_token == "<|endoftext|>"


def test_model_loads_through_auto_classes_and_runs_forward(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA like 7B
    ids = tokenizer.apply_chat_template(CONVERSATION, tools=[CODE_TOOL], return_tensors="pt")
    input_ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert len(tokenizer) <= model.config.vocab_size


def test_cache_is_reused_and_keyed_by_spec(tmp_path: Path) -> None:
    spec = TinySpec(num_hidden_layers=1)
    first = ensure_tiny_model(tmp_path, spec)
    marker = first / "marker"
    marker.write_text("kept")
    assert ensure_tiny_model(tmp_path, spec) == first
    assert marker.exists()
    other = ensure_tiny_model(tmp_path, TinySpec(num_hidden_layers=2))
    assert other != first
    assert not list(tmp_path.glob(".building-*"))
