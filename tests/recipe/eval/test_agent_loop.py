"""One real rollout: verl 0.9.1's ToolAgentLoop + hermes parser + our tool + local sandbox + reward.

Only the LLM is scripted. The first turn calls the tool (hermes ``<tool_call>``); the sandbox
really runs the code; the second turn answers with a box. verl counts turns as
user + assistant + tool responses: 1 prompt + 2 assistant + 1 tool = 4.
"""

from __future__ import annotations

import json

import pytest
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
from verl.tools.tool_registry import initialize_tools_from_config

from recipe.retool.core.constants import (
    AGENT_NAME,
    ANSWER_FORMAT,
    TOOL_CALLS_KEY,
    TOOL_NAME,
    TOOL_SCHEMA,
)
from recipe.retool.eval.agent_loop import compose_config, run_tool_agent, score_rollout
from recipe.retool.eval.backends import HFGenerateServer
from recipe.retool.launch.commands import TOOL_CONFIG_FILE as TOOL_CONFIG
from recipe.retool.local.scripted_server import ScriptedServer

CODE = "import math\nmath.comb(10, 3)"
CALL = json.dumps({"name": TOOL_NAME, "arguments": {"code": CODE}})
TURNS = [
    f"I will count with Python.\n<tool_call>\n{CALL}\n</tool_call>",
    "The interpreter says 120, so the answer is \\boxed{120}.",
]
PROMPT = [{"role": "user", "content": "How many 3-subsets has a 10-set?" + ANSWER_FORMAT}]


@pytest.fixture(scope="module")
def config():
    return compose_config()


@pytest.fixture
def tools(local_endpoint: str, monkeypatch):
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", local_endpoint)
    return initialize_tools_from_config(str(TOOL_CONFIG))


def test_tool_agent_is_what_agent_name_selects():
    target = _agent_loop_registry[AGENT_NAME]["_target_"]
    assert target == "verl.experimental.agent_loop.tool_agent_loop.ToolAgentLoop"


def spans(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) runs of the mask."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((mask[start], start, i))
            start = i
    return out


async def test_scripted_rollout_through_real_tool_and_sandbox(config, tools, tiny_tokenizer):
    server = ScriptedServer(TURNS, tiny_tokenizer)
    out = await run_tool_agent(
        PROMPT,
        server=server,
        tokenizer=tiny_tokenizer,
        tools=tools,
        config=config,
        tools_kwargs={TOOL_NAME: {"create_kwargs": {"ground_truth": "120"}}},
    )
    assert out.num_turns == 4
    assert len(server.calls) == 2
    # verl passes the whole running context on each call: the 2nd prompt extends the 1st.
    assert server.calls[1][: len(server.calls[0])] == server.calls[0]
    # the RL prompt carries the same tool system block the SFT data was rendered with
    sft_style = tiny_tokenizer.apply_chat_template(
        PROMPT, tools=[TOOL_SCHEMA], add_generation_prompt=True, tokenize=False
    )
    assert tiny_tokenizer.decode(server.calls[0]) == sft_style

    ids, mask = out.response_ids, out.response_mask
    assert len(ids) == len(mask)
    runs = spans(mask)
    assert [v for v, _, _ in runs] == [1, 0, 1]  # assistant, tool response, assistant
    decode = tiny_tokenizer.decode
    first, tool, last = (decode(ids[a:b]) for _, a, b in runs)
    assert first == TURNS[0] + "<|im_end|>"
    assert last == TURNS[1] + "<|im_end|>"
    # the sandbox's real output, in the tool-response turn, masked out of the loss
    assert (
        tool == "\n<|im_start|>user\n<tool_response>\n120\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )

    calls = out.extra_fields[TOOL_CALLS_KEY]
    assert [c["status"] for c in calls] == ["Success"] and calls[0]["latency_s"] > 0

    result = score_rollout(out, tiny_tokenizer, "120")
    assert result == {"score": 1.0, "acc": True, "pred": "120", "tool_calls": 1, "tool_errors": 0}
    wrong = score_rollout(out, tiny_tokenizer, "121")
    assert wrong["score"] == pytest.approx(-0.9)  # -1 + (4 - 2) / 2 * 0.1


async def test_box_printed_by_the_tool_is_not_the_answer(config, tools, tiny_tokenizer):
    call = json.dumps({"name": TOOL_NAME, "arguments": {"code": "print('\\\\boxed{7}')"}})
    server = ScriptedServer(
        [f"<tool_call>\n{call}\n</tool_call>", "I am not sure."], tiny_tokenizer
    )
    out = await run_tool_agent(
        PROMPT, server=server, tokenizer=tiny_tokenizer, tools=tools, config=config
    )
    text = tiny_tokenizer.decode(out.response_ids, skip_special_tokens=True)
    assert "\\boxed{7}" in text  # the tool really printed it...
    assert score_rollout(out, tiny_tokenizer, "7")["acc"] is False  # ...but it is not an answer


async def test_hf_generate_server_drives_the_loop_with_the_tiny_model(
    config, tools, tiny_model_dir, tiny_tokenizer
):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    server = HFGenerateServer(model, tiny_tokenizer, max_new_tokens=16)
    out = await run_tool_agent(
        PROMPT,
        server=server,
        tokenizer=tiny_tokenizer,
        tools=tools,
        config=config,
        sampling_params={"temperature": 1.0, "top_p": 1.0, "top_k": -1},
    )
    assert 0 < len(out.response_ids) <= 16
    # a random model emits no valid <tool_call>: one turn, every response token is the model's
    assert (out.num_turns, server.calls) == (2, 1)
    assert all(m == 1 for m in out.response_mask)
    keys = {"score", "acc", "pred", "tool_calls", "tool_errors"}
    assert set(score_rollout(out, tiny_tokenizer, "120")) == keys
