"""A laptop-sized stand-in for Qwen2.5-7B-Instruct, built offline in seconds.

The Hugging Face hub is unreachable in CI and on the machines this project is developed on, yet
every stage (prep token statistics, verl's SFT dataset, the agent loop, evaluation) must run through
the same ``from_pretrained`` code path as the real model. This module writes an HF directory with

* a random-init model of the real ``Qwen2ForCausalLM`` architecture (tiny widths), and
* a byte-level BPE tokenizer carrying Qwen2.5's special tokens and a chat template that renders
  Qwen2.5's tool-calling format (``# Tools`` system block, ``<tool_call>`` JSON in assistant turns,
  ``<tool_response>`` inside a user turn, ``<|im_start|>``/``<|im_end|>`` framing).

Usage: ``python -m recipe.retool.data.tiny_model OUT_DIR`` (or :func:`ensure_tiny_model` from
code).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END]
# Qwen2.5 registers these as added (non-special) tokens, so they survive decoding.
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Renders exactly what Qwen2.5-Instruct's template renders for system/user/assistant/tool turns,
# with and without tools. Written with explicit "\n" literals so whitespace is unambiguous.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_text = '" + DEFAULT_SYSTEM + "' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system_text -}}"
    "{%- if tools -%}"
    "{{- '\\n\\n# Tools\\n\\n'"
    " + 'You may call one or more functions to assist with the user query.\\n\\n'"
    " + 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and '"
    " + 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'"
    ' + \'{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>\' -}}'
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{%- if loop.first or loop_messages[loop.index0 - 1]['role'] != 'tool' -%}"
    "{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}"
    "{%- if loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool' -%}"
    "{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') -%}"
    "{{- '<|im_start|>assistant' -}}"
    "{%- if message['content'] -%}{{- '\\n' + message['content'] -}}{%- endif -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call.get('function') else call -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' -}}"
    "{%- if fn['arguments'] is string -%}{{- fn['arguments'] -}}"
    "{%- else -%}{{- fn['arguments'] | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{{- (message['content'] or '') + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# A few kilobytes of the kinds of text the pipeline handles, so BPE merges are realistic enough
# that sequences stay short.
_CORPUS = [
    "Solve the following math problem step by step. The answer format must be: \\boxed{42}.",
    "Let x = 5. Then 2x + 3 = 13, so the final answer is \\boxed{13}. Answer: 13",
    "```python\nimport sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 4, x))\n```",
    "def f(n):\n    return sum(i * i for i in range(n))\nprint(f(10))",
    '{"name": "code_interpreter", "arguments": {"code": "print(2 + 2)"}}',
    "The probability is \\frac{1}{2} and the angle is 30^\\circ. We compute 0.5 * 4 = 2.",
    'Traceback (most recent call last):\n  File "<stdin>", line 1\nZeroDivisionError',
    DEFAULT_SYSTEM,
    "You may call one or more functions to assist with the user query.",
]


@dataclass(frozen=True)
class TinySpec:
    """Model widths. Shape mirrors Qwen2 (GQA, SwiGLU, RoPE); sizes are laptop-sized."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    seed: int = 0
    dtype: str = "float32"  # of the saved weights; GPU benchmarks save bfloat16 (half the bytes)

    def fingerprint(self) -> str:
        """Cache key: changes whenever the spec or the template changes."""
        payload = json.dumps(asdict(self), sort_keys=True) + CHAT_TEMPLATE + "".join(_CORPUS)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE on the built-in corpus and wrap it as a Qwen2 fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(ADDED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(ADDED_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 32768
    return fast


def build(out_dir: Path, spec: TinySpec = TinySpec()) -> Path:
    """Write the model and tokenizer to ``out_dir`` (created) and return it."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    tokenizer = build_tokenizer(spec.vocab_size)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = Qwen2Config(
        vocab_size=max(spec.vocab_size, len(tokenizer)),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        torch_dtype=spec.dtype,
    )
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, spec.dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_tiny_model(cache_root: Path, spec: TinySpec = TinySpec()) -> Path:
    """Return a cached tiny model directory, building it once (atomically) if missing."""
    target = cache_root / f"tiny-qwen2-{spec.fingerprint()}"
    if (target / "config.json").exists():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_root, prefix=".building-"))
    try:
        build(staging, spec)
        # Another process may have won the race; its copy is identical.
        with contextlib.suppress(OSError):
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the HF model into")
    args = parser.parse_args(argv)
    path = build(args.out_dir)
    print(f"tiny Qwen2 model + Qwen2.5-format tokenizer written to {path}")


if __name__ == "__main__":
    main()
