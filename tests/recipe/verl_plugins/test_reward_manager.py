"""The DAPO config's reward manager, loaded the way verl's trainer loads it, on real DataProtos."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from verl import DataProto

from recipe.retool.core.constants import TOOL_CALLS_KEY
from recipe.retool.core.paths import Layout
from recipe.retool.core.topology import Topology
from recipe.retool.launch.commands import dapo_overrides
from recipe.retool.launch.validation import validate


@pytest.fixture(scope="module")
def manager(tiny_tokenizer):
    from verl.trainer.ppo.reward import load_reward_manager

    topo = Topology(gpus_per_node=8)
    overrides = dapo_overrides(
        Layout.modal(), "rl", Path("/m"), topo,
        ["reward.reward_kwargs.max_resp_len=64", "reward.reward_kwargs.overlong_buffer_cfg.len=16"],
    )  # fmt: skip
    cfg = validate("dapo", overrides, topo)

    async def build():  # verl managers cache the running event loop
        return load_reward_manager(cfg, tiny_tokenizer)

    loop = asyncio.new_event_loop()
    yield loop, loop.run_until_complete(build()), tiny_tokenizer
    loop.close()


def one_rollout(
    tokenizer, text: str, num_turns: int, pad_to: int = 64, tool_fields: dict | None = None
) -> DataProto:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:pad_to]
    response = torch.zeros(1, pad_to, dtype=torch.long)
    response[0, : len(ids)] = torch.tensor(ids)
    prompt = torch.ones(1, 4, dtype=torch.long)
    mask = torch.cat([torch.ones(1, 4), (response != 0).float()], dim=1).long()
    return DataProto.from_dict(
        tensors={"prompts": prompt, "responses": response, "attention_mask": mask},
        non_tensors={
            "data_source": np.array(["math_dapo"], dtype=object),
            "reward_model": np.array([{"ground_truth": "42"}], dtype=object),
            "extra_info": np.array([{"index": 0}], dtype=object),
            "__num_turns__": np.array([num_turns]),
            "tool_extra_fields": np.array([tool_fields or {}], dtype=object),
        },
    )


def test_manager_is_ours_and_keeps_dapo_overlong_settings(manager) -> None:
    _, mgr, _ = manager
    assert type(mgr).__name__ == "ReToolRewardManager"
    assert mgr.overlong_buffer_cfg.enable and mgr.max_resp_len == 64


@pytest.mark.parametrize(
    ("text", "turns", "expected"),
    [
        ("so \\boxed{42}", 2, 1.0),  # right: +1, no overlong penalty for a short answer
        ("so \\boxed{41}", 2, -1.0),  # wrong, no tool use: -1
        ("so \\boxed{41}", 8, -0.7),  # wrong after 3 tool calls: -1 + (8-2)/2*0.1
        ("so \\boxed{41}", 20, -0.6),  # the -0.6 cap stops turn-count reward hacking
    ],
)
def test_turn_shaping_reaches_compute_score(manager, text, turns, expected) -> None:
    loop, mgr, tok = manager
    result = loop.run_until_complete(mgr.run_single(one_rollout(tok, text, turns)))
    assert result["reward_score"] == pytest.approx(expected)


def test_overlong_responses_are_penalised(manager) -> None:
    loop, mgr, tok = manager
    long_text = "word " * 200 + "\\boxed{42}"
    result = loop.run_until_complete(mgr.run_single(one_rollout(tok, long_text, 2)))
    extra = result["reward_extra_info"]
    assert bool(extra["overlong"])
    assert float(extra["overlong_reward"]) == pytest.approx(-1.0)  # 16 tokens over a 16 buffer
    assert float(result["reward_score"]) == pytest.approx(extra["score"] + extra["overlong_reward"])


def test_tool_calls_and_errors_reach_the_reward_metrics(manager) -> None:
    """The agent loop's per-call sandbox records (tools.py) become reward extra info, which verl
    averages into validation metrics: tool calls per trajectory and failed calls."""
    loop, mgr, tok = manager
    calls = [{"status": "Success"}, {"status": "Failed"}, {"status": "Success"}]
    rollout = one_rollout(tok, "so \\boxed{42}", 8, tool_fields={TOOL_CALLS_KEY: calls})
    extra = loop.run_until_complete(mgr.run_single(rollout))["reward_extra_info"]
    assert (extra["tool_calls"], extra["tool_errors"]) == (3, 1)
    plain = loop.run_until_complete(mgr.run_single(one_rollout(tok, "\\boxed{42}", 2)))
    assert (
        plain["reward_extra_info"]["tool_calls"],
        plain["reward_extra_info"]["tool_errors"],
    ) == (0, 0)
