"""Fused log-probs: verl's own values and gradients, installed where verl computes them."""

from __future__ import annotations

import pytest
import torch
from verl.utils import torch_functional

from recipe.retool.verl_plugins import fast_logprobs

VERL_LOOP = torch_functional.logprobs_from_logits_v2  # before any install() in this process


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(37,), (3, 5)])
def test_same_values_and_gradients_as_verls_loop(dtype, tol, shape, monkeypatch) -> None:
    monkeypatch.setattr(fast_logprobs, "ROWS_PER_CHUNK", 8)  # several chunks and a ragged one
    torch.manual_seed(0)
    base = (torch.randn(*shape, 50) * 3).to(dtype)
    labels = torch.randint(0, 50, shape)
    ours_in, verl_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    ours, theirs = fast_logprobs.chunked_logprobs(ours_in, labels), VERL_LOOP(verl_in, labels)
    assert ours.shape == theirs.shape == labels.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours.float(), theirs.float(), atol=tol, rtol=tol)
    ours.float().sum().backward()
    theirs.float().sum().backward()
    torch.testing.assert_close(ours_in.grad.float(), verl_in.grad.float(), atol=tol, rtol=tol)


def test_install_reaches_verls_entry_point(monkeypatch) -> None:
    monkeypatch.setattr(torch_functional, "logprobs_from_logits_v2", VERL_LOOP)
    monkeypatch.setattr(torch_functional, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)
    fast_logprobs.install()
    assert torch_functional.logprobs_from_logits_v2 is fast_logprobs.chunked_logprobs
    logits, labels = torch.randn(4, 9), torch.tensor([0, 3, 8, 1])
    expected = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(torch_functional.logprobs_from_logits(logits, labels), expected)
