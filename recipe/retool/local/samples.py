"""Small samples of the four source datasets, in each source's exact schema and file name.

The hub datasets (ReTool-SFT, DAPO-Math-17k, AIME 2024/2025) cannot be downloaded offline, so the
tests and ``make local-smoke`` run the real prep code on these instead. They have the same column
names, nesting, field types and file names as the hub datasets, so
``prep.load_source(..., source_dir=...)`` and the hub path feed the mapping identical Arrow tables.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recipe.retool.data.convert import DAPO_PREFIX, DAPO_SUFFIX

RETOOL_INSTRUCTION = (
    "Solve the following problem step by step. You now have the ability to selectively write "
    "executable Python code to enhance your reasoning process. The Python code will be executed "
    "by an external sandbox, and the output (wrapped in `<interpreter>output_str</interpreter>`) "
    "can be returned to aid your reasoning and help you arrive at the final answer.\n\n"
)
RETOOL_TAIL = (
    "\n\nRemember to place the final answer in the last part using the format: \n<answer>\n"
    "\\boxed{'The final answer goes here.'}\n</answer>"
)


def retool_user(question: str) -> str:
    return f"{RETOOL_INSTRUCTION}*user question:*\n{question}{RETOOL_TAIL}"


def code(src: str) -> str:
    return f"<code>\n```python\n{src}\n```\n</code>"


def interp(out: str) -> str:
    return f"<interpreter>\n{out}\n</interpreter>"


GOOD_TRACE = (
    "Let me compute the sum with Python.\n\n"
    + code("total = sum(range(1, 11))\nprint(total)")
    + "\n"
    + interp("55")
    + "\n\nNow check the square.\n\n"
    + code("55 ** 2")
    + "\n"
    + interp("3025")
    + "\n\nSo the answer is 3025.\n\n<answer>\n\\boxed{3025}\n</answer>"
)
NO_TOOL_TRACE = "Direct reasoning: 2 + 2 = 4.\n\n<answer>\n\\boxed{4}\n</answer>"

RETOOL_ROWS: list[tuple[str, str]] = [
    ("What is (1 + 2 + ... + 10)^2?", GOOD_TRACE),  # 0 good, two tool calls
    ("What is 2 + 2?", NO_TOOL_TRACE),  # 1 good, no tool call
    ("Broken: code without output.", "Try.\n" + code("print(1)") + "\n\\boxed{1}"),  # 2 bad
    ("Broken: no boxed answer.", "The answer is 7.\n<answer>7</answer>"),  # 3 bad
    ("", NO_TOOL_TRACE),  # 4 bad: empty question
    ("Unclosed code", "x\n<code>\n```python\nprint(1)\n"),  # 5 bad
]


def retool_table(rows: list[tuple[str, str]] = RETOOL_ROWS) -> pa.Table:
    msg = pa.struct([("content", pa.string()), ("role", pa.string())])
    messages = [
        [{"content": retool_user(q), "role": "user"}, {"content": a, "role": "assistant"}]
        for q, a in rows
    ]
    return pa.table({"messages": pa.array(messages, type=pa.list_(msg))})


def dapo_prompt(problem: str) -> str:
    return DAPO_PREFIX + problem + DAPO_SUFFIX


DAPO_PROBLEMS: list[tuple[str, str]] = [
    ("Find the smallest positive integer $n$ such that $n^2 > 50$.", "8"),
    ("Compute $3 - 6$.", "-3"),
    ("求 $1+1$ 的值。", "2"),  # some DAPO problems are in Chinese
]


def dapo_table(copies: int = 3, extra: list[dict] | None = None) -> pa.Table:
    """Each problem repeated ``copies`` times (as in the real file), plus optional extra rows."""
    rows = []
    for c in range(copies):
        for k, (problem, answer) in enumerate(DAPO_PROBLEMS):
            rows.append(
                {
                    "data_source": "math_dapo",
                    "prompt": [{"content": dapo_prompt(problem), "role": "user"}],
                    "ability": "MATH",
                    "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
                    "extra_info": {"index": f"00000000-0000-0000-0000-{c:06d}{k:06d}"},
                }
            )
    rows += extra or []
    schema = pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
            ("ability", pa.string()),
            (
                "reward_model",
                pa.struct([("ground_truth", pa.string()), ("style", pa.string())]),
            ),
            ("extra_info", pa.struct([("index", pa.string())])),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def aime_2024_table() -> pa.Table:
    return pa.table(
        {
            "ID": pa.array(["2024-I-1", "2024-II-4"], pa.string()),
            "Problem": pa.array(["Find $x$ if $x+1=26$.", "Compute $2^5$."], pa.string()),
            "Solution": pa.array(["$x=25$", "$32$"], pa.string()),
            "Answer": pa.array([25, 32], pa.int64()),
        }
    )


def aime_2025_table() -> pa.Table:
    return pa.table(
        {
            "id": pa.array(["0", "1"], pa.string()),
            "problem": pa.array(["Find $y$ with $y - 1 = 69$.", "What is $6 \\cdot 7$?"]),
            "answer": pa.array(["70", "42"], pa.string()),
        }
    )


def write_sources(root: Path, *, retool: pa.Table | None = None, dapo: pa.Table | None = None):
    """Lay the fixtures out as ``root/<hub id>/<source file name>`` and return ``root``."""
    files = {
        "JoeYing/ReTool-SFT/train_2000.parquet": retool if retool is not None else retool_table(),
        "BytedTsinghua-SIA/DAPO-Math-17k/data/dapo-math-17k.parquet": (
            dapo if dapo is not None else dapo_table()
        ),
        "Maxwell-Jia/AIME_2024/aime_2024_problems.parquet": aime_2024_table(),
        "yentinglin/aime_2025/train.parquet": aime_2025_table(),
    }
    for rel, table in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    return root
