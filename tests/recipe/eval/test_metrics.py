"""Evaluation metrics, table-driven: pass@k against brute force, majority vote, turn counting."""

from __future__ import annotations

import itertools
import math

import pytest

from recipe.retool.eval.metrics import (
    SampleResult,
    default_ks,
    is_tool_error,
    majority_vote,
    mask_turns,
    overall_metrics,
    pass_at_k,
    problem_metrics,
)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("n", "c", "k"),
    [(n, c, k) for n in range(1, 8) for c in range(n + 1) for k in range(1, n + 1)],
)
def test_pass_at_k_is_the_combinatorial_probability(n: int, c: int, k: int):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (32, 0, 32, 0.0),
        (32, 1, 32, 1.0),
        (32, 8, 1, 0.25),  # pass@1 is c / n
        (32, 16, 2, 1 - math.comb(16, 2) / math.comb(32, 2)),
    ],
)
def test_pass_at_k_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_inputs(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@pytest.mark.parametrize(
    ("n", "ks"),
    [
        (1, [1]),
        (2, [1, 2]),
        (5, [1, 2, 4, 5]),
        (30, [1, 2, 4, 8, 16, 30]),
        (32, [1, 2, 4, 8, 16, 32]),
    ],
)
def test_default_ks(n, ks):
    assert default_ks(n) == ks


# The real reward matcher groups answers: its exact and numeric fast paths need no sympy here.
@pytest.mark.parametrize(
    ("answers", "truth", "answer", "correct", "votes", "tied"),
    [
        (["5", "5", "3"], "5", "5", 1.0, 2, 1),  # clear majority, right
        (["3", "3", "5"], "5", "3", 0.0, 2, 1),  # clear majority, wrong
        (["\\frac{1}{2}", "0.5", "1/3"], "1/2", "\\frac{1}{2}", 1.0, 2, 1),  # equal forms, 1 vote
        (["5", "3"], "5", "5", 0.5, 1, 2),  # 2-way tie, one right: expected value
        (["3", "5"], "5", "3", 0.5, 1, 2),  # ...whatever the order
        (["1", "2", "3"], "3", "1", 1 / 3, 1, 3),  # 3-way tie
        (["4", "4", "6", "6"], "7", "4", 0.0, 2, 2),  # tie, none right
        ([None, "", "  ", "7"], "7", "7", 1.0, 1, 1),  # empty answers do not vote
        ([None, None, None, "4"], "4", "4", 1.0, 1, 1),  # "no answer" never wins
        ([None, None], "4", None, 0.0, 0, 0),  # nobody answered
        ([], "4", None, 0.0, 0, 0),
    ],
)
def test_majority_vote(answers, truth, answer, correct, votes, tied):
    vote = majority_vote(answers, truth)
    assert (vote.answer, vote.votes, vote.tied) == (answer, votes, tied)
    assert vote.correct == pytest.approx(correct)


def test_majority_vote_uses_the_given_matcher():
    same_parity = lambda a, b: int(a) % 2 == int(b) % 2  # noqa: E731
    vote = majority_vote(["1", "3", "2"], "5", match=same_parity)
    assert (vote.answer, vote.votes, vote.correct) == ("1", 2, 1.0)


@pytest.mark.parametrize(
    ("mask", "turns"),
    [
        ([], (0, 0)),
        ([1, 1, 1], (1, 0)),
        ([1, 1, 0, 0, 1], (2, 1)),
        ([1, 0, 1, 0, 1], (3, 2)),
        ([1, 0], (1, 1)),
    ],
)
def test_mask_turns_counts_assistant_and_tool_runs(mask, turns):
    assert mask_turns(mask) == turns


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ({"status": "Success", "timed_out": False}, False),
        ({"status": "Failed", "run_status": "Finished"}, True),  # user code raised
        ({"status": "Failed", "timed_out": True}, True),
        ({"status": "Success", "timed_out": True}, True),
        ({"status": "SandboxError"}, True),
        ({"status": "Unavailable"}, True),
        ({"status": "InvalidArguments"}, True),
        ({}, True),
    ],
)
def test_is_tool_error(call, error):
    assert is_tool_error(call) is error


def sample(problem, i, correct, pred, calls=0, errors=0, tool_turns=0, tokens=10):
    return SampleResult(
        problem,
        i,
        correct,
        1.0 if correct else -1.0,
        pred,
        2 + 2 * tool_turns,
        tool_turns + 1,
        tool_turns,
        calls,
        errors,
        response_tokens=tokens,
        generated_tokens=tokens // 2,
    )


def test_problem_and_overall_metrics():
    p0 = [sample(0, 0, True, "5", 2, 1, 2, 40), sample(0, 1, False, "4", 1, 0, 1, 20)]
    p1 = [sample(1, 0, False, None), sample(1, 1, False, None)]
    m0 = problem_metrics(p0, "5")
    assert (m0["k"], m0["num_correct"], m0["mean@k"]) == (2, 1, 0.5)
    assert m0["pass@k"] == {"1": 0.5, "2": 1.0}
    assert m0["maj@k"] == 0.5  # "5" vs "4": a tie
    assert (m0["tool_calls"], m0["tool_errors"], m0["tool_error_rate"]) == (
        3,
        1,
        pytest.approx(1 / 3),
    )
    assert m0["mean_tool_turns"] == 1.5 and m0["mean_response_tokens"] == 30
    m1 = problem_metrics(p1, "7")
    assert (m1["mean@k"], m1["maj@k"], m1["majority_answer"]) == (0.0, 0.0, None)
    assert m1["tool_error_rate"] is None and m1["no_answer_rate"] == 1.0

    overall = overall_metrics([m0, m1], p0 + p1)
    assert (overall["num_problems"], overall["num_samples"], overall["k"]) == (2, 4, 2)
    assert overall["mean@k"] == 0.25 and overall["maj@k"] == 0.25
    assert overall["pass@k"] == {"1": 0.25, "2": 0.5}
    assert overall["mean@k_stderr"] == pytest.approx(0.25)  # stdev(0.5, 0) / sqrt(2)
    assert overall["tool_error_rate"] == pytest.approx(1 / 3)  # pooled over calls
    assert overall["tool_use_rate"] == 0.5 and overall["mean_tool_turns"] == 0.75
    assert overall["no_answer_rate"] == 0.5 and overall["rollout_errors"] == 0


def test_metrics_refuse_empty_inputs():
    with pytest.raises(ValueError):
        problem_metrics([], "1")
    with pytest.raises(ValueError):
        overall_metrics([], [])
