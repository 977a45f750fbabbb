"""Evaluation metrics: top-1 accuracy, per-class accuracy (recall), their geometric mean (GM) and
arithmetic mean (balanced accuracy), and a tracker that reports the last value and the medians
over the last 10 and 20 evaluations, as the paper does. Accuracies are fractions in [0, 1].
Inputs may be torch tensors or numpy arrays; pure functions, no I/O.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from trainables.errors import TrainConfigError

MEDIAN_WINDOWS = (10, 20)

# The names of the evaluation metrics, here and nowhere else: <split>_<measure>[_<window>], e.g.
# valid_balanced_accuracy_median_10 (the validation split's balanced accuracy, median of the last
# 10 evaluations). Every evaluation reports each split's measures and their medians.
EVAL_SPLITS = ("valid", "test")
MEASURES = ("accuracy", "gm", "balanced_accuracy")
WINDOWS = ("", *(f"median_{window}" for window in MEDIAN_WINDOWS))  # "": this evaluation


def metric_name(split: str, measure: str, window: str = "") -> str:
    return f"{split}_{measure}" + (f"_{window}" if window else "")


def rows_name(split: str, what: str) -> str:
    """The key of a split's per-row record in an evaluation's results: valid_predictions,
    valid_labels (packed with `pack_classes`), so that a report can resample the rows."""
    return f"{split}_{what}"


def pack_classes(values) -> str:
    """Class indices (N,) as a short text: "u8:" or "u16:" and the base64 of the array's bytes."""
    values = _as_numpy(values).astype(np.int64).reshape(-1)
    dtype = "u8" if values.size == 0 or values.max() < 256 else "u16"
    return f"{dtype}:" + base64.b64encode(values.astype(np.uint8 if dtype == "u8" else "<u2").tobytes()).decode()


def unpack_classes(text: str) -> np.ndarray:
    """The class indices `pack_classes` packed, as int64."""
    dtype, _, data = text.partition(":")
    return np.frombuffer(base64.b64decode(data), dtype=np.uint8 if dtype == "u8" else "<u2").astype(np.int64)


def class_metric_name(split: str, class_index) -> str:
    """The accuracy (recall) of one class on a split: test_class_accuracy/3."""
    return f"{split}_class_accuracy/{class_index}"


def split_of(metric: str) -> str:
    """The evaluation split a metric is measured on: valid or test."""
    return metric.split("_", 1)[0]


def on_split(metric: str, split: str) -> str:
    """The same measure on another split: on_split("valid_gm_median_10", "test") = test_gm_median_10."""
    return f"{split}_{metric.split('_', 1)[1]}"


METRICS = tuple(metric_name(split, measure, window) for split in EVAL_SPLITS for measure in MEASURES
                for window in WINDOWS)
DEFAULT_SELECTION = ("balanced_accuracy", "median_10")  # what a study selects on, on the validation split


def default_metric(has_validation: bool) -> str:
    """valid_balanced_accuracy_median_10, or its test twin on a split without a validation set."""
    return metric_name("valid" if has_validation else "test", *DEFAULT_SELECTION)


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _predictions(logits_or_preds: Any) -> np.ndarray:
    """(N, C) logits or probabilities -> (N,) argmax; (N,) class indices pass through."""
    values = _as_numpy(logits_or_preds)
    if values.ndim == 2:
        return values.argmax(axis=1)
    if values.ndim == 1:
        return values.astype(np.int64)
    raise ValueError(f"expected (N, C) logits or (N,) predictions, got shape {values.shape}")


def _predictions_and_labels(logits_or_preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    preds = _predictions(logits_or_preds)
    labels = _as_numpy(labels).astype(np.int64).reshape(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"{preds.shape[0]} predictions for {labels.shape[0]} labels")
    return preds, labels


def accuracy(logits_or_preds: Any, labels: Any) -> float:
    """Top-1 accuracy: mean_i [pred_i == y_i], pred = argmax of (N, C) logits or given (N,)
    class indices. NaN for an empty batch."""
    preds, labels = _predictions_and_labels(logits_or_preds, labels)
    return float(np.mean(preds == labels)) if labels.size else float("nan")


def per_class_accuracy(preds: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Recall per class, float64 array of length ``num_classes``:
    ``acc[c] = #{i: y_i = c and pred_i = c} / #{i: y_i = c}``.

    A class with no example in ``labels`` has no defined recall and is reported as NaN
    (``geometric_mean_accuracy`` then skips it). ``preds`` may be (N, C) logits or (N,) indices.
    """
    preds, labels = _predictions_and_labels(preds, labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes})")
    support = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[preds == labels], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, correct / support, np.nan)


def geometric_mean_accuracy(per_class: Any, num_classes: int) -> float:
    """Geometric mean of per-class accuracies, ``(prod_c a_c) ** (1 / C')``, in float64.

    A class at exactly 0 counts as ``1 / (100 * num_classes)`` so the GM stays defined and
    still punishes a collapsed class. NaN entries (classes absent from the evaluation labels)
    are skipped, so C' is the number of present classes; the floor always uses ``num_classes``.
    NaN if no class is present.
    """
    values = _as_numpy(per_class).astype(np.float64).reshape(-1)
    if values.shape[0] != num_classes:
        raise ValueError(f"{values.shape[0]} per-class accuracies for {num_classes} classes")
    present = values[~np.isnan(values)]
    if present.size == 0:
        return float("nan")
    present = np.where(present == 0.0, 1.0 / (100.0 * num_classes), present)
    return float(np.exp(np.mean(np.log(present))))


def balanced_accuracy(per_class: Any) -> float:
    """Mean of the per-class recalls over the classes present (NaN entries skipped).

    Unlike top-1 accuracy it does not depend on how many rows each class has, so it estimates
    accuracy on a class-balanced test set even from an imbalanced evaluation set. NaN if no
    class is present."""
    values = _as_numpy(per_class).astype(np.float64).reshape(-1)
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")


class MetricTracker:
    """Successive evaluations of scalar metrics; per metric it reports ``last``,
    ``median_10`` and ``median_20`` (median over the last 10 / 20 evaluations of that metric,
    or over all of them while fewer exist).

    Only the last ``max(MEDIAN_WINDOWS)`` values of each metric are kept, so the state stays
    small; ``state_dict()`` holds plain Python types and survives checkpointing.
    """

    def __init__(self) -> None:
        self._history: dict[str, list[float]] = {}
        self.num_evaluations = 0

    def update(self, metrics: Mapping[str, float]) -> None:
        """Record one evaluation: metric name -> scalar."""
        for name, value in metrics.items():
            kept = self._history.setdefault(name, [])
            kept.append(float(value))
            del kept[:-max(MEDIAN_WINDOWS)]
        self.num_evaluations += 1

    def last(self, name: str) -> float:
        return self._history[name][-1]

    def median(self, name: str, window: int) -> float:
        """Median of the last ``window`` values of ``name`` (``window`` <= 20)."""
        if not 1 <= window <= max(MEDIAN_WINDOWS):
            raise ValueError(f"window must be in [1, {max(MEDIAN_WINDOWS)}], got {window}")
        return float(np.median(self._history[name][-window:]))

    def summary(self) -> dict[str, dict[str, float]]:
        """``{metric: {"last": .., "median_10": .., "median_20": ..}}`` (Tune flattens it to
        ``metric/last`` etc.)."""
        return {
            name: {"last": self.last(name),
                   **{f"median_{window}": self.median(name, window) for window in MEDIAN_WINDOWS}}
            for name in self._history
        }

    def state_dict(self) -> dict[str, Any]:
        return {"history": {name: list(values) for name, values in self._history.items()},
                "num_evaluations": self.num_evaluations}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            history = {str(name): [float(v) for v in values]
                       for name, values in state["history"].items()}
            num_evaluations = int(state["num_evaluations"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise TrainConfigError(f"metric tracker state: malformed checkpoint ({error!r})") from None
        self._history = history
        self.num_evaluations = num_evaluations
