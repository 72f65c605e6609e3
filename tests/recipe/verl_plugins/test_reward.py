"""The reward, table-driven: extraction, mathematical comparison, shaping, hostile input."""

from __future__ import annotations

import threading
import time

import pytest

from recipe.retool.verl_plugins import reward
from recipe.retool.verl_plugins.reward import compute_score, extract_answer

TR = "<tool_response>"
TR_END = "</tool_response>"

# (id, response, ground truth, expected acc, expected pred)
CASES: list[tuple[str, str, str, bool, str]] = [
    # --- plain boxes -----------------------------------------------------------------------
    ("int", "So \\boxed{42}.", "42", True, "42"),
    ("int-wrong", "So \\boxed{41}.", "42", False, "41"),
    ("negative", "\\boxed{-3}", "-3", True, "-3"),
    ("negative-space", "\\boxed{- 3}", "-3", True, "- 3"),
    ("leading-zeros", "\\boxed{025}", "25", True, "025"),
    ("leading-zeros-gt", "\\boxed{25}", "025", True, "25"),
    ("aime-000", "\\boxed{0}", "000", True, "0"),
    ("space-before-brace", "\\boxed {7}", "7", True, "7"),
    ("fbox", "\\fbox{7}", "7", True, "7"),
    ("bare-boxed", "The answer is \\boxed 7", "7", True, "7"),
    ("dollars", "$\\boxed{12}$", "12", True, "12"),
    ("trailing-period", "\\boxed{12.}", "12", True, "12."),
    ("box-then-text", "\\boxed{5} is final. Done.", "5", True, "5"),
    # --- fractions and decimals ------------------------------------------------------------
    ("frac-vs-slash", "\\boxed{\\frac{1}{2}}", "1/2", True, "\\frac{1}{2}"),
    ("frac-vs-decimal", "\\boxed{\\frac{1}{2}}", "0.5", True, "\\frac{1}{2}"),
    ("dfrac", "\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True, "\\dfrac{3}{4}"),
    ("tfrac", "\\boxed{\\tfrac{3}{4}}", "0.75", True, "\\tfrac{3}{4}"),
    ("frac-shorthand", "\\boxed{\\frac12}", "\\frac{1}{2}", True, "\\frac12"),
    ("slash-vs-decimal", "\\boxed{3/4}", "0.75", True, "3/4"),
    ("decimal-trailing-zero", "\\boxed{2.50}", "2.5", True, "2.50"),
    ("frac-wrong", "\\boxed{\\frac{1}{3}}", "0.5", False, "\\frac{1}{3}"),
    ("neg-frac", "\\boxed{-\\frac{1}{2}}", "-0.5", True, "-\\frac{1}{2}"),
    ("thousands", "\\boxed{1,000}", "1000", True, "1,000"),
    ("sci", "\\boxed{1e3}", "1000", True, "1e3"),
    ("div-zero", "\\boxed{1/0}", "1", False, "1/0"),
    # --- LaTeX decorations -----------------------------------------------------------------
    ("left-right", "\\boxed{\\left(1, 2\\right)}", "(1,2)", True, "\\left(1, 2\\right)"),
    ("spacing", "\\boxed{1\\,000}", "1000", True, "1\\,000"),
    ("degrees", "\\boxed{30^\\circ}", "30", True, "30^\\circ"),
    ("degrees-braced", "\\boxed{30^{\\circ}}", "30", True, "30^{\\circ}"),
    ("text-unit", "\\boxed{10 \\text{ cm}}", "10", True, "10 \\text{ cm}"),
    ("word-unit", "\\boxed{10 dollars}", "10", True, "10 dollars"),
    ("percent", "\\boxed{25\\%}", "25", True, "25\\%"),
    ("assignment", "\\boxed{x = 5}", "5", True, "x = 5"),
    ("assignment-wrong", "\\boxed{x = 6}", "5", False, "x = 6"),
    ("sqrt", "\\boxed{\\frac{\\sqrt 2}{2}}", "\\sqrt{2}/2", True, "\\frac{\\sqrt 2}{2}"),
    ("pi-symbolic", "\\boxed{2\\pi}", "2\\pi", True, "2\\pi"),
    ("pi-not-decimal", "\\boxed{3.14}", "\\pi", False, "3.14"),
    ("polynomial", "\\boxed{(x+1)^2}", "x^2+2x+1", True, "(x+1)^2"),
    (
        "nested-braces",
        "\\boxed{\\frac{\\sqrt{3}}{\\sqrt{4}}}",
        "\\sqrt{3}/2",
        True,
        "\\frac{\\sqrt{3}}{\\sqrt{4}}",
    ),
    ("text-answer", "\\boxed{\\text{two}}", "2", False, "\\text{two}"),
    ("unit-m-math-verify", "\\boxed{3m}", "3", True, "3m"),  # math-verify strips units
    # --- several boxes / where the box is ----------------------------------------------------
    ("last-box-wins", "First \\boxed{3}, corrected: \\boxed{4}", "4", True, "4"),
    ("last-box-wins-wrong", "First \\boxed{4}, corrected: \\boxed{3}", "4", False, "3"),
    ("box-in-tool-response", f"Run.\n{TR}\n\\boxed{{9}}\n{TR_END}\nNo idea.", "9", False, ""),
    ("box-in-tool-response-then-own", f"{TR}\\boxed{{9}}{TR_END} so \\boxed{{8}}", "8", True, "8"),
    ("box-in-interpreter", "<interpreter>\\boxed{9}</interpreter> hmm", "9", False, ""),
    (
        "box-in-tool-call",
        '<tool_call>{"code": "print(\\"\\\\boxed{9}\\")"}</tool_call>',
        "9",
        False,
        "",
    ),
    ("unclosed-tool-response", f"\\boxed{{1}} {TR} \\boxed{{2}}", "1", True, "1"),
    ("box-before-tool-call", "\\boxed{5} <tool_call>x</tool_call> and then", "5", True, "5"),
    # --- Answer: lines ---------------------------------------------------------------------
    ("answer-line", "Work...\nAnswer: 17", "17", True, "17"),
    ("answer-line-bold", "Work...\n**Answer:** 17", "17", True, "17"),
    ("answer-line-dollars", "Work\nAnswer: $\\frac{1}{2}$", "0.5", True, "\\frac{1}{2}"),
    ("answer-line-last", "Answer: 3\nmore\nAnswer: 4", "4", True, "4"),
    ("box-beats-answer-line", "\\boxed{5}\nAnswer: 6", "5", True, "5"),
    # --- malformed / empty -----------------------------------------------------------------
    ("empty", "", "5", False, ""),
    ("no-answer", "I think it is five.", "5", False, ""),
    ("empty-box", "\\boxed{}", "5", False, ""),
    ("whitespace-box", "\\boxed{   }", "5", False, ""),
    ("unbalanced-open", "\\boxed{5", "5", False, ""),
    ("unbalanced-last-wins", "\\boxed{5} then \\boxed{6", "5", False, ""),
    ("extra-close", "\\boxed{5}}}", "5", True, "5"),
    ("boxed-word-only", "\\boxed", "5", False, ""),
    ("gt-empty", "\\boxed{5}", "", False, "5"),
    ("chinese-text", "答案是 \\boxed{2}", "2", True, "2"),
    ("interval-vs-list", "\\boxed{(1,2)}", "[1,2]", False, "(1,2)"),
]


@pytest.mark.parametrize(
    ("response", "truth", "acc", "pred"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_reward_table(response: str, truth: str, acc: bool, pred: str):
    result = compute_score("math_dapo", response, truth, extra_info={})
    expected = {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}
    assert result == {**expected, "tool_calls": 0, "tool_errors": 0}


def test_table_is_big_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize(
    ("num_turns", "expected"),
    [(None, -1.0), (2, -1.0), (3, -0.95), (4, -0.9), (6, -0.8), (10, -0.6), (40, -0.6)],
)
def test_wrong_answer_shaping_rewards_tool_use_up_to_a_floor(num_turns, expected):
    extra = {} if num_turns is None else {"num_turns": num_turns}
    result = compute_score("math_dapo", "\\boxed{1}", "2", extra)
    assert result["score"] == pytest.approx(expected)
    assert compute_score("math_dapo", "\\boxed{2}", "2", extra)["score"] == 1.0


def test_shaping_is_configurable_through_kwargs():
    kw = {"correct_score": 2.0, "wrong_score": 0.0, "turn_bonus": 0.0, "wrong_cap": 0.0}
    assert compute_score("x", "\\boxed{2}", "2", {"num_turns": 8}, **kw)["score"] == 2.0
    assert compute_score("x", "\\boxed{3}", "2", {"num_turns": 8}, **kw)["score"] == 0.0
    # verl's reward managers may pass extra keyword arguments; they are ignored.
    assert compute_score("x", "\\boxed{2}", "2", None, reward_router_address=None)["acc"]


def test_tail_bound_is_documented_behaviour():
    text = "\\boxed{7}" + " " * 10_000
    assert extract_answer(text) is None
    assert extract_answer(text, tail_chars=20_000) == "7"


def test_one_megabyte_hostile_response_is_fast():
    hostile = [
        "{" * 1_000_000,
        "\\boxed{" * 100_000,
        TR * 60_000 + "\\boxed{1}",
        (TR + "x" + TR_END) * 40_000 + "\\boxed{1}",
        "a" * 999_990 + "\\boxed{1}",
        "Answer:" * 140_000,
    ]
    for text in hostile:
        start = time.perf_counter()
        compute_score("math_dapo", text, "1")
        assert time.perf_counter() - start < 0.5, text[:30]


def test_pathological_math_is_cut_off_in_main_thread():
    start = time.perf_counter()
    result = compute_score("math_dapo", "\\boxed{9^{9^{9^{9}}}}", "1", timeout_s=1)
    assert result["acc"] is False
    assert time.perf_counter() - start < 4


def test_worker_thread_uses_a_killable_process_and_still_answers():
    """verl calls the reward from executor threads, where signal timeouts cannot work."""
    results: dict[str, dict] = {}

    def run() -> None:
        results["slow"] = compute_score("x", "\\boxed{9^{9^{9^{9}}}}", "1", timeout_s=1)
        results["sym"] = compute_score("x", "\\boxed{(x+1)^2}", "x^2+2x+1", timeout_s=1)

    start = time.perf_counter()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert results["slow"]["acc"] is False
    assert results["sym"]["acc"] is True
    # spawn start-up (sympy import) dominates; the hang itself is bounded by 3*timeout+1.
    assert time.perf_counter() - start < 60


def test_overrunning_worker_is_killed_and_replaced():
    verifier = reward._GuardedVerifier()
    assert verifier.equal("1/2", "0.5", 1) is True
    first = verifier._pool
    proc = next(iter(first._processes.values()))
    # A hang that math-verify's own alarm cannot interrupt: the worker is busy sleeping.
    first.submit(time.sleep, 30)
    start = time.perf_counter()
    assert verifier.equal("1", "1", 1) is False  # queued behind the sleep -> times out
    assert time.perf_counter() - start < 10
    proc.join(timeout=10)
    assert not proc.is_alive()
    assert verifier._pool is None
    assert verifier.equal("2", "4/2", 1) is True  # a fresh worker
    verifier._discard(verifier._pool)
