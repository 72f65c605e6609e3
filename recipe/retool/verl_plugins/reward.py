"""The ReTool reward: is the final ``\\boxed{}`` answer mathematically equal to the ground truth?

verl calls :func:`compute_score` once per rollout (``reward.custom_reward_function.path`` =
this file, ``name`` = ``compute_score``; ``reward.custom_reward_function.reward_kwargs`` reach it
as keyword arguments). The policy writes this text, so it is treated as hostile:

* **Bounded work.** Tool blocks (``<tool_response>``, ``<interpreter>``, ``<tool_call>``) are cut
  out first with a linear scan, so a box printed by code never counts as the answer; then only the
  last ``tail_chars`` characters (default 4,000) are searched for the answer. Answers longer than
  ``MAX_ANSWER_CHARS`` are compared as strings only. A 1 MB response scores in milliseconds.
* **No eval.** Numbers are compared with :class:`fractions.Fraction`; everything else goes to
  HF ``math-verify`` (sympy), which handles ``\\frac``/``\\dfrac``, ``\\left(``, units,
  ``^\\circ``, ``x = 5``, ``025`` and friends.
* **Cut-off parsing.** math-verify's timeout is ``signal.alarm``, which only works in the main
  thread, and verl's reward loop calls us from executor threads. In the main thread math-verify
  times itself out; in any other thread the comparison runs in a one-process spawn pool whose
  worker is killed and replaced if it overruns. A timed-out comparison counts as wrong.

Shaping (ReTool, verl PR #3175): +1 correct; −1 wrong, raised for wrong answers that used the tool
to ``min(-0.6, -1 + (num_turns - 2) / 2 * 0.1)`` with ``num_turns`` from ``extra_info`` (absent:
plain −1). The floor keeps "call the tool many times" from becoming a strategy.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import multiprocessing
import re
import threading
from fractions import Fraction
from typing import Any

from recipe.retool.core.constants import TOOL_CALLS_KEY

DEFAULT_TAIL_CHARS = 4000
MAX_ANSWER_CHARS = 300
DEFAULT_TIMEOUT_S = 2
_WORKER_START_TIMEOUT_S = 120.0  # first spawn imports sympy; only paid once per process

# Blocks whose content the model did not write as its answer: code it ran and what that printed.
_EXCLUDED_BLOCKS = (
    ("<tool_response>", "</tool_response>"),
    ("<interpreter>", "</interpreter>"),
    ("<tool_call>", "</tool_call>"),
    ("<code>", "</code>"),
)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE = re.compile(r"\\boxed[ \t]+([^\s${}]+)")
_ANSWER_LINE = re.compile(r"^[ \t*#>_]*answer[ \t*_]*[:：][ \t*_]*(.+?)[ \t*_]*$", re.I | re.M)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def strip_tool_blocks(text: str) -> str:
    """Remove tool calls and tool output (an unclosed block runs to the end). Linear time."""
    for open_tag, close_tag in _EXCLUDED_BLOCKS:
        if open_tag not in text:
            continue
        parts: list[str] = []
        pos = 0
        while True:
            start = text.find(open_tag, pos)
            if start < 0:
                parts.append(text[pos:])
                break
            parts.append(text[pos:start])
            end = text.find(close_tag, start + len(open_tag))
            if end < 0:
                break
            pos = end + len(close_tag)
        text = " ".join(parts)
    return text


def _balanced(text: str, start: int) -> str | None:
    """Content from ``start`` (just after a ``{``) to its matching ``}``; None if unbalanced."""
    depth = 1
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def extract_answer(text: str, tail_chars: int = DEFAULT_TAIL_CHARS) -> str | None:
    """The model's final answer: the last ``\\boxed{..}``/``\\fbox{..}``, else an ``Answer:`` line.

    The *last* box decides: if it is unbalanced (cut off), there is no answer rather than an
    earlier, abandoned one.
    """
    if not text:
        return None
    tail = strip_tool_blocks(text)[-tail_chars:]
    boxes = list(_BOX.finditer(tail))
    bare = list(_BOX_BARE.finditer(tail))
    last_box = boxes[-1] if boxes else None
    last_bare = bare[-1] if bare else None
    if last_bare is not None and (last_box is None or last_bare.start() > last_box.start()):
        return last_bare.group(1).strip() or None
    if last_box is not None:
        content = _balanced(tail, last_box.end())
        return content.strip() if content is not None and content.strip() else None
    lines = list(_ANSWER_LINE.finditer(tail))
    if lines:
        return lines[-1].group(1).strip().strip("$").strip() or None
    return None


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------

_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:!> ]|\\q?quad|~")
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_LATEX_FRAC = re.compile(r"^([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")
# Unit words only after whitespace ("10 cm", not "3m", which may be an expression).
_UNIT_WORDS = re.compile(
    r"(?:\s+(?:square\s+)?(?:units?|cm|meters?|km|degrees?|dollars?|cents?|inches|feet|ways))+$|%$"
)


def normalize(answer: str) -> str:
    """Light normalisation for the exact and numeric fast paths; math-verify does the rest."""
    s = answer.strip().strip("$").strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "").replace("\\%", "%")
    s = _SPACING.sub(" ", s)
    s = _TEXT_CMD.sub(r"\1", s)
    s = _UNIT_WORDS.sub("", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = s.rstrip(".").strip()
    return re.sub(r"\s+", "", s)


def as_number(s: str) -> Fraction | None:
    """Exact value of an int / decimal / ``a/b`` / ``\\frac{a}{b}`` string, else None."""
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    m = _LATEX_FRAC.match(s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if "/" in s:
        num, _, den = s.partition("/")
        a, b = as_number(num), as_number(den)
        return a / b if a is not None and b not in (None, 0) else None
    if not _NUMBER.match(s) or len(s) > 50:
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_equal(gold: str, pred: str, timeout_s: int) -> bool:
    """math-verify on ``\\boxed{}``-wrapped strings, with its own (signal-based) timeouts."""
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout_s)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


class _GuardedVerifier:
    """Runs math-verify in a spawned worker process that can be killed when it overruns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: cf.ProcessPoolExecutor | None = None

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                pool = cf.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn")
                )
                pool.submit(_math_verify_equal, "1", "1", 1).result(_WORKER_START_TIMEOUT_S)
                self._pool = pool
            return self._pool

    def _discard(self, pool: cf.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def equal(self, gold: str, pred: str, timeout_s: int) -> bool:
        pool = self._get_pool()
        future = pool.submit(_math_verify_equal, gold, pred, timeout_s)
        try:
            # math-verify times out parse and verify separately inside the worker; allow both.
            return future.result(timeout=3 * timeout_s + 1)
        except cf.TimeoutError:
            self._discard(pool)
            return False
        except cf.process.BrokenProcessPool:
            self._discard(pool)
            return False

    def close(self) -> None:
        """Shut the worker down at interpreter exit, before module teardown (no stray warnings)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_guarded = _GuardedVerifier()
atexit.register(_guarded.close)


def answers_match(pred: str, ground_truth: str, timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """Mathematical equality of two answer strings; never raises, never runs longer than bounded."""
    a, b = normalize(pred), normalize(str(ground_truth))
    if not a or not b:
        return False
    if a == b:
        return True
    na, nb = as_number(a), as_number(b)
    if na is not None and nb is not None:
        return na == nb
    if len(pred) > MAX_ANSWER_CHARS or len(str(ground_truth)) > MAX_ANSWER_CHARS:
        return False
    try:
        if threading.current_thread() is threading.main_thread():
            return _math_verify_equal(str(ground_truth), pred, timeout_s)
        return _guarded.equal(str(ground_truth), pred, timeout_s)
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# verl entry point
# ---------------------------------------------------------------------------------------------


def shaped_score(
    correct: bool,
    num_turns: int | None,
    *,
    correct_score: float = 1.0,
    wrong_score: float = -1.0,
    turn_bonus: float = 0.1,
    wrong_cap: float = -0.6,
) -> float:
    """+1 / −1, with ReTool's capped bonus for wrong answers that tried the tool."""
    if correct:
        return float(correct_score)
    if num_turns is None or not turn_bonus:
        return float(wrong_score)
    return float(min(wrong_cap, wrong_score + (int(num_turns) - 2) / 2 * turn_bonus))


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    *,
    correct_score: float = 1.0,
    wrong_score: float = -1.0,
    turn_bonus: float = 0.1,
    wrong_cap: float = -0.6,
    tail_chars: int = DEFAULT_TAIL_CHARS,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    **kwargs: Any,
) -> dict[str, Any]:
    """verl custom reward: ``{"score", "acc", "pred", "tool_calls", "tool_errors"}`` (same keys
    every call, since verl stacks them into arrays; verl averages the numbers into its metrics,
    so validation reports tool calls per trajectory and failed calls beside accuracy).
    ``kwargs`` absorbs what verl's reward managers add."""
    pred = extract_answer(solution_str or "", tail_chars)
    acc = pred is not None and answers_match(pred, ground_truth, timeout_s)
    num_turns = (extra_info or {}).get("num_turns")
    calls = list((extra_info or {}).get(TOOL_CALLS_KEY) or [])
    score = shaped_score(
        acc,
        num_turns,
        correct_score=correct_score,
        wrong_score=wrong_score,
        turn_bonus=turn_bonus,
        wrong_cap=wrong_cap,
    )
    return {
        "score": score,
        "acc": bool(acc),
        "pred": pred or "",
        "tool_calls": len(calls),
        "tool_errors": sum(1 for call in calls if call.get("status") != "Success"),
    }
