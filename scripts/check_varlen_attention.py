"""On a GPU: torch's varlen attention (verl_plugins/varlen_attention.py) against padded SDPA.

    python scripts/check_varlen_attention.py     # CUDA, bf16: one JSON line; exit 1 on a mismatch

One small random Qwen2 (grouped-query heads of Qwen2.5-7B's head size), ragged sequences, three
forward/backward runs of the same weights: fp32 padded SDPA (the reference), bf16 padded SDPA, and
bf16 packed varlen, the last as verl's ``use_remove_padding`` sends it (one row, position ids
restarting at 0, no mask) into a model verl's ``apply_monkey_patch`` has patched. The varlen run
passes when its loss and every parameter's gradient are as close to the reference as bf16 SDPA's
are (``FACTOR`` times that error, plus ``FLOOR``): the kernel adds no error beyond bf16's own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.retool.data.tiny_model import TinySpec
from recipe.retool.verl_plugins import varlen_attention

FACTOR, FLOOR = 2.0, 1e-3
LENGTHS = (1, 37, 300, 1024, 129)  # ragged, a one-token sequence included
# Small, but Qwen2.5-7B's head size (128) and 1:4 kv-head grouping.
SHAPE = TinySpec(
    hidden_size=1024, intermediate_size=2048, num_attention_heads=8, max_position_embeddings=4096
)


@dataclass
class Run:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]


def qwen2(spec: TinySpec, attn: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The same random weights for every call with the same spec (seeded, built on the CPU)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    widths = {k: v for k, v in asdict(spec).items() if k != "seed"}
    torch.manual_seed(spec.seed)
    config = Qwen2Config(**widths, attn_implementation=attn)
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def sequences(shape: TinySpec, lengths: tuple[int, ...], device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, shape.vocab_size, (n,), generator=generator).to(device) for n in lengths
    ]


def forward_backward(model: torch.nn.Module, ids: list[torch.Tensor], packed: bool) -> Run:
    """Mean next-token loss over every sequence, and the gradients it gives each parameter."""
    lengths = [len(x) for x in ids]
    if packed:
        position_ids = torch.cat([torch.arange(n, device=ids[0].device) for n in lengths])[None]
        logits = model(input_ids=torch.cat(ids)[None], position_ids=position_ids).logits[0]
        per_sequence = logits.split(lengths)
    else:
        width = max(lengths)
        padded = torch.stack([F.pad(x, (0, width - len(x))) for x in ids])
        mask = torch.arange(width, device=padded.device)[None] < padded.new_tensor(lengths)[:, None]
        logits = model(input_ids=padded, attention_mask=mask.long()).logits
        per_sequence = [row[:n] for row, n in zip(logits, lengths, strict=True)]
    loss = F.cross_entropy(
        torch.cat([lg[:-1] for lg in per_sequence]).float(), torch.cat([x[1:] for x in ids])
    )
    loss.backward()
    grads = {name: p.grad.float() for name, p in model.named_parameters()}
    return Run(loss.detach().float(), grads)


def errors(run: Run, reference: Run) -> dict[str, float]:
    """Absolute loss difference, and the worst parameter's relative gradient error."""
    relative = [
        ((g - reference.grads[name]).norm() / reference.grads[name].norm().clamp_min(1e-12)).item()
        for name, g in run.grads.items()
    ]
    return {"loss": (run.loss - reference.loss).abs().item(), "grad": max(relative)}


def check(
    shape: TinySpec, lengths: tuple[int, ...], device: str, dtype: torch.dtype
) -> dict[str, object]:
    """The three runs and the verdict, as one JSON-able record."""
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    varlen_attention.install()
    ids = sequences(shape, lengths, device)
    reference = forward_backward(qwen2(shape, "sdpa", torch.float32, device), ids, packed=False)
    sdpa = forward_backward(qwen2(shape, "sdpa", dtype, device), ids, packed=False)
    model = qwen2(shape, varlen_attention.NAME, dtype, device)
    apply_monkey_patch(model=model, use_remove_padding=True, ulysses_sp_size=1)
    varlen = forward_backward(model, ids, packed=True)
    sdpa_err, varlen_err = errors(sdpa, reference), errors(varlen, reference)
    passed = all(varlen_err[k] <= FACTOR * sdpa_err[k] + FLOOR for k in varlen_err)
    return {
        "check": "varlen_attention",
        "passed": passed,
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "lengths": list(lengths),
        "shape": asdict(shape),
        "reference_loss": reference.loss.item(),
        "sdpa_error": sdpa_err,
        "varlen_error": varlen_err,
        "tolerance": {"factor": FACTOR, "floor": FLOOR},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # verl's patch prints; stdout is the record
        result = check(SHAPE, LENGTHS, args.device, getattr(torch, args.dtype))
    print(json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
