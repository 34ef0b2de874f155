"""Hand-checked values for rlhfstack.evaluation.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhfstack.data.text_stats import repetition_rate
from rlhfstack.evaluation.metrics import (
    bootstrap_mean_ci,
    distinct_n,
    mean_length_tokens,
    mean_length_words,
    win_outcomes,
    winrate_from_outcomes,
    winrate_with_ci,
)


def test_winrate_self_is_half() -> None:
    scores = np.random.default_rng(0).normal(size=200)
    res = winrate_with_ci(scores, scores)
    assert res["rate"] == 0.5
    assert res["n"] == 200
    lo, hi = res["ci95"]
    assert lo <= 0.5 <= hi


def test_winrate_all_wins_and_all_losses() -> None:
    a = np.arange(10) + 1.0
    b = np.arange(10) + 0.0
    res = winrate_with_ci(a, b)
    assert res["rate"] == 1.0 and res["ci95"] == [1.0, 1.0]
    assert winrate_with_ci(b, a)["rate"] == 0.0


def test_winrate_ties_count_half() -> None:
    # win, tie, loss, tie -> (1 + 0.5 + 0 + 0.5) / 4
    a = [2.0, 1.0, 0.0, 3.0]
    b = [1.0, 1.0, 5.0, 3.0]
    np.testing.assert_array_equal(win_outcomes(a, b), [1.0, 0.5, 0.0, 0.5])
    res = winrate_with_ci(a, b, n_boot=500, seed=1)
    assert res["rate"] == pytest.approx(0.5)
    lo, hi = res["ci95"]
    assert 0.0 <= lo <= res["rate"] <= hi <= 1.0


def test_winrate_ci_deterministic_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    outcomes_small = (rng.random(50) < 0.7).astype(float)
    outcomes_big = (rng.random(2000) < 0.7).astype(float)
    r1 = winrate_from_outcomes(outcomes_small, seed=3)
    r2 = winrate_from_outcomes(outcomes_small, seed=3)
    assert r1 == r2
    big = winrate_from_outcomes(outcomes_big, seed=3)
    assert big["ci95"][1] - big["ci95"][0] < r1["ci95"][1] - r1["ci95"][0]
    assert big["ci95"][0] < 0.7 < big["ci95"][1]


def test_winrate_length_mismatch_and_empty() -> None:
    with pytest.raises(ValueError):
        winrate_with_ci([1.0, 2.0], [1.0])
    res = winrate_with_ci([], [])
    assert res["n"] == 0 and math.isnan(res["rate"])


def test_bootstrap_mean_ci() -> None:
    res = bootstrap_mean_ci([1.0, 2.0, 3.0, 4.0])
    assert res["mean"] == 2.5 and res["n"] == 4
    assert 1.0 <= res["ci95"][0] <= 2.5 <= res["ci95"][1] <= 4.0
    const = bootstrap_mean_ci([7.0] * 5)
    assert const["ci95"] == [7.0, 7.0]


def test_distinct_n() -> None:
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 3 unique / 7
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams: (a b)(b a)(a b) + (a b)(b c) -> 3 unique / 5 (no cross-text bigram)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(["one two"], 3) == 0.0
    assert distinct_n([], 2) == 0.0


def test_repetition_rate() -> None:
    assert repetition_rate("the cat sat on the mat") == 0.0
    # "a b c a b c a b c": 7 trigrams, 3 unique -> 1 - 3/7
    assert repetition_rate("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert repetition_rate("x x x x x", n=1) == pytest.approx(0.8)
    assert repetition_rate("too short") == 0.0


def test_mean_lengths() -> None:
    assert mean_length_words(["a b c", "d", ""]) == pytest.approx(4 / 3)
    assert math.isnan(mean_length_words([]))
    assert mean_length_tokens(["ab", "abcd"], lambda t: list(t)) == 3.0

    class _Tok:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            ids = [ord(c) for c in text.replace(" ", "")]
            return ([1] + ids) if add_special_tokens else ids

    assert mean_length_tokens(["a b", "c"], _Tok()) == 1.5  # special tokens excluded
