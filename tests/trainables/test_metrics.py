"""Specification of the evaluation metrics (trainables/metrics.py)."""

import json
import math

import numpy as np
import pytest
import torch

from trainables.errors import TrainConfigError
from trainables.metrics import MetricTracker, accuracy, balanced_accuracy, geometric_mean_accuracy, per_class_accuracy

# Worked by hand: rows 0, 1, 3, 5 are right -> accuracy 4/6.
# class 0: rows 0, 5 both right -> 1; class 1: rows 1 (right), 2 (wrong) -> 1/2;
# class 2: rows 3 (right), 4 (wrong) -> 1/2; class 3: absent -> NaN.
PREDS = [0, 1, 2, 2, 1, 0]
LABELS = [0, 1, 1, 2, 2, 0]


def test_accuracy_of_predictions_is_fraction_correct():
    assert accuracy(torch.tensor(PREDS), torch.tensor(LABELS)) == pytest.approx(4 / 6)
    assert accuracy(np.array(PREDS), np.array(LABELS)) == pytest.approx(4 / 6)


def test_accuracy_of_logits_uses_argmax():
    logits = torch.full((6, 3), -1.0)
    logits[torch.arange(6), torch.tensor(PREDS)] = 2.0
    assert accuracy(logits, torch.tensor(LABELS)) == pytest.approx(4 / 6)


def test_per_class_accuracy_is_recall_and_nan_for_absent_class():
    result = per_class_accuracy(torch.tensor(PREDS), torch.tensor(LABELS), num_classes=4)
    np.testing.assert_allclose(result[:3], [1.0, 0.5, 0.5])
    assert math.isnan(result[3])


def test_geometric_mean_with_a_class_at_zero_uses_floor_1_over_100c():
    per_class = [0.5, 0.0, 0.8, 1.0]
    expected = np.prod(np.array([0.5, 1.0 / 400.0, 0.8, 1.0], dtype=np.float64)) ** (1.0 / 4)
    assert geometric_mean_accuracy(np.array(per_class), 4) == pytest.approx(expected, rel=1e-12)
    assert geometric_mean_accuracy(torch.tensor(per_class), 4) == pytest.approx(expected, rel=1e-6)


def test_geometric_mean_of_all_perfect_classes_is_one():
    assert geometric_mean_accuracy(np.ones(10), 10) == pytest.approx(1.0)


def test_geometric_mean_skips_absent_classes_but_floors_with_all_classes():
    per_class = np.array([0.0, np.nan, 0.8])
    expected = (1.0 / 300.0 * 0.8) ** 0.5
    assert geometric_mean_accuracy(per_class, 3) == pytest.approx(expected, rel=1e-12)


def test_geometric_mean_from_hand_worked_per_class_accuracy():
    per_class = per_class_accuracy(PREDS, LABELS, num_classes=4)
    assert geometric_mean_accuracy(per_class, 4) == pytest.approx((1.0 * 0.5 * 0.5) ** (1 / 3))


def test_balanced_accuracy_is_the_mean_recall_of_the_present_classes():
    per_class = per_class_accuracy(PREDS, LABELS, num_classes=4)
    assert balanced_accuracy(per_class) == pytest.approx((1.0 + 0.5 + 0.5) / 3, abs=1e-15)
    assert math.isnan(balanced_accuracy([np.nan, np.nan]))


def test_balanced_accuracy_does_not_depend_on_how_many_rows_each_class_has():
    # Class 0 repeated 10 times over: plain accuracy follows the head class, balanced accuracy not.
    preds, labels = np.array(PREDS), np.array(LABELS)
    head = labels == 0
    heavy_preds = np.concatenate([preds] + [preds[head]] * 10)
    heavy_labels = np.concatenate([labels] + [labels[head]] * 10)
    assert accuracy(heavy_preds, heavy_labels) == pytest.approx(24 / 26)
    assert balanced_accuracy(per_class_accuracy(heavy_preds, heavy_labels, 4)) == pytest.approx(2 / 3, abs=1e-15)


def _evaluations(count):
    # A rising trend plus noise, so windows of different lengths have different medians.
    rng = np.random.default_rng(count)
    accuracy_values = np.linspace(0.1, 0.9, count) + rng.normal(0, 0.05, count)
    return [{"accuracy": float(a), "gm": float(a) / 2} for a in accuracy_values]


@pytest.mark.parametrize("count", [3, 10, 25])
def test_tracker_reports_last_and_medians_of_last_10_and_20(count):
    evaluations = _evaluations(count)
    tracker = MetricTracker()
    for evaluation in evaluations:
        tracker.update(evaluation)
    summary = tracker.summary()
    assert set(summary) == {"accuracy", "gm"}
    for name in ("accuracy", "gm"):
        values = np.array([e[name] for e in evaluations])
        assert summary[name]["last"] == values[-1]
        assert summary[name]["median_10"] == pytest.approx(np.median(values[-10:]), abs=0)
        assert summary[name]["median_20"] == pytest.approx(np.median(values[-20:]), abs=0)
    if count == 25:  # the windows must matter
        values = np.array([e["accuracy"] for e in evaluations])
        assert summary["accuracy"]["median_10"] != pytest.approx(np.median(values[-20:]))
        assert summary["accuracy"]["median_20"] != pytest.approx(np.median(values))
    assert tracker.num_evaluations == count


def test_tracker_state_round_trips_through_json_and_keeps_windows():
    tracker = MetricTracker()
    for evaluation in _evaluations(25):
        tracker.update(evaluation)
    state = json.loads(json.dumps(tracker.state_dict()))
    restored = MetricTracker()
    restored.load_state_dict(state)
    assert restored.summary() == tracker.summary()
    assert restored.num_evaluations == 25
    for next_evaluation in ({"accuracy": 0.99, "gm": 0.5}, {"accuracy": 0.01, "gm": 0.1}):
        tracker.update(next_evaluation)
        restored.update(next_evaluation)
        assert restored.summary() == tracker.summary()


def test_tracker_rejects_malformed_state():
    with pytest.raises(TrainConfigError, match="metric tracker state"):
        MetricTracker().load_state_dict({"history": {"accuracy": ["high"]}, "num_evaluations": 1})
