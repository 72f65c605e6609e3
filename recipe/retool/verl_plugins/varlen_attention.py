"""Packed-sequence (varlen) attention from torch itself, for verl's remove-padding and Ulysses.

verl 0.9.1 packs a micro-batch into one row (``use_remove_padding``): ``input_ids`` of shape
``(1, total_tokens)``, ``position_ids`` restarting at 0 for each sequence, no attention mask
(``verl/workers/engine/fsdp/transformer_impl.py``, "only pass input_ids and position_ids to enable
flash_attn_varlen"). Only transformers' flash-attention path turns that into per-sequence
attention: ``_flash_attention_forward`` derives ``cu_seqlens`` from the position ids and calls the
implementation's ``flash_attn_varlen_func``, and verl's Ulysses patch wraps exactly that function
(``apply_monkey_patch`` replaces ``transformers.integrations.flash_attention.
_flash_attention_forward``). With ``sdpa`` the packed row gets one block-diagonal mask over the
whole micro-batch instead: quadratic memory and no varlen kernel. ``flash_attention_2/3/4`` need
the ``flash-attn`` packages: no binary wheel for this torch (2, 3), or pins that clash with vLLM
0.24's (4).

torch 2.11 ships varlen flash attention (``torch.nn.attention.varlen.varlen_attn``: FlashAttention-2
kernels built into torch, forward and backward, grouped-query heads natively). :func:`install`
registers it with transformers under :data:`NAME`, as a flash-style implementation, so verl's
remove-padding and Ulysses code run unchanged on it:

- the attention interface: transformers' own ``flash_attention_forward`` (which calls the
  module-level ``_flash_attention_forward`` that verl's Ulysses patch replaces);
- the mask interface: flash attention's (no mask when nothing is padded);
- the flash functions transformers loads for the name: :func:`attention` and
  :func:`varlen_attention` (transformers 5.9 loads local kernels only by their package names, and
  other names from the hub, so its loader ``_lazy_imports`` is wrapped for this one name).

On a CPU (tests) each packed sequence goes through SDPA on its own, so the whole path runs and is
checked there; ``scripts/check_varlen_attention.py`` checks the kernel on a GPU.

Installed where verl builds models, by ``verl_plugins/trainer_setup.py``: the SFT launcher and
every DAPO Ray worker. ``launch.attention_implementation`` asks verl for :data:`NAME`.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F

NAME = "torch_flash_varlen"
_NO_WINDOW = (-1, -1)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | torch.Tensor,
    max_seqlen_k: int | torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = _NO_WINDOW,
) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` contract: ``q`` ``(total_q, heads, dim)``,
    ``k``/``v`` ``(total_k, kv_heads, dim)``, sequence ``i`` at rows ``cu_seqlens[i]:[i + 1]``.

    The parameter names are the ones transformers inspects to decide what to pass (dropout and
    windows are declared so that a model that needs them fails here rather than silently getting
    plain attention). A causal mask is aligned bottom-right, as in flash-attn.
    """
    if dropout_p:
        raise NotImplementedError(f"{NAME}: attention dropout ({dropout_p}) is not supported")
    if tuple(window_size) != _NO_WINDOW:
        raise NotImplementedError(f"{NAME}: sliding-window attention is not supported")
    cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    if q.device.type == "cpu":
        return _per_sequence_sdpa(q, k, v, cu_q, cu_k, softmax_scale, causal)
    from torch.nn.attention.varlen import varlen_attn

    # torch 2.11's kernel takes fewer kv heads as they come; later torch asks for enable_gqa.
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] and _takes_enable_gqa() else {}
    # Causality is the window (-1, 0), as a tuple: torch 2.11 compares it with ==.
    return varlen_attn(
        q,
        k,
        v,
        cu_q,
        cu_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        scale=softmax_scale,
        window_size=(-1, 0) if causal else _NO_WINDOW,
        **gqa,
    )


@functools.cache
def _takes_enable_gqa() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    **kwargs: object,
) -> torch.Tensor:
    """flash-attn's ``flash_attn_func`` contract (``(batch, seq, heads, dim)``, nothing padded):
    what transformers calls for an unpacked batch; each row is one varlen sequence.
    """
    batch, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]

    def offsets(length: int) -> torch.Tensor:
        return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=q.device)

    out = varlen_attention(
        q.reshape(batch * seq_q, *q.shape[2:]),
        k.reshape(batch * seq_k, *k.shape[2:]),
        v.reshape(batch * seq_k, *v.shape[2:]),
        offsets(seq_q),
        offsets(seq_k),
        seq_q,
        seq_k,
        softmax_scale=softmax_scale,
        causal=causal,
        **kwargs,
    )
    return out.view(batch, seq_q, *out.shape[1:])


def _per_sequence_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    scale: float | None,
    causal: bool,
) -> torch.Tensor:
    """The CPU path: SDPA on each sequence alone (heads first, grouped-query heads expanded)."""
    outputs = []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for q0, q1, k0, k1 in zip(bq[:-1], bq[1:], bk[:-1], bk[1:], strict=True):
        mask = None
        if causal:
            mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device)
            mask = mask.tril((k1 - k0) - (q1 - q0))  # bottom-right aligned
        out = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1),
            k[k0:k1].transpose(0, 1),
            v[k0:k1].transpose(0, 1),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs) if outputs else q.new_empty(0, *q.shape[1:])


def install() -> None:
    """Register :data:`NAME` with transformers in this process (idempotent)."""
    from transformers import AttentionInterface
    from transformers import modeling_flash_attention_utils as fa_utils
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.utils.generic import split_attention_implementation

    AttentionInterface.register(NAME, flash_attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    loader = fa_utils._lazy_imports
    if getattr(loader, "serves", None) == NAME:
        return

    def lazy_imports(implementation: str | None, *args: object, **kwargs: object) -> tuple:
        if split_attention_implementation(implementation)[1] != NAME:
            return loader(implementation, *args, **kwargs)
        return attention, varlen_attention, None, fa_utils._pad_input, fa_utils._unpad_input

    lazy_imports.serves = NAME  # type: ignore[attr-defined]
    fa_utils._lazy_imports = lazy_imports


def make_portable(hf_dir: Path) -> bool:
    """Remove :data:`NAME` from a saved ``config.json`` (``True`` if it was there).

    verl writes the attention it trained with into each checkpoint's Hugging Face config, and
    ``from_pretrained`` refuses a name it does not know: without this, a checkpoint trained on a
    GPU would load only in a process that installed this plugin (the CPU evaluation of a GPU
    smoke run failed so). Without the key, transformers picks its default attention."""
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    if config.get("attn_implementation") != NAME:
        return False
    del config["attn_implementation"]
    staged = path.with_suffix(".json.tmp")
    staged.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    staged.replace(path)
    return True
