"""Row mappings: each source row becomes exactly the verl row the recipe specifies, or an error."""

from __future__ import annotations

import pytest

from recipe.retool.core.constants import AGENT_NAME, ANSWER_FORMAT, TOOL_NAME, TOOL_SCHEMA
from recipe.retool.data.convert import (
    MalformedRow,
    extract_code,
    map_aime_2024_row,
    map_aime_2025_row,
    map_dapo_row,
    map_sft_row,
)
from recipe.retool.local.samples import GOOD_TRACE, code, dapo_prompt, interp, retool_user


def sft(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"content": retool_user(question), "role": "user"},
            {"content": answer, "role": "assistant"},
        ]
    }


def call(code_text: str) -> list[dict]:
    return [{"type": "function", "function": {"name": TOOL_NAME, "arguments": {"code": code_text}}}]


def test_sft_full_trace_maps_to_alternating_tool_turns():
    row = map_sft_row(sft("What is (1 + 2 + ... + 10)^2?", GOOD_TRACE), 0)
    assert row["tools"] == [TOOL_SCHEMA]
    assert row["messages"] == [
        {"role": "user", "content": "What is (1 + 2 + ... + 10)^2?"},
        {
            "role": "assistant",
            "content": "Let me compute the sum with Python.",
            "tool_calls": call("total = sum(range(1, 11))\nprint(total)"),
        },
        {"role": "tool", "content": "55"},
        {"role": "assistant", "content": "Now check the square.", "tool_calls": call("55 ** 2")},
        {"role": "tool", "content": "3025"},
        {"role": "assistant", "content": "So the answer is 3025.\n\n\\boxed{3025}"},
    ]


def test_sft_user_wrapper_and_answer_tail_are_stripped():
    row = map_sft_row(sft("Line one\n\nLine two $x^2$", "\\boxed{1}"), 7)
    assert row["messages"][0] == {"role": "user", "content": "Line one\n\nLine two $x^2$"}
    assert row["messages"][-1] == {"role": "assistant", "content": "\\boxed{1}"}


def test_sft_code_directly_at_start_has_empty_content_and_keeps_output_whitespace():
    answer = code("for i in range(2):\n    print(i)") + interp("0\n1") + "Done: \\boxed{1}"
    msgs = map_sft_row(sft("q", answer), 0)["messages"]
    assert msgs[1]["content"] == ""
    assert msgs[1]["tool_calls"] == call("for i in range(2):\n    print(i)")
    assert msgs[2] == {"role": "tool", "content": "0\n1"}


def test_sft_code_without_fence_uses_raw_text():
    assert extract_code("\nprint(1)\n") == "print(1)"
    assert extract_code("\n```python\nx = 1\nprint(x)\n```\n") == "x = 1\nprint(x)"
    assert extract_code("```py\nprint(2)\n```") == "print(2)"


@pytest.mark.parametrize(
    ("question", "answer", "reason"),
    [
        ("q", "Try.\n" + code("print(1)") + "\n\\boxed{1}", "not followed by <interpreter>"),
        (
            "q",
            "Try.\n" + code("print(1)") + "\ntext\n" + interp("1") + "\\boxed{1}",
            "not followed",
        ),
        ("q", "x\n<code>\n```python\nprint(1)\n", "never closed"),
        ("q", code("print(1)") + interp("1") + "<interpreter>\n2", "stray"),
        ("q", code("print(1)") + "<interpreter>\n1\n\\boxed{1}", "never closed"),
        ("q", code("   ") + interp("") + "\\boxed{1}", "empty <code>"),
        ("q", "The answer is 7.\n<answer>7</answer>", "no .boxed"),
        ("q", "", "no .boxed"),
        ("", "\\boxed{1}", "empty question"),
        ("  \n ", "\\boxed{1}", "empty question"),
    ],
)
def test_sft_malformed_rows_raise_with_index(question, answer, reason):
    with pytest.raises(MalformedRow, match=reason) as info:
        map_sft_row(sft(question, answer), 41)
    assert info.value.index == 41
    assert str(info.value).startswith("row 41:")


@pytest.mark.parametrize(
    "row",
    [
        {"messages": [{"role": "user", "content": retool_user("q")}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        {
            "messages": [
                {"role": "user", "content": "no marker"},
                {"role": "assistant", "content": "\\boxed{1}"},
            ]
        },
        {},
    ],
)
def test_sft_wrong_shape_raises(row):
    with pytest.raises(MalformedRow):
        map_sft_row(row, 3)


def dapo(problem: str, answer: str = "-3", prompt: str | None = None) -> dict:
    return {
        "data_source": "math_dapo",
        "prompt": [
            {"content": prompt if prompt is not None else dapo_prompt(problem), "role": "user"}
        ],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "9a8b-uuid"},
    }


def test_dapo_row_is_rewrapped_in_boxed_format():
    row = map_dapo_row(dapo("Compute $3 - 6$."), 12)
    assert row == {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": "Compute $3 - 6$." + ANSWER_FORMAT}],
        "ability": "MATH",
        "reward_model": {"style": "rule", "ground_truth": "-3"},
        "extra_info": {
            "index": 12,
            "split": "train",
            "source_id": "9a8b-uuid",
            "need_tools_kwargs": True,
            "tools_kwargs": {TOOL_NAME: {"create_kwargs": {"ground_truth": "-3"}}},
        },
        "agent_name": AGENT_NAME,
    }
    assert "Answer:" not in row["prompt"][0]["content"]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (dapo("x", prompt="Just a question without template"), "prefix"),
        (dapo("x", prompt=dapo_prompt("x")[:-5]), "suffix"),
        (dapo("   "), "empty problem"),
        (dapo("ok", answer=""), "empty answer"),
        ({**dapo("ok"), "reward_model": {"style": "x"}}, "missing answer"),
        ({**dapo("ok"), "prompt": []}, "exactly one user message"),
    ],
)
def test_dapo_malformed_rows_raise(row, reason):
    with pytest.raises(MalformedRow, match=reason):
        map_dapo_row(row, 5)


def test_aime_rows_share_the_rl_format():
    r24 = map_aime_2024_row(
        {"ID": "2024-II-4", "Problem": " Find x. ", "Solution": "...", "Answer": 25}, 3
    )
    r25 = map_aime_2025_row({"id": 7, "problem": "Find y.", "answer": "070"}, 0)
    assert r24["data_source"] == "aime_2024"
    assert r24["prompt"][0]["content"] == "Find x." + ANSWER_FORMAT
    assert r24["reward_model"]["ground_truth"] == "25"
    assert r24["extra_info"]["source_id"] == "2024-II-4"
    assert r24["extra_info"]["split"] == "test"
    assert r25["reward_model"]["ground_truth"] == "070"  # kept verbatim; the reward equates 070=70
    assert r25["extra_info"]["source_id"] == "7"
    assert r24.keys() == r25.keys()
    assert r24["extra_info"].keys() == r25["extra_info"].keys()


@pytest.mark.parametrize(
    "row",
    [
        {"ID": "a", "Problem": "", "Answer": 1},
        {"ID": "a", "Problem": "p", "Answer": None},
        {"ID": "a", "Problem": None, "Answer": 1},
    ],
)
def test_aime_malformed_rows_raise(row):
    with pytest.raises(MalformedRow):
        map_aime_2024_row(row, 9)
