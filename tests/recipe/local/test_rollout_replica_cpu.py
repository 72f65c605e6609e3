"""The ``hf_cpu`` rollout server's seeding (``local/rollout_replica_cpu.py``), without Ray.

verl's agent loop sends a step's requests concurrently, so their order differs between runs;
each request's sample must depend on the seed, the weights and the prompt only, never on that
order, and the n rollouts of one prompt must still differ from one another.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recipe.retool.local.rollout_replica_cpu import HFRolloutServer, request_seed

PROMPTS = ([1, 2, 3, 4], [5, 6, 7])
PARAMS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": 12, "logprobs": True}


def server(model: Path, seed: int = 7) -> HFRolloutServer:
    return HFRolloutServer(str(model), prompt_length=16, response_length=12, seed=seed)


async def sample(srv: HFRolloutServer, prompt: list[int]) -> list[int]:
    return (await srv.generate(prompt, dict(PARAMS), request_id="any")).token_ids


async def test_a_prompt_samples_the_same_tokens_whatever_the_order(tiny_model_dir: Path) -> None:
    """Two servers with one seed get the same prompts' occurrences in different orders: each
    (prompt, occurrence) samples the same tokens on both, and the occurrences differ."""
    first, second = server(tiny_model_dir), server(tiny_model_dir)
    a, b = PROMPTS
    on_first = [await sample(first, p) for p in (a, b, a)]
    on_second = [await sample(second, p) for p in (b, a, a)]
    assert on_first[0] == on_second[1]  # a, first occurrence
    assert on_first[2] == on_second[2]  # a, second occurrence
    assert on_first[1] == on_second[0]  # b
    assert on_first[0] != on_first[2]  # a group's rollouts are different samples


async def test_the_seed_and_the_weights_choose_the_samples(tiny_model_dir: Path) -> None:
    """Another ``rollout.seed`` (or replica rank) samples differently, and so does the same
    prompt after a weight update, even when the weights it loads are the ones it had."""
    base = server(tiny_model_dir)
    reference = await sample(base, PROMPTS[0])
    assert await sample(server(tiny_model_dir, seed=8), PROMPTS[0]) != reference
    await base.update_weights(base.model.state_dict(), global_steps=1)
    assert await sample(base, PROMPTS[0]) != reference


async def test_sampling_leaves_the_global_rng_alone(tiny_model_dir: Path) -> None:
    """The seeded stream is forked: the process's own RNG neither drives nor feels sampling."""
    srv = server(tiny_model_dir)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    await sample(srv, PROMPTS[0])
    assert torch.equal(torch.rand(3), expected)


REQUEST = (7, 3, [1, 2], 0)  # seed, global_steps, prompt ids, occurrence


@pytest.mark.parametrize(
    "other",
    [(8, 3, [1, 2], 0), (7, 4, [1, 2], 0), (7, 3, [1, 3], 0), (7, 3, [1, 2], 1)],
    ids=["seed", "global_steps", "prompt", "occurrence"],
)
def test_every_part_of_a_request_changes_its_seed(other: tuple) -> None:
    assert request_seed(*REQUEST) == request_seed(7, 3, [1, 2], 0)
    assert request_seed(*other) != request_seed(*REQUEST)
