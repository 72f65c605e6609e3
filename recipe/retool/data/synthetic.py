"""Synthetic tool-use problems whose answer the code computes: the data a small model learns from.

Real weights are out of reach where this project is developed, and a random-init model never
writes a parsable ``<tool_call>``, so nothing would prove that rewards, advantages, tool-response
loss masks and weight sync are right. These problems close that gap: each one comes with the
Python that solves it, so a cold-start SFT trace (question → ``<tool_call>`` → sandbox output →
``\\boxed{}``) and a DAPO row with its ground truth are both generated, seeded and reproducible.

The families are templates a small transformer can learn to copy from the question into code and
from the tool's output into the answer, with different amounts of rearranging, so that after a
short SFT the model calls the tool almost always but answers right only part of the time at
temperature 1.0: the room DAPO has to improve, measured on held-out problems.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.retool.core.constants import ANSWER_FORMAT, TOOL_SCHEMA
from recipe.retool.data.convert import code_call, rl_row

DATA_SOURCE = "synthetic_tool_math"
CALL_TEXT = "Let me compute this with Python."


@dataclass(frozen=True)
class Problem:
    """One problem: the question, the code that solves it and what that code prints."""

    family: str
    question: str
    code: str
    answer: str


def _product_plus(rng: random.Random) -> Problem:
    a, b, c = rng.randint(11, 99), rng.randint(11, 99), rng.randint(1, 99)
    return Problem(
        "product", f"Compute {a} * {b} + {c}.", f"print({a} * {b} + {c})", str(a * b + c)
    )


def _range_sum(rng: random.Random) -> Problem:
    lo = rng.randint(1, 50)
    hi = lo + rng.randint(5, 60)
    return Problem(
        "range_sum",
        f"What is the sum of the integers from {lo} to {hi}?",
        f"print(sum(range({lo}, {hi} + 1)))",
        str(sum(range(lo, hi + 1))),
    )


def _linear(rng: random.Random) -> Problem:
    a, x, b = rng.randint(2, 19), rng.randint(-40, 40), rng.randint(1, 99)
    c = a * x + b
    return Problem(
        "linear", f"Solve for x: {a}*x + {b} = {c}.", f"print(({c} - {b}) // {a})", str(x)
    )


FAMILIES: dict[str, Callable[[random.Random], Problem]] = {
    "product": _product_plus,
    "range_sum": _range_sum,
    "linear": _linear,
}


def problems(
    n: int,
    seed: int,
    *,
    exclude: frozenset[str] = frozenset(),
    families: tuple[str, ...] = tuple(FAMILIES),
) -> list[Problem]:
    """``n`` distinct problems, ``families`` in turn, none of whose questions is in ``exclude``."""
    rng = random.Random(seed)
    makers = [FAMILIES[name] for name in families]
    seen = set(exclude)
    out: list[Problem] = []
    for maker in _cycle(makers):
        if len(out) == n:
            return out
        problem = maker(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            out.append(problem)
    raise AssertionError("unreachable")


def _cycle(items: list[Callable[[random.Random], Problem]]) -> Iterator[Callable]:
    while True:
        yield from items


def sft_row(problem: Problem) -> dict[str, Any]:
    """The cold-start trace, in the ``{messages, tools}`` shape prep writes for ReTool-SFT."""
    final = (
        f"\\boxed{{{problem.answer}}}"  # one copy of the tool's output: fewer digits to get wrong
    )
    return {
        "messages": [
            {"role": "user", "content": problem.question + ANSWER_FORMAT},
            {"role": "assistant", "content": CALL_TEXT, "tool_calls": code_call(problem.code)},
            {"role": "tool", "content": problem.answer},
            {"role": "assistant", "content": final},
        ],
        "tools": [TOOL_SCHEMA],
    }


def rl_rows(batch: list[Problem], split: str) -> list[dict[str, Any]]:
    """DAPO rows with the same schema as the DAPO-Math and AIME rows."""
    return [
        rl_row(
            data_source=DATA_SOURCE,
            problem=p.question,
            answer=p.answer,
            index=i,
            split=split,
            source_id=f"{p.family}-{i}",
        )
        for i, p in enumerate(batch)
    ]


@dataclass(frozen=True)
class SyntheticSizes:
    sft: int = 2000
    rl_train: int = 1024
    rl_val: int = 64


def write_dataset(
    out: Path,
    sizes: SyntheticSizes = SyntheticSizes(),
    seed: int = 0,
    families: tuple[str, ...] = tuple(FAMILIES),
) -> dict:
    """Write ``sft.parquet``, ``rl_train.parquet`` and ``rl_val.parquet``; validation problems
    never appear in training (SFT or RL). ``families``: which templates (one short family is
    what a CPU can teach the tiny model in CI). Returns the paths by name."""
    from recipe.retool.data.prep import RL_SCHEMA, SFT_SCHEMA, _write_atomic

    val = problems(sizes.rl_val, seed + 1, families=families)
    held_out = frozenset(p.question for p in val)
    train = problems(sizes.sft + sizes.rl_train, seed, exclude=held_out, families=families)
    files = {
        "sft": (out / "sft.parquet", [sft_row(p) for p in train[: sizes.sft]], SFT_SCHEMA),
        "rl_train": (out / "rl_train.parquet", rl_rows(train[sizes.sft :], "train"), RL_SCHEMA),
        "rl_val": (out / "rl_val.parquet", rl_rows(val, "test"), RL_SCHEMA),
    }
    for path, rows, schema in files.values():
        _write_atomic(rows, schema, path)
    return {name: path for name, (path, _, _) in files.items()}
