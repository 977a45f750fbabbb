"""The comparison's statistics against independent float64 computations written here from the
formulas (t quantiles from tables, the df=2 t distribution in closed form, a plain-loop bootstrap)."""

import math

import numpy as np
import pytest

from study.report.statistics import (
    mean_interval,
    paired_difference,
    resample_counts,
    resampled_measure,
    stays_first,
    verdict,
    windowed,
)

# Two-sided 95% Student t quantiles t_{0.975, df}, from a table.
T975 = {1: 12.706204736174707, 2: 4.302652729749464, 4: 2.7764451051977987}


@pytest.mark.parametrize("values", [[0.91, 0.87, 0.95], [0.5, 0.52, 0.49, 0.55, 0.61], [0.1, 0.3]])
def test_a_mean_interval_is_the_t_interval_of_the_mean(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975[n - 1] * std / math.sqrt(n)
    interval = mean_interval(values)
    assert (interval.n, interval.mean, interval.std) == (n, pytest.approx(mean, abs=1e-12),
                                                          pytest.approx(std, abs=1e-12))
    assert (interval.low, interval.high) == (pytest.approx(mean - half, abs=1e-9), pytest.approx(mean + half, abs=1e-9))


def test_one_value_has_a_mean_and_no_interval():
    interval = mean_interval([0.7])
    assert interval.mean == 0.7 and math.isnan(interval.std) and math.isnan(interval.low)


def test_the_paired_test_over_three_seeds_matches_the_closed_form_t_distribution():
    a, b = [0.90, 0.86, 0.93], [0.85, 0.84, 0.86]
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    p = 1 - abs(t) / math.sqrt(t * t + 2)  # two-sided p of Student's t with 2 degrees of freedom
    result = paired_difference(a, b)
    assert result.interval.mean == pytest.approx(mean, abs=1e-12)
    assert result.p_value == pytest.approx(p, rel=1e-9)
    half = T975[2] * sd / math.sqrt(3)
    assert (result.interval.low, result.interval.high) == (pytest.approx(mean - half, abs=1e-9),
                                                           pytest.approx(mean + half, abs=1e-9))


def test_differences_pair_by_position_not_by_value():
    # Each of a's seeds beats b's by exactly 0.01: certain, though the means alone differ little.
    result = paired_difference([0.50, 0.70, 0.90], [0.49, 0.69, 0.89])
    assert result.interval.mean == pytest.approx(0.01) and result.p_value == 0.0


def test_the_verdict_says_ahead_only_when_the_interval_excludes_zero():
    ahead = paired_difference([0.90, 0.91, 0.92], [0.80, 0.82, 0.81])
    assert verdict("CADR", "FixMatch", ahead, "test GM").startswith("CADR is ahead of FixMatch by +10.0 points of "
                                                                    "test GM (95% CI ")
    noisy = paired_difference([0.90, 0.70, 0.95], [0.85, 0.88, 0.80])
    assert verdict("CADR", "FixMatch", noisy, "test GM").startswith(
        "CADR and FixMatch: no difference within the noise of 3 seeds (")
    behind = paired_difference([0.80, 0.82, 0.81], [0.90, 0.91, 0.92])
    assert verdict("CADR", "FixMatch", behind, "test GM").startswith("CADR is behind FixMatch by -10.0 points")


def test_resample_counts_draw_every_row_as_often_as_the_resample_has_rows():
    counts = resample_counts(7, 50, seed=3)
    assert counts.shape == (50, 7) and (counts.sum(axis=1) == 7).all()
    rng = np.random.default_rng(3)
    draws = rng.integers(0, 7, size=(50, 7))
    assert (counts == np.stack([np.bincount(row, minlength=7) for row in draws])).all()


def _plain_measure(predictions, labels, rows, classes, measure):
    """One evaluation on one resample (the row indices drawn), by the definitions in
    trainables/metrics.py, one class at a time."""
    p, y = predictions[rows], labels[rows]
    if measure == "accuracy":
        return float(np.mean(p == y))
    recalls = [float(np.mean(p[y == c] == c)) for c in range(classes) if (y == c).any()]
    if measure == "balanced_accuracy":
        return sum(recalls) / len(recalls)
    floored = [1 / (100 * classes) if r == 0 else r for r in recalls]
    return math.exp(sum(math.log(r) for r in floored) / len(floored))


@pytest.mark.parametrize("measure", ["accuracy", "balanced_accuracy", "gm"])
def test_a_resampled_measure_is_the_measure_of_the_resampled_rows(measure):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=30)
    predictions = np.where(rng.random((3, 30)) < 0.7, labels, rng.integers(0, 4, size=(3, 30)))
    predictions[1, labels == 3] = 0  # a class at 0: the GM's floor
    counts = resample_counts(30, 20, seed=1)
    values = resampled_measure(counts, predictions, labels, 4, measure)
    draws = np.random.default_rng(1).integers(0, 30, size=(20, 30))
    expected = [[_plain_measure(predictions[e], labels, draws[b], 4, measure) for e in range(3)] for b in range(20)]
    np.testing.assert_allclose(values, expected, rtol=1e-12, atol=1e-12)


def test_the_window_is_the_last_evaluation_or_the_median_of_the_last_k():
    values = np.array([[0.1, 0.9, 0.3, 0.5], [0.4, 0.2, 0.8, 0.6]])
    assert windowed(values, "").tolist() == [0.5, 0.6]
    assert windowed(values, "median_10").tolist() == [0.4, 0.5]  # fewer than 10: all of them
    assert windowed(values[:, -3:], "median_10").tolist() == [0.5, 0.6]


def test_stays_first_is_the_share_of_resamples_whose_best_is_the_chosen_one():
    scores = np.array([[0.9, 0.8], [0.7, 0.8], [0.9, 0.9], [0.95, 0.1]])
    assert stays_first(scores, 0, "max") == 0.75  # a tie goes to the first, as a ranking does
    assert stays_first(scores, 1, "min") == 0.5  # rows 1 and 4; the tie in row 3 goes to candidate 0
