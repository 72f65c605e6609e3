"""verl's own MultiTurnSFTDataset accepts prep's SFT parquet and trains on assistant tokens only.

verl 0.9.1: ``MultiTurnSFTDataset(parquet_files, tokenizer, config, processor, max_samples)``;
``config`` is the trainer's ``data`` section (``messages_key``, ``tools_key``, ``max_length``,
``truncation`` in {error, left, right}, ``pad_mode`` in {right, no_padding}). It tokenises each
message separately, masks loss to assistant turns minus the ``<|im_start|>assistant\\n`` prompt,
and asserts that the concatenation equals the whole-conversation rendering.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

from recipe.retool.data import prep
from recipe.retool.local.samples import write_sources

ASSISTANT_OPEN = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>\n"


@pytest.fixture(scope="module")
def sft_parquet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    src = write_sources(root / "src")
    prep.prepare(root / "out", source_dir=src, only=["sft"], on_error="skip", show=False)
    return root / "out/sft/train.parquet"


def make_dataset(path: Path, tokenizer, **overrides) -> MultiTurnSFTDataset:
    config = {
        "messages_key": "messages",
        "tools_key": "tools",
        "max_length": 4096,
        "truncation": "error",
        "pad_mode": "no_padding",
        **overrides,
    }
    return MultiTurnSFTDataset(str(path), tokenizer, OmegaConf.create(config))


def expected_mask(tokenizer, messages, tools) -> tuple[list[int], list[int]]:
    """Independent reference: render once, mark tokens inside assistant spans by char offset.

    An assistant span runs from just after ``<|im_start|>assistant\\n`` through ``<|im_end|>\\n``
    (verl trains on the turn's closing newline too).
    """
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    spans = []
    pos = 0
    while (start := text.find(ASSISTANT_OPEN, pos)) >= 0:
        end = text.index(TURN_END, start) + len(TURN_END)
        spans.append((start + len(ASSISTANT_OPEN), end))
        pos = end
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def runs(ids: torch.Tensor, mask: torch.Tensor, value: int, tokenizer) -> list[str]:
    """Decoded maximal runs of tokens whose mask equals ``value``."""
    out, cur = [], []
    for tok, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m == value:
            cur.append(tok)
        elif cur:
            out.append(tokenizer.decode(cur))
            cur = []
    if cur:
        out.append(tokenizer.decode(cur))
    return out


def test_loss_mask_is_exactly_the_assistant_tokens(sft_parquet: Path, tiny_tokenizer):
    ds = make_dataset(sft_parquet, tiny_tokenizer)
    rows = pq.read_table(sft_parquet).to_pylist()
    assert len(ds) == len(rows) == 2
    for i, row in enumerate(rows):
        messages = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
        item = ds[i]
        ref_ids, ref_mask = expected_mask(tiny_tokenizer, messages, row["tools"])
        assert item["input_ids"].tolist() == ref_ids
        assert item["loss_mask"].tolist() == ref_mask

    item = ds[0]
    trained = runs(item["input_ids"], item["loss_mask"], 1, tiny_tokenizer)
    ignored = "".join(runs(item["input_ids"], item["loss_mask"], 0, tiny_tokenizer))
    assert trained == [
        "Let me compute the sum with Python.\n<tool_call>\n"
        '{"name": "code_interpreter", "arguments": '
        '{"code": "total = sum(range(1, 11))\\nprint(total)"}}\n</tool_call><|im_end|>\n',
        "Now check the square.\n<tool_call>\n"
        '{"name": "code_interpreter", "arguments": {"code": "55 ** 2"}}\n</tool_call><|im_end|>\n',
        "So the answer is 3025.\n\n\\boxed{3025}<|im_end|>\n",
    ]
    # system (with the tool schema), user question and both tool responses carry no loss
    assert "# Tools" in ignored and '"description": "A tool for executing code."' in ignored
    assert "What is (1 + 2 + ... + 10)^2?" in ignored
    assert "<tool_response>\n55\n</tool_response>" in ignored
    assert "<tool_response>\n3025\n</tool_response>" in ignored
    assert not any("tool_response" in t or "<|im_start|>" in t for t in trained)


def test_prep_token_count_predicts_verl_length_exactly(sft_parquet: Path, tiny_tokenizer):
    ds = make_dataset(sft_parquet, tiny_tokenizer)
    for i, row in enumerate(pq.read_table(sft_parquet).to_pylist()):
        assert prep.token_length(tiny_tokenizer, row, "sft") == len(ds[i]["input_ids"])


def test_overlong_sample_with_verl_default_truncation_raises(sft_parquet, tiny_tokenizer):
    """verl's default (truncation=error) raises mid-epoch; left/right cut silently. Hence prep
    counts rows over --sft-max-length and drops (or fails on) them before verl ever sees them."""
    full = len(make_dataset(sft_parquet, tiny_tokenizer)[0]["input_ids"])
    limit = full - 10
    with pytest.raises(ValueError, match="is larger than"):
        make_dataset(sft_parquet, tiny_tokenizer, max_length=limit)[0]
    cut = make_dataset(
        sft_parquet, tiny_tokenizer, max_length=limit, truncation="right", pad_mode="right"
    )[0]
    assert len(cut["input_ids"]) == limit  # silently truncated: what prep's drop avoids

    root = sft_parquet.parents[2]
    summary = prep.prepare(
        root / "limited",
        source_dir=root / "src",
        only=["sft"],
        on_error="skip",
        tokenizer=tiny_tokenizer,
        sft_max_length=limit,
        show=False,
    )["sft"]
    assert (summary.overlong, summary.rows_out) == (1, 1)
    kept = make_dataset(root / "limited/sft/train.parquet", tiny_tokenizer, max_length=limit)
    assert len(kept) == 1 and len(kept[0]["input_ids"]) <= limit
