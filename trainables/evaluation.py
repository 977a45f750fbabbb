"""Evaluation of the EMA model: predictions, the metrics of each evaluation split (names from
trainables/metrics.py) with their medians, and the progress line the loop prints."""

from math import nan

import torch

from trainables.config import TrainConfig
from trainables.metrics import (
    MEASURES,
    accuracy,
    balanced_accuracy,
    class_metric_name,
    geometric_mean_accuracy,
    metric_name,
    pack_classes,
    per_class_accuracy,
    rows_name,
)
from trainables.step import TrainState, normalize, solid_image, to_unit_float


@torch.no_grad()
def predict(model, images, device, *, batch_size=1024, channels_last=True, method=None) -> torch.Tensor:
    """Class predictions for uint8 NHWC images (numpy or tensor), in eval mode. With a `method`, from
    its `test_logits` of the model's outputs (its auxiliary head, or the logits less those of a
    solid white image, docs/method.md); else from the model's logits."""
    was_training = model.training
    model.eval()
    images = torch.as_tensor(images)
    solid = None
    if method is not None and method.solid_probe:
        shape = images.shape[1:]
        solid = model(solid_image(shape, device).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format))
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = to_unit_float(images[start:start + batch_size].to(device))
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        logits = model(normalize(batch))
        if method is not None:
            logits = method.test_logits(logits, solid)
        predictions.append(logits.argmax(dim=1))
    model.train(was_training)
    return torch.cat(predictions)


def evaluate(model, images, labels, num_classes, device, **kwargs) -> dict:
    """Top-1 accuracy, per-class accuracy, their geometric mean (GM) and their mean (balanced
    accuracy), as plain floats."""
    predictions = predict(model, images, device, **kwargs).cpu()
    labels = torch.tensor(labels).cpu()  # a copy: arrays from Arrow may be read-only
    per_class = per_class_accuracy(predictions, labels, num_classes)
    return {
        "accuracy": float(accuracy(predictions, labels)),
        "gm": float(geometric_mean_accuracy(per_class, num_classes)),
        "balanced_accuracy": balanced_accuracy(per_class),
        "per_class_accuracy": [float(a) for a in per_class],
        "predictions": predictions,
    }


def evaluation_metrics(state: TrainState, config: TrainConfig, eval_sets: dict, num_classes, device,
                       step_means: dict) -> dict:
    """Evaluate the EMA model on each evaluation split and return flat scalars.

    Per split s: s_accuracy, s_gm, s_balanced_accuracy (this evaluation), their medians over the
    last 10 / 20 evaluations (s_gm_median_10, ...) and s_class_accuracy/<c>; plus the mean step
    statistics since the last evaluation (`step_means`) and each per-class state vector of the
    method (p_ema/<c>, ...). The validation split's predictions and labels, row by row, come too
    (packed text: valid_predictions, valid_labels), so that a report can resample its rows."""
    metrics = {"step": state.step, **step_means}
    current = {}
    for split, (images, labels) in eval_sets.items():
        if len(labels) == 0:
            continue
        result = evaluate(state.ema_model, images, labels, num_classes, device, batch_size=config.eval_batch_size,
                          channels_last=config.channels_last, method=state.method)
        current.update({metric_name(split, measure): result[measure] for measure in MEASURES})
        metrics.update({class_metric_name(split, c): a for c, a in enumerate(result["per_class_accuracy"])})
        if split == "valid":
            metrics[rows_name(split, "predictions")] = pack_classes(result["predictions"])
            metrics[rows_name(split, "labels")] = pack_classes(labels)
    state.tracker.update(current)
    metrics.update(current)
    for name, summary in state.tracker.summary().items():  # name: metric_name(split, measure)
        metrics.update({f"{name}_{window}": value for window, value in summary.items() if window != "last"})
    for name, vector in state.method.class_state().items():
        metrics.update({f"{name}/{c}": p for c, p in enumerate(vector.tolist())})
    return metrics


def progress_line(metrics, total_steps, width=30) -> str:
    done = int(width * metrics["step"] / total_steps)
    valid_balanced = metric_name("valid", "balanced_accuracy")
    valid = f"valid bal-acc {metrics[valid_balanced]:.4f} " if valid_balanced in metrics else ""
    return (f"[{'#' * done}{'.' * (width - done)}] step {metrics['step']}/{total_steps} {valid}"
            f"test acc {metrics.get(metric_name('test', 'accuracy'), nan):.4f} "
            f"gm {metrics.get(metric_name('test', 'gm'), nan):.4f} "
            f"loss {metrics.get('loss/total', nan):.4f} "
            f"mask {metrics.get('mask_rate', nan):.3f} {metrics.get('images_per_second', nan):.0f} img/s")
