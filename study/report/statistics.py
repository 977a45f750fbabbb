"""The statistics of a comparison (docs/method.md, "Comparing methods"): means with t-based 95%
confidence intervals, paired differences over seeds with a paired t-test, and a bootstrap of the
validation rows that recomputes a metric from each evaluation's stored predictions."""

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean, sample std (n - 1) and the t-based confidence interval of the mean."""

    mean: float
    std: float  # NaN with one value
    low: float  # NaN with one value
    high: float
    n: int


def mean_interval(values, level: float = LEVEL) -> Interval:
    """mean ± t_{(1 + level) / 2, n - 1} * std / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(values.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, math.nan, n)
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, mean - half, mean + half, n)


@dataclass(frozen=True)
class PairedDifference:
    """The mean of a - b over paired seeds, its confidence interval and the paired t-test's
    two-sided p-value (NaN with fewer than two pairs)."""

    interval: Interval
    p_value: float


def paired_difference(a, b, level: float = LEVEL) -> PairedDifference:
    differences = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    interval = mean_interval(differences, level)
    if interval.n < 2:
        return PairedDifference(interval, math.nan)
    if interval.std == 0:  # identical differences: certain, or no difference at all
        return PairedDifference(interval, 1.0 if interval.mean == 0 else 0.0)
    t = interval.mean / (interval.std / math.sqrt(interval.n))
    return PairedDifference(interval, float(2 * stats.t.sf(abs(t), interval.n - 1)))


def verdict(leader: str, other: str, difference: PairedDifference, what: str, points: float = 100) -> str:
    """One plain sentence: ahead (or behind) when the confidence interval excludes 0, else no
    difference within the noise of the seeds. Differences are fractions, said in points."""
    d = difference.interval
    if d.n < 2:
        return f"{leader} against {other}: one seed only, no verdict on {what}."
    span = f"{points * d.mean:+.1f} points of {what} (95% CI {points * d.low:+.1f} to {points * d.high:+.1f})"
    if d.low > 0:
        return f"{leader} is ahead of {other} by {span}."
    if d.high < 0:
        return f"{leader} is behind {other} by {span}."
    return f"{leader} and {other}: no difference within the noise of {d.n} seeds ({span})."


# --- the bootstrap of the validation rows ---------------------------------------------------------


def resample_counts(rows: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, rows): how often each row is drawn in each bootstrap resample."""
    draws = np.random.default_rng(seed).integers(0, rows, size=(resamples, rows))
    counts = np.zeros((resamples, rows), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(resamples), rows), draws.ravel()), 1.0)
    return counts


def resampled_measure(counts: np.ndarray, predictions: np.ndarray, labels: np.ndarray, num_classes: int,
                      measure: str) -> np.ndarray:
    """(resamples, evaluations): `measure` (accuracy, gm or balanced_accuracy, as
    trainables/metrics.py defines them) of each evaluation's predictions (evaluations, rows) on
    each resample of the rows (`counts`, from `resample_counts`)."""
    correct = (predictions == labels[None, :]).astype(np.float64)  # (E, n)
    if measure == "accuracy":
        return counts @ correct.T / counts.sum(axis=1, keepdims=True)
    onehot = np.eye(num_classes)[labels]  # (n, C)
    support = counts @ onehot  # (B, C)
    hits = np.einsum("bn,en,nc->bec", counts, correct, onehot)  # (B, E, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support[:, None, :] > 0, hits / support[:, None, :], np.nan)
    if measure == "balanced_accuracy":
        return np.nanmean(recall, axis=2)
    floored = np.where(recall == 0.0, 1.0 / (100.0 * num_classes), recall)
    return np.exp(np.nanmean(np.log(floored), axis=2))


def windowed(values: np.ndarray, window: str) -> np.ndarray:
    """(B, E) -> (B,): the last evaluation (window ""), or the median of the last k (median_k)."""
    if not window:
        return values[:, -1]
    k = int(window.removeprefix("median_"))
    return np.median(values[:, -k:], axis=1)


def stays_first(scores: np.ndarray, chosen: int, mode: str) -> float:
    """The share of resamples (rows of `scores`, (B, candidates)) in which candidate `chosen`
    scores best (ties to the first, as a ranking does)."""
    best = scores.argmax(axis=1) if mode == "max" else scores.argmin(axis=1)
    return float(np.mean(best == chosen))
