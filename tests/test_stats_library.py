"""The statistics now computed by scipy / scikit-learn give the numbers of the hand-written code
they replaced, on fixed inputs.

How the pinned constants were produced: each ``OLD_*`` value is the output of the project's own
implementation before the switch (a numpy percentile bootstrap drawing
``np.random.default_rng(seed).integers(0, n, size=(n_boot, n))``, a hand-written Cohen's kappa,
the reliability binning), run on the inputs built by the ``_inputs_*`` functions below with the
arguments shown, and copied here by hand. The bootstrap now resamples through
``scipy.stats.bootstrap`` (``method="percentile"``, paired). With scipy 1.17 it happens to draw
the same indices as the old code (``rng.integers(0, n, (batch, n))`` in the same batches), so
the intervals came out equal to 1e-15; another scipy may draw in another order, so the tests
require only the same point estimate and interval ends within ``CI_TOL`` -- 0.02, against a
standard error of 0.07 on the mean of 200 ~N(0.3, 1) values and 0.03 on a rate over 300
prompts (with 2000 resamples the percentile ends vary by about 0.005 between seeds).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from rlhfstack.evaluation.calibration import reliability_bins
from rlhfstack.evaluation.metrics import bootstrap_ci, bootstrap_mean_ci, winrate_with_ci
from rlhfstack.evaluation.mmlu import alignment_tax
from rlhfstack.evaluation.winrate import cohen_kappa, length_controlled_winrate

CI_TOL = 0.02


def _inputs() -> dict:
    """All fixed inputs, drawn in this order from one generator (the order matters)."""
    rng = np.random.default_rng(123)
    out = {"values": rng.normal(0.3, 1.0, size=200)}
    out["a"], out["b"] = rng.normal(size=300), rng.normal(0.2, 1, size=300)
    x = rng.integers(0, 3, size=100)
    out["x"], out["y"] = x, np.where(rng.random(100) < 0.6, x, rng.integers(0, 3, size=100))
    p = rng.random(500)
    out["probs"], out["outcomes"] = p, (rng.random(500) < p**1.3).astype(float)
    out["policy"] = {f"q{i}": float(rng.random() < 0.6) for i in range(150)}
    out["baseline"] = {f"q{i}": float(rng.random() < 0.65) for i in range(150)}
    return out


def _inputs_lc() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    la = rng.integers(20, 200, size=80).astype(float)
    lb = rng.integers(20, 200, size=80).astype(float)
    p = 1 / (1 + np.exp(-(0.3 + 0.01 * (la - lb))))
    o = (rng.random(80) < p).astype(float)
    o[rng.random(80) < 0.1] = 0.5
    return o, la, lb


# bootstrap_mean_ci(values, n_boot=2000, seed=0)
OLD_MEAN = {"mean": 0.3899065707349509, "ci95": [0.26349386198573405, 0.5137768534592028]}
# winrate_with_ci(a, b, n_boot=2000, seed=0)
OLD_WIN = {"rate": 0.45, "ci95": [0.39666666666666667, 0.5066666666666667]}
# alignment_tax(policy, baseline, n_boot=2000, seed=0)
OLD_TAX = {
    "alignment_tax": 0.04666666666666667,
    "ci95": [-0.05333333333333334, 0.15333333333333332],
    "ci95_normal": [-0.05876521401379351, 0.15209854734712686],
}
# length_controlled_winrate(o, la, lb, n_boot=200, seed=0)
OLD_LC = {"rate": 0.4722272239135634, "ci95": [0.38674594482327096, 0.5860250202275678]}
# cohen_kappa(x, y)
OLD_KAPPA = 0.667974645336553
# reliability_bins(probs, outcomes, 10)["ece"]
OLD_ECE = 0.05170673233331249


def test_bootstrap_mean_ci_matches_the_old_percentile_bootstrap():
    res = bootstrap_mean_ci(_inputs()["values"], n_boot=2000, seed=0)
    assert res["mean"] == OLD_MEAN["mean"] and res["n"] == 200
    np.testing.assert_allclose(res["ci95"], OLD_MEAN["ci95"], atol=CI_TOL)
    # seeded: the same call gives the same interval
    assert bootstrap_mean_ci(_inputs()["values"], n_boot=2000, seed=0) == res


def test_winrate_ci_matches_the_old_one():
    d = _inputs()
    res = winrate_with_ci(d["a"], d["b"], n_boot=2000, seed=0)
    assert res["rate"] == OLD_WIN["rate"]
    np.testing.assert_allclose(res["ci95"], OLD_WIN["ci95"], atol=CI_TOL)


def test_alignment_tax_paired_ci_matches_the_old_one():
    d = _inputs()
    res = alignment_tax(d["policy"], d["baseline"], n_boot=2000, seed=0)
    assert res["alignment_tax"] == OLD_TAX["alignment_tax"]
    assert res["ci95_normal"] == OLD_TAX["ci95_normal"]  # no resampling: identical
    np.testing.assert_allclose(res["ci95"], OLD_TAX["ci95"], atol=CI_TOL)


def test_length_controlled_ci_matches_the_old_one():
    res = length_controlled_winrate(*_inputs_lc(), n_boot=200, seed=0)
    assert res["rate"] == OLD_LC["rate"]
    # 200 refits: the ends are noisier than with 2000 resamples
    np.testing.assert_allclose(res["ci95"], OLD_LC["ci95"], atol=2 * CI_TOL)
    assert length_controlled_winrate(*_inputs_lc(), n_boot=0, seed=0)["ci95"] == pytest.approx(
        [np.nan, np.nan], nan_ok=True
    )


def test_bootstrap_ci_is_paired_and_handles_degenerate_samples():
    # paired: the difference of two identical columns is 0 in every resample
    x = np.arange(50, dtype=float)
    lo, hi = bootstrap_ci((x, x.copy()), lambda a, b, axis: np.mean(a - b, axis=axis), n_boot=200)
    assert lo == hi == 0.0
    # a statistic undefined on some resamples (NaN): left out of the percentiles, no warning
    x = np.arange(30, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lo, hi = bootstrap_ci(
            (x,), lambda v: np.nan if v.mean() > 16 else v.mean(), n_boot=300, vectorized=False
        )
    assert 10 < lo < hi <= 16
    # one item: every resample is that item (as the old code gave)
    assert bootstrap_mean_ci([0.5], n_boot=100)["ci95"] == [0.5, 0.5]
    assert alignment_tax({"a": 1.0}, {"a": 0.0}, n_boot=50)["ci95"] == [-1.0, -1.0]
    # all wins: a percentile interval [1, 1] (BCa would give NaN here)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bootstrap_mean_ci(np.ones(40), n_boot=500)["ci95"] == [1.0, 1.0]


def test_cohen_kappa_is_sklearns_with_the_old_numbers():
    d = _inputs()
    assert cohen_kappa(d["x"], d["y"]) == pytest.approx(OLD_KAPPA, abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the undefined case is NaN, without warnings
        assert np.isnan(cohen_kappa([1, 1, 1], [1, 1, 1]))
    with pytest.raises(ValueError, match="same length"):
        cohen_kappa([0, 1], [0])


def test_ece_keeps_the_old_numbers_and_edge_rule():
    d = _inputs()
    rel = reliability_bins(d["probs"], d["outcomes"], 10)
    assert rel["ece"] == pytest.approx(OLD_ECE, abs=1e-12)
    # a probability on an inner edge goes to the bin above ([lo, hi) bins; sklearn's
    # calibration_curve would put it in the bin below), e.g. 0.5 = sigmoid(0) of a tie
    rel = reliability_bins(np.array([0.5, 0.1]), np.array([1.0, 0.0]), 10)
    assert rel["bins"][5]["n"] == 1 and rel["bins"][1]["n"] == 1
