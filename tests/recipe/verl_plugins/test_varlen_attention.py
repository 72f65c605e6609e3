"""torch varlen attention behind transformers' flash path: what verl's remove-padding runs on.

The kernel itself needs a GPU (scripts/check_varlen_attention.py); here the CPU path (each packed
sequence through SDPA alone) stands in for it, so the sequence bookkeeping, the registration with
transformers and verl's patched model are checked against padded SDPA and plain softmax math.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from recipe.retool.data.tiny_model import TinySpec
from recipe.retool.verl_plugins import varlen_attention as va

LENGTHS = [5, 1, 7]


def softmax_attention(q, k, v, scale: float, causal: bool) -> torch.Tensor:
    """One sequence, ``(len, heads, dim)``, written out: kv heads repeated, causal bottom-right."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def packed_qkv(lengths: list[int], heads: int = 4, kv_heads: int = 2, dim: int = 8):
    torch.manual_seed(0)
    total = sum(lengths)
    return (torch.randn(total, h, dim, requires_grad=True) for h in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize(("causal", "scale"), [(True, None), (False, 0.3)])
def test_each_packed_sequence_attends_only_to_itself(causal: bool, scale: float | None) -> None:
    q, k, v = packed_qkv(LENGTHS)
    cu = cu_seqlens(LENGTHS)
    out = va.varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), 0.0, scale, causal)
    bounds = cu.tolist()
    expected = torch.cat(
        [
            softmax_attention(q[a:b], k[a:b], v[a:b], scale or 1 / math.sqrt(8), causal)
            for a, b in itertools.pairwise(bounds)
        ]
    )
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_causal_mask_is_bottom_right_when_queries_are_fewer_than_keys() -> None:
    """flash-attn's convention (a query block at the end of its keys): the last query sees all."""
    q, k, v = (t.detach() for t in packed_qkv([5]))
    q = q[:2]
    out = va.varlen_attention(q, k, v, cu_seqlens([2]), cu_seqlens([5]), 2, 5, causal=True)
    torch.testing.assert_close(out, softmax_attention(q, k, v, 1 / math.sqrt(8), causal=True))
    only_first_four = va.varlen_attention(
        q[:1], k[:4], v[:4], *(cu_seqlens([1]), cu_seqlens([4])), 1, 4
    )
    torch.testing.assert_close(out[:1], only_first_four)


def test_unpacked_batch_is_each_row_alone() -> None:
    q, k, v = (t.detach().view(2, 6, *t.shape[1:]) for t in packed_qkv([6, 6]))
    out = va.attention(q, k, v, causal=True)
    for row in range(2):
        torch.testing.assert_close(
            out[row], softmax_attention(q[row], k[row], v[row], 1 / math.sqrt(8), causal=True)
        )


@pytest.mark.parametrize("extra", [{"dropout_p": 0.1}, {"window_size": (3, 3)}])
def test_what_it_cannot_do_fails_instead_of_computing_plain_attention(extra: dict) -> None:
    q, k, v = packed_qkv([3])
    with pytest.raises(NotImplementedError):
        va.varlen_attention(q, k, v, cu_seqlens([3]), cu_seqlens([3]), 3, 3, causal=True, **extra)


def test_gpu_call_matches_the_installed_torchs_varlen_signature() -> None:
    """Off the CPU the call goes to ``torch.nn.attention.varlen.varlen_attn``; its meta (shape)
    implementation accepts exactly the arguments the GPU gets, max lengths as tensors included."""
    q, k, v = (torch.empty(13, h, 8, device="meta") for h in (4, 2, 2))
    cu = torch.empty(4, dtype=torch.int64, device="meta")
    out = va.varlen_attention(q, k, v, cu, cu, torch.tensor(7), torch.tensor(7), causal=True)
    assert out.shape == (13, 4, 8) and out.device.type == "meta"


# ---- through transformers and verl (the GPU check's runs, on the CPU path) --------------------

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "check_varlen_attention.py"
spec = importlib.util.spec_from_file_location("check_varlen_attention", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gpu_check  # its dataclasses look their module up
spec.loader.exec_module(gpu_check)
SMALL = TinySpec(vocab_size=64, hidden_size=32, intermediate_size=64)


def test_install_registers_the_name_and_leaves_other_implementations_alone() -> None:
    from transformers import modeling_flash_attention_utils as fa_utils

    va.install()
    loader = fa_utils._lazy_imports
    va.install()
    assert fa_utils._lazy_imports is loader  # idempotent: not wrapped twice
    flash_fn, varlen_fn, *_ = loader(va.NAME)
    assert (flash_fn, varlen_fn) == (va.attention, va.varlen_attention)
    with pytest.raises(Exception, match=r"flash|kernels|Could not"):  # transformers' own loader
        loader("flash_attention_2")


def test_verls_packed_forward_gives_padded_sdpas_loss_and_gradients(monkeypatch) -> None:
    """verl's remove-padding input (one row, position ids restarting, no mask) into a model loaded
    with NAME and patched by verl: padded SDPA's loss and gradients, one varlen call per layer."""
    calls = []
    real = va._per_sequence_sdpa
    monkeypatch.setattr(
        va, "_per_sequence_sdpa", lambda *a: calls.append(a[3].tolist()) or real(*a)
    )
    result = gpu_check.check(SMALL, tuple(LENGTHS), "cpu", torch.float32)
    assert result["passed"]
    assert result["varlen_error"]["loss"] < 1e-5 and result["varlen_error"]["grad"] < 1e-4
    assert calls == [cu_seqlens(LENGTHS).tolist()] * SMALL.num_hidden_layers


def test_the_check_fails_when_packed_sequences_see_each_other(monkeypatch) -> None:
    real = va._per_sequence_sdpa

    def one_sequence(q, k, v, cu_q, cu_k, scale, causal):
        whole = cu_q[[0, -1]]
        return real(q, k, v, whole, whole, scale, causal)

    monkeypatch.setattr(va, "_per_sequence_sdpa", one_sequence)
    result = gpu_check.check(SMALL, tuple(LENGTHS), "cpu", torch.float32)
    assert not result["passed"] and result["varlen_error"]["grad"] > 1e-2


def test_the_script_prints_one_json_line_and_exits_by_the_verdict(monkeypatch, capsys) -> None:
    monkeypatch.setattr(gpu_check, "SHAPE", SMALL)
    monkeypatch.setattr(gpu_check, "LENGTHS", (4, 9))
    assert gpu_check.main(["--device", "cpu", "--dtype", "bfloat16"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["passed"] and record["dtype"] == "bfloat16" and record["lengths"] == [4, 9]
    assert set(record["varlen_error"]) == set(record["sdpa_error"]) == {"loss", "grad"}
