"""Synthetic tool-use problems: the code really computes the answer, and validation is held out."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pyarrow.parquet as pq

from recipe.retool.core.constants import ANSWER_FORMAT, TOOL_NAME
from recipe.retool.data import synthetic
from recipe.retool.data.prep import RL_SCHEMA, SFT_SCHEMA


def run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})
    return out.getvalue().strip()


def test_every_problems_code_prints_its_answer() -> None:
    batch = synthetic.problems(60, seed=3)
    assert {p.family for p in batch} == set(synthetic.FAMILIES)
    for p in batch:
        assert run(p.code) == p.answer, p


def test_dataset_holds_validation_out_and_matches_preps_schemas(tmp_path: Path) -> None:
    sizes = synthetic.SyntheticSizes(sft=40, rl_train=20, rl_val=12)
    files = synthetic.write_dataset(tmp_path, sizes, seed=1)
    sft, train, val = (pq.read_table(files[k]) for k in ("sft", "rl_train", "rl_val"))
    assert (sft.num_rows, train.num_rows, val.num_rows) == (40, 20, 12)
    assert sft.schema.equals(SFT_SCHEMA) and val.schema.equals(RL_SCHEMA)
    questions = lambda t: {row["prompt"][0]["content"] for row in t.to_pylist()}  # noqa: E731
    sft_questions = {row["messages"][0]["content"] for row in sft.to_pylist()}
    assert not questions(val) & (questions(train) | sft_questions)
    assert synthetic.write_dataset(tmp_path / "again", sizes, seed=1)  # same seed, same data
    assert pq.read_table(tmp_path / "again" / "rl_val.parquet").equals(val)


def test_sft_trace_is_question_call_output_answer(tiny_tokenizer) -> None:
    problem = synthetic.problems(1, seed=0)[0]
    row = synthetic.sft_row(problem)
    user, call, tool, final = row["messages"]
    assert user["content"] == problem.question + ANSWER_FORMAT  # the RL prompt, verbatim
    assert call["tool_calls"][0]["function"] == {
        "name": TOOL_NAME,
        "arguments": {"code": problem.code},
    }
    assert tool["content"] == problem.answer and final["content"] == f"\\boxed{{{problem.answer}}}"
    text = tiny_tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    assert f'"arguments": {{"code": "{problem.code}"}}' in text
