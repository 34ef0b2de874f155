"""Win-rate statistics: pairing, length-controlled GLM, kappas, multi-judge combination."""

from __future__ import annotations

import numpy as np
import pytest

from rlhfstack.evaluation.judges import GoldJudge, JudgmentCache
from rlhfstack.evaluation.winrate import (
    answer_lengths,
    cohen_kappa,
    compare,
    cut_at_stop,
    fit_length_controlled,
    fleiss_kappa,
    judge_agreement,
    length_controlled_winrate,
    pair_samples,
)


def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_pair_samples_matches_kth_occurrence_and_counts_unmatched():
    a = [
        {"prompt": "p", "completion": "a1"},
        {"prompt": "q", "completion": "a2"},
        {"prompt": "p", "completion": "a3"},
        {"prompt": "r", "completion": "a4"},
    ]
    b = [
        {"prompt": "q", "completion": "b2"},
        {"prompt": "p", "completion": "b1"},
        {"prompt": "s", "completion": "b9"},
    ]
    ps = pair_samples(a, b)
    assert (
        ps.prompts == ["p", "q"] and ps.answers_a == ["a1", "a2"] and ps.answers_b == ["b1", "b2"]
    )
    assert ps.n_unmatched_a == 2 and ps.n_unmatched_b == 1
    assert ps.difficulty_N is None
    with pytest.raises(ValueError, match="no prompt"):
        pair_samples([{"prompt": "x", "completion": ""}], b)
    d = pair_samples(
        [{"prompt": "p", "completion": "a", "instruction_difficulty": 0.3}],
        [{"prompt": "p", "completion": "b"}],
    )
    np.testing.assert_allclose(d.difficulty_N, [0.3])


def test_lengths_and_stop():
    np.testing.assert_array_equal(answer_lengths(["ab c", ""], "chars"), [4, 0])
    np.testing.assert_array_equal(answer_lengths(["ab c", ""], "words"), [2, 0])
    with pytest.raises(ValueError):
        answer_lengths(["x"], "tokens")
    assert cut_at_stop("hi\n\nHuman: more", ["\n\nHuman:", "zzz"]) == "hi"
    assert cut_at_stop("hi", []) == "hi"


def test_length_controlled_removes_a_pure_length_preference():
    rng = np.random.default_rng(0)
    n = 600
    len_b = rng.integers(50, 150, n).astype(float)
    len_a = len_b + rng.normal(15, 30, n)  # A tends to be longer
    dlen = len_a - len_b
    y = rng.binomial(1, _sig(2.0 * np.tanh(dlen / dlen.std(ddof=1)))).astype(float)
    fit = fit_length_controlled(y, len_a, len_b)
    assert y.mean() > 0.6  # the raw rate rewards verbosity
    assert abs(fit["rate"] - 0.5) < 0.07  # equal lengths: no preference left
    assert fit["coefficients"]["length"] > 1.2 and fit["converged"]
    assert fit["coefficients"]["instruction"] is None


def test_length_controlled_keeps_a_real_quality_difference():
    rng = np.random.default_rng(1)
    n = 600
    len_a, len_b = rng.integers(20, 200, n).astype(float), rng.integers(20, 200, n).astype(float)
    y = rng.binomial(1, _sig(np.full(n, 1.0))).astype(float)
    fit = length_controlled_winrate(y, len_a, len_b, n_boot=50, seed=0)
    assert abs(fit["rate"] - y.mean()) < 0.03
    assert abs(fit["coefficients"]["length"]) < 0.4
    lo, hi = fit["ci95"]
    assert lo < fit["rate"] < hi and hi - lo < 0.15


def test_length_controlled_with_instruction_difficulty():
    rng = np.random.default_rng(2)
    n = 800
    d = rng.normal(0, 1, n)
    len_a, len_b = rng.integers(20, 200, n).astype(float), rng.integers(20, 200, n).astype(float)
    y = rng.binomial(1, _sig(0.5 + 1.0 * d)).astype(float)
    fit = fit_length_controlled(y, len_a, len_b, d)
    assert abs(fit["coefficients"]["instruction"] - 1.0) < 0.3
    assert abs(fit["rate"] - _sig(0.5 + d).mean()) < 0.04


def test_length_controlled_needs_length_differences():
    y = np.array([1.0, 0.0, 0.5])
    assert fit_length_controlled(y, [3, 3, 3], [3, 3, 3]) is None
    assert length_controlled_winrate(y, [1, 2, 3], [1, 2, 3]) is None
    assert fit_length_controlled([1.0], [2], [1]) is None
    # ties only (a file against itself, lengths differing by construction): rate 0.5
    f = fit_length_controlled([0.5] * 4, [1, 5, 2, 8], [3, 1, 2, 4])
    assert abs(f["rate"] - 0.5) < 1e-6


def test_cohen_kappa_textbook_example():
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15  ->  kappa = 0.4
    r1 = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
    r2 = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert cohen_kappa(r1, r2) == pytest.approx(0.4)
    assert cohen_kappa([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)
    assert np.isnan(cohen_kappa([1, 1], [1, 1]))  # chance agreement 1: undefined


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) style table used in many references: 10 items, 14 raters -> kappa 0.210
    counts = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    labels_NJ = [sum(([c] * k for c, k in enumerate(row)), []) for row in counts]
    assert fleiss_kappa(np.array(labels_NJ).T) == pytest.approx(0.210, abs=5e-4)
    # two raters: Fleiss' kappa is close to (not equal to) Cohen's; perfect agreement -> 1
    assert fleiss_kappa([[0, 1, 2, 1], [0, 1, 2, 1], [0, 1, 2, 1]]) == pytest.approx(1.0)


def test_judge_agreement_two_and_three_judges():
    o1 = np.array([1.0, 0.0, 0.5, 1.0])
    o2 = np.array([1.0, 0.0, 0.5, 0.0])
    two = judge_agreement({"x": o1, "y": o2})
    assert two["method"] == "cohen" and two["all_agree"] == 0.75
    three = judge_agreement({"x": o1, "y": o2, "z": o1})
    assert three["method"] == "fleiss" and set(three["pairwise_cohen_kappa"]) == {
        "x|y",
        "x|z",
        "y|z",
    }


def _len_judge(name="len"):
    return GoldJudge(
        lambda p, a: np.array([len(x) for x in a], float),
        identity=name,
        cache=JudgmentCache(None),
        name=name,
    )


def _happy_judge():
    return GoldJudge(
        lambda p, a: np.array(["happy" in x for x in a], float),
        identity="kw",
        cache=JudgmentCache(None),
        name="kw",
    )


def test_self_comparison_is_half_within_ci_and_multi_judge_combination():
    prompts = [f"p{i}" for i in range(40)]
    answers = [("happy " if i % 3 else "sad ") + "x" * (i % 7) for i in range(40)]
    rows = [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)]
    res, _ = compare(pair_samples(rows, rows), {"len": _len_judge()}, n_boot=200, lc_n_boot=0)
    assert res["rate"] == 0.5 and res["ci95"][0] <= 0.5 <= res["ci95"][1]
    assert res["length_controlled_rate"] is None  # lengths never differ

    other = [
        {"prompt": p, "completion": "happy" if i % 2 else "a much longer sad answer"}
        for i, p in enumerate(prompts)
    ]
    res, pairs = compare(
        pair_samples(rows, other),
        {"len": _len_judge(), "kw": _happy_judge()},
        n_boot=200,
        lc_n_boot=20,
    )
    r_len, r_kw = res["per_judge"]["len"]["rate"], res["per_judge"]["kw"]["rate"]
    assert res["rate"] == pytest.approx((r_len + r_kw) / 2)
    assert res["agreement"]["method"] == "cohen"
    assert res["position_consistency"] == 1.0  # pointwise judges only
    assert not res["per_judge"]["len"]["position_consistency_measured"]
    assert res["length_controlled_rate"] is not None
    assert pairs[0]["judges"]["len"]["score_a"] == len(answers[0])
