"""verl's per-token log-prob loop against the fused chunks of verl_plugins/fast_logprobs.py.

Forward + backward over one micro-batch of ``--tokens`` label tokens, both in the same process
and on the same tensors, so the result is a ratio on this machine. ``make bench-logprobs``
(add ``DEVICE=cuda`` on a GPU box). The table goes to stdout; docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from verl.utils import torch_functional

from recipe.retool.verl_plugins.fast_logprobs import chunked_logprobs

VERL_LOOP = torch_functional.logprobs_from_logits_v2


def seconds(fn: Callable, logits: torch.Tensor, labels: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        x = logits.detach().clone().requires_grad_()
        start = time.perf_counter()
        fn(x, labels).float().sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{'dtype':<9} {'tokens':>7} {'vocab':>7} {'verl loop s':>12} {'fused s':>9} {'ratio':>7}"
    )
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(args.tokens, args.vocab, device=args.device).to(dtype)
        labels = torch.randint(0, args.vocab, (args.tokens,), device=args.device)
        loop = seconds(VERL_LOOP, logits, labels, args.repeats)
        fused = seconds(chunked_logprobs, logits, labels, args.repeats)
        name = str(dtype).removeprefix("torch.")
        print(
            f"{name:<9} {args.tokens:>7} {args.vocab:>7} {loop:>12.3f} {fused:>9.4f} "
            f"{loop / fused:>6.1f}x"
        )


if __name__ == "__main__":
    main()
