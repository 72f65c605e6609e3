"""Evaluation metrics: pure functions over per-sample results, no I/O.

Definitions (``n`` samples per problem, ``c`` of them correct; "correct" is the training reward's
``acc``: the last ``\\boxed{}`` of the answer, outside tool blocks, mathematically equal to the
ground truth):

* **mean@n**: ``c / n`` per problem (pass@1 averaged over the ``n`` samples); overall, the mean
  over problems. The ReTool paper and verl's validation report this number.
* **pass@k**: the unbiased estimator of Chen et al. (2021), ``1 - C(n - c, k) / C(n, k)``: the
  chance that at least one of ``k`` samples drawn without replacement from the ``n`` is correct.
  pass@1 equals mean@n; pass@n is "any sample correct".
* **maj@n**: majority vote over the extracted answers. Answers are grouped with the reward's
  matcher (``\\frac{1}{2}`` and ``0.5`` are one vote); samples without an answer do not vote. A tie
  between the largest groups scores the expected value of a uniformly random pick among them
  (e.g. 0.5 for a 2-way tie with one correct group), so the number does not depend on sample order.
  No answer at all scores 0.
* **tool turns**: tool-response rounds of one sample (runs of ``response_mask == 0``, each one a
  round of tool output inserted by verl's ``ToolAgentLoop``); assistant turns are the runs of 1.
* **tool-error rate**: over all code-interpreter calls the tool recorded, the share whose status
  was not ``Success`` or that timed out (user code that raised, time-outs, sandbox errors,
  invalid arguments). Calls the loop rejected before reaching the tool (unknown tool name, arguments
  that are not JSON) are not recorded and therefore not counted.
* **tool-failure rate**: the share of those calls the sandbox failed to run (``SandboxError``,
  ``Unavailable``, ``RequestError``: a wrong token, a dead service), as opposed to the model's
  own code failing. Evaluation refuses a run whose rate passes ``max_tool_failure_rate``.
* **response tokens**: ``len(response_ids)`` (model tokens plus tool output, what verl's
  ``response_length`` budget counts); **generated tokens**: the model's own (mask 1) tokens.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from recipe.retool.verl_plugins.interpreter import SANDBOX_FAILURES

Matcher = Callable[[str, str], bool]


def _default_matcher() -> Matcher:
    from recipe.retool.verl_plugins.reward import answers_match

    return answers_match


# ---------------------------------------------------------------------------------------------
# pass@k and majority vote
# ---------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct."""
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def default_ks(n: int) -> list[int]:
    """The k values reported for ``n`` samples: 1, the powers of two below ``n``, and ``n``."""
    ks = {1, n}
    k = 2
    while k < n:
        ks.add(k)
        k *= 2
    return sorted(ks)


@dataclass(frozen=True)
class MajorityVote:
    answer: str | None  # the winning answer (first seen among tied groups); None: nobody answered
    correct: float  # 1.0 / 0.0, or the expected value over tied groups
    votes: int  # size of the winning group
    tied: int  # number of groups sharing the top vote count (0 when nobody answered)


def majority_vote(
    answers: Sequence[str | None], ground_truth: str, match: Matcher | None = None
) -> MajorityVote:
    """Majority vote over ``answers`` with groups formed by ``match`` (see module docstring)."""
    match = match or _default_matcher()
    counts: dict[str, int] = {}
    for answer in answers:
        if answer is not None and answer.strip():
            key = answer.strip()
            counts[key] = counts.get(key, 0) + 1
    groups: list[list[Any]] = []  # [representative, votes], in first-seen order
    for key, count in counts.items():
        for group in groups:
            if match(key, group[0]):
                group[1] += count
                break
        else:
            groups.append([key, count])
    if not groups:
        return MajorityVote(None, 0.0, 0, 0)
    top = max(votes for _, votes in groups)
    winners = [rep for rep, votes in groups if votes == top]
    right = sum(1 for rep in winners if match(rep, ground_truth))
    return MajorityVote(winners[0], right / len(winners), top, len(winners))


# ---------------------------------------------------------------------------------------------
# Per-sample facts
# ---------------------------------------------------------------------------------------------


def mask_turns(mask: Sequence[int]) -> tuple[int, int]:
    """(assistant turns, tool turns): the runs of 1 and of 0 in a ``response_mask``."""
    runs = {0: 0, 1: 0}
    previous = None
    for value in mask:
        if value != previous:
            runs[1 if value else 0] += 1
            previous = value
    return runs[1], runs[0]


def is_tool_error(call: dict[str, Any]) -> bool:
    """A recorded code-interpreter call that did not run to a clean finish."""
    return call.get("status") != "Success" or bool(call.get("timed_out"))


@dataclass
class SampleResult:
    """One rollout of one problem, as scored by the training reward."""

    problem: int  # position of the problem in the evaluated file
    sample: int
    correct: bool
    score: float  # the shaped training reward (+1, or <= -0.6 when wrong)
    pred: str | None  # the extracted answer
    num_turns: int  # verl's count: user + assistant + tool turns
    assistant_turns: int
    tool_turns: int
    tool_calls: int  # calls the tool recorded
    tool_errors: int
    tool_statuses: list[str] = field(default_factory=list)
    response_tokens: int = 0
    generated_tokens: int = 0
    truncated: bool = False  # hit the response-token budget
    error: str | None = None  # the rollout itself failed (counted as wrong)
    response: str | None = None  # decoded response, when saved


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def tool_failures(samples: Iterable[SampleResult]) -> int:
    """Calls of ``samples`` that the sandbox failed to run (not the model's code failing)."""
    return sum(status in SANDBOX_FAILURES for s in samples for status in s.tool_statuses)


def _sample_stats(samples: Sequence[SampleResult]) -> dict[str, Any]:
    calls = sum(s.tool_calls for s in samples)
    errors = sum(s.tool_errors for s in samples)
    failures = tool_failures(samples)
    return {
        "mean_tool_turns": _mean(s.tool_turns for s in samples),
        "mean_tool_calls": _mean(s.tool_calls for s in samples),
        "tool_use_rate": _mean(float(s.tool_calls > 0) for s in samples),
        "tool_calls": calls,
        "tool_errors": errors,
        "tool_error_rate": _ratio(errors, calls),
        "tool_failures": failures,
        "tool_failure_rate": _ratio(failures, calls),
        "mean_response_tokens": _mean(s.response_tokens for s in samples),
        "mean_generated_tokens": _mean(s.generated_tokens for s in samples),
        "no_answer_rate": _mean(float(not s.pred) for s in samples),
        "truncated_rate": _mean(float(s.truncated) for s in samples),
        "mean_reward": _mean(s.score for s in samples),
        "rollout_errors": sum(1 for s in samples if s.error),
    }


def problem_metrics(
    samples: Sequence[SampleResult],
    ground_truth: str,
    ks: Sequence[int] | None = None,
    match: Matcher | None = None,
) -> dict[str, Any]:
    """Metrics of one problem from its ``n`` samples."""
    n = len(samples)
    if n == 0:
        raise ValueError("a problem needs at least one sample")
    c = sum(1 for s in samples if s.correct)
    vote = majority_vote([s.pred for s in samples], ground_truth, match)
    return {
        "k": n,
        "num_correct": c,
        "mean@k": c / n,
        "pass@k": {str(k): pass_at_k(n, c, k) for k in (ks or default_ks(n)) if k <= n},
        "maj@k": vote.correct,
        "majority_answer": vote.answer,
        "majority_votes": vote.votes,
        **_sample_stats(samples),
    }


def overall_metrics(
    per_problem: Sequence[dict[str, Any]], samples: Sequence[SampleResult]
) -> dict[str, Any]:
    """Accuracy metrics averaged over problems; tool and length statistics pooled over samples."""
    if not per_problem:
        raise ValueError("no problems to aggregate")
    accs = [p["mean@k"] for p in per_problem]
    ks = sorted({int(k) for p in per_problem for k in p["pass@k"]})
    return {
        "num_problems": len(per_problem),
        "num_samples": len(samples),
        "k": max(p["k"] for p in per_problem),
        "mean@k": statistics.fmean(accs),
        # standard error over problems: AIME has 30, so ±0.05 is typical; read diffs with it
        "mean@k_stderr": statistics.stdev(accs) / math.sqrt(len(accs)) if len(accs) > 1 else None,
        "pass@k": {
            str(k): statistics.fmean(
                p["pass@k"][str(k)] for p in per_problem if str(k) in p["pass@k"]
            )
            for k in ks
        },
        "maj@k": statistics.fmean(p["maj@k"] for p in per_problem),
        **_sample_stats(samples),
    }
