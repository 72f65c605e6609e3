"""Pure row mappings from the public source datasets to verl's parquet formats.

Each function takes one source row (a dict in the source's exact schema) and its index, and
returns one verl row, or raises :class:`MalformedRow` naming the index and the reason. Nothing
here reads or writes files, so the same mapping runs on the hub datasets and on test fixtures;
``prep.py`` decides whether a malformed row stops the run or is skipped and counted.

* SFT (``JoeYing/ReTool-SFT``): one ``<code>``/``<interpreter>`` transcript becomes OpenAI-style
  messages (assistant ``tool_calls`` + ``tool`` turns) that verl's ``MultiTurnSFTDataset``
  renders with the model's own chat template, so SFT sees the same tool format as RL.
* RL (``DAPO-Math-17k``) and validation (AIME 2024/2025): verl's RL row (``data_source``,
  ``prompt``, ``ability``, ``reward_model``, ``extra_info``, ``agent_name``). All RL files share
  one schema so verl can concatenate them.
"""

from __future__ import annotations

import re
from typing import Any

from recipe.retool.core.constants import (
    ABILITY,
    AGENT_NAME,
    ANSWER_FORMAT,
    REWARD_STYLE,
    TOOL_NAME,
    TOOL_SCHEMA,
)


class MalformedRow(ValueError):
    """A source row that cannot be mapped without guessing. Carries the row index."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"row {index}: {reason}")
        self.index = index
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# SFT: JoeYing/ReTool-SFT
# ---------------------------------------------------------------------------------------------

QUESTION_MARKER = "*user question:*"
# The fixed tail of every ReTool-SFT user prompt; everything from here on is formatting advice for
# the old <answer> format, which the converted data no longer uses.
QUESTION_TAIL = "Remember to place the final answer in the last part using the format:"

_TAG = re.compile(r"</?(?:code|interpreter|answer)>")
_ANSWER_TAG = re.compile(r"\s*</?answer>\s*")
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_question(user_content: str, index: int) -> str:
    """The bare question in ReTool-SFT's user prompt (wrapper and answer-format tail cut off)."""
    start = user_content.find(QUESTION_MARKER)
    if start < 0:
        raise MalformedRow(index, f"user message has no {QUESTION_MARKER!r} marker")
    question = user_content[start + len(QUESTION_MARKER) :]
    tail = question.find(QUESTION_TAIL)
    if tail >= 0:
        question = question[:tail]
    question = question.replace("<answer>", "").replace("</answer>", "").strip()
    if not question:
        raise MalformedRow(index, "empty question after stripping the prompt wrapper")
    return question


def extract_code(block: str) -> str:
    """The code inside a ``<code>`` block: the first fenced python block, else the raw text."""
    match = _FENCE.search(block)
    code = match.group(1) if match else block
    return code.strip("\n").rstrip()


def code_call(code: str) -> list[dict[str, Any]]:
    """An OpenAI-style ``tool_calls`` list calling the code tool once (arguments as a dict)."""
    return [{"type": "function", "function": {"name": TOOL_NAME, "arguments": {"code": code}}}]


def split_transcript(text: str, index: int) -> list[dict[str, Any]]:
    """Turn ``text <code>..</code> <interpreter>..</interpreter> ... \\boxed{}`` into messages.

    Every ``<code>`` must be closed and followed (after whitespace only) by an ``<interpreter>``
    block; the text after the last interpreter block is the final answer and must contain
    ``\\boxed``. Anything else is malformed: guessing would train the model on a broken format.
    """
    messages: list[dict[str, Any]] = []
    pos = 0
    while True:
        start = text.find("<code>", pos)
        if start < 0:
            break
        end = text.find("</code>", start)
        if end < 0:
            raise MalformedRow(index, f"<code> at char {start} is never closed")
        before = text[pos:start]
        if _TAG.search(before):
            raise MalformedRow(index, f"unexpected tag before <code> at char {start}")
        code = extract_code(text[start + len("<code>") : end])
        if not code.strip():
            raise MalformedRow(index, f"empty <code> block at char {start}")
        after = end + len("</code>")
        interp_start = text.find("<interpreter>", after)
        if interp_start < 0 or text[after:interp_start].strip():
            raise MalformedRow(index, f"<code> at char {start} is not followed by <interpreter>")
        interp_end = text.find("</interpreter>", interp_start)
        if interp_end < 0:
            raise MalformedRow(index, f"<interpreter> at char {interp_start} is never closed")
        output = text[interp_start + len("<interpreter>") : interp_end].strip("\n")
        messages.append(
            {"role": "assistant", "content": before.strip(), "tool_calls": code_call(code)}
        )
        messages.append({"role": "tool", "content": output})
        pos = interp_end + len("</interpreter>")

    final = text[pos:]
    if re.search(r"</?(?:code|interpreter)>", final):
        raise MalformedRow(index, "stray <code>/<interpreter> tag after the last tool call")
    # `<answer>` tags go; the blank line they stood on is kept as one paragraph break.
    final = _ANSWER_TAG.sub("\n\n", final).strip()
    if "\\boxed" not in final:
        raise MalformedRow(index, "final assistant message has no \\boxed{} answer")
    messages.append({"role": "assistant", "content": final})
    return messages


def map_sft_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """ReTool-SFT row (``messages``: user, assistant) → ``{messages, tools}`` for verl SFT."""
    source = row.get("messages")
    if source is None or len(source) != 2:
        n = None if source is None else len(source)
        raise MalformedRow(index, f"expected exactly 2 messages (user, assistant), got {n}")
    user, assistant = source[0], source[1]
    if user.get("role") != "user" or assistant.get("role") != "assistant":
        raise MalformedRow(index, f"roles are {user.get('role')!r}, {assistant.get('role')!r}")
    question = extract_question(user.get("content") or "", index)
    turns = split_transcript(assistant.get("content") or "", index)
    return {"messages": [{"role": "user", "content": question}, *turns], "tools": [TOOL_SCHEMA]}


# ---------------------------------------------------------------------------------------------
# RL: DAPO-Math-17k, AIME 2024, AIME 2025
# ---------------------------------------------------------------------------------------------

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def rl_row(
    *, data_source: str, problem: str, answer: str, index: int, split: str, source_id: str
) -> dict[str, Any]:
    """One verl RL row. The schema is identical for every source so verl can concatenate files.

    ``extra_info.tools_kwargs`` follows verl's convention (``RLHFDataset.__getitem__`` copies it to
    the sample; ``ToolAgentLoop._call_tool`` passes ``tools_kwargs[tool_name]["create_kwargs"]`` to
    ``tool.create``). The code tool needs no per-sample state; the ground truth is passed anyway
    so a tool-side reward or trace can use it, and so the struct is never empty (parquet cannot
    store an empty struct).
    """
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": problem + ANSWER_FORMAT}],
        "ability": ABILITY,
        "reward_model": {"style": REWARD_STYLE, "ground_truth": answer},
        "extra_info": {
            "index": index,
            "split": split,
            "source_id": source_id,
            "need_tools_kwargs": True,
            "tools_kwargs": {TOOL_NAME: {"create_kwargs": {"ground_truth": answer}}},
        },
        "agent_name": AGENT_NAME,
    }


def extract_dapo_problem(content: str, index: int) -> str:
    """The bare problem inside DAPO-Math-17k's fixed prompt template."""
    if not content.startswith(DAPO_PREFIX):
        raise MalformedRow(index, "prompt does not start with the DAPO template prefix")
    if not content.endswith(DAPO_SUFFIX):
        raise MalformedRow(index, "prompt does not end with the DAPO template suffix")
    problem = content[len(DAPO_PREFIX) : len(content) - len(DAPO_SUFFIX)].strip()
    if not problem:
        raise MalformedRow(index, "empty problem")
    return problem


def dapo_prompt_content(row: dict[str, Any], index: int) -> str:
    """The single user turn's text of a DAPO row (also the key for exact-duplicate removal)."""
    prompt = row.get("prompt")
    if prompt is None or len(prompt) != 1 or prompt[0].get("role") != "user":
        raise MalformedRow(index, "prompt must be exactly one user message")
    return prompt[0].get("content") or ""


def _answer_text(value: Any, index: int) -> str:
    if value is None or (isinstance(value, float) and value != value):
        raise MalformedRow(index, "missing answer")
    text = str(value).strip()
    if not text:
        raise MalformedRow(index, "empty answer")
    return text


def map_dapo_row(row: dict[str, Any], index: int, *, split: str = "train") -> dict[str, Any]:
    """DAPO-Math-17k row → verl RL row (problem re-wrapped in our ``\\boxed{}`` format)."""
    problem = extract_dapo_problem(dapo_prompt_content(row, index), index)
    reward_model = row.get("reward_model") or {}
    answer = _answer_text(reward_model.get("ground_truth"), index)
    extra = row.get("extra_info") or {}
    return rl_row(
        data_source=row.get("data_source") or "math_dapo",
        problem=problem,
        answer=answer,
        index=index,
        split=split,
        source_id=str(extra.get("index", index)),
    )


def _aime_row(
    problem: Any, answer: Any, source_id: Any, index: int, data_source: str
) -> dict[str, Any]:
    if not isinstance(problem, str) or not problem.strip():
        raise MalformedRow(index, "empty problem")
    return rl_row(
        data_source=data_source,
        problem=problem.strip(),
        answer=_answer_text(answer, index),
        index=index,
        split="test",
        source_id=str(source_id if source_id is not None else index),
    )


def map_aime_2024_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """Maxwell-Jia/AIME_2024 (``ID``, ``Problem``, ``Solution``, ``Answer`` int) → verl RL row."""
    return _aime_row(row.get("Problem"), row.get("Answer"), row.get("ID"), index, "aime_2024")


def map_aime_2025_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """yentinglin/aime_2025 (``id``, ``problem``, ``answer``) → verl RL row."""
    return _aime_row(row.get("problem"), row.get("answer"), row.get("id"), index, "aime_2025")
