"""The FixMatch training step and a single-process training loop (no Ray).

`train_step` is the one step every runner uses: the Ray Train loop calls it unchanged with a
data-parallel `collective`. Per step (DESIGN.md 4): weak-augment the labeled batch, weak- and
strong-augment the unlabeled batch, run ONE forward over the concatenation (batch-norm sees all
of it), compute the losses, take an SGD step, update the EMA weights and `p_ema`.

Nothing here synchronises with the host per step: statistics stay on the device until a caller
reads them.
"""

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainables.augment import create_strong_augmentation, weak_augment
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError
from trainables.losses import LocalCollective, compute_losses, global_mean
from trainables.metrics import (MetricTracker, accuracy, balanced_accuracy, geometric_mean_accuracy,
                                per_class_accuracy)
from trainables.models import create_model, weight_decay_parameters

class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stops instead of going on with garbage."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainConfigError(f"device={name!r} but no CUDA device is available")
    return torch.device(name)


def cosine_lr_factor(step: int, total_steps: int) -> float:
    """FixMatch's schedule: lr_k = lr * cos(7 pi k / (16 K))."""
    return math.cos(7 * math.pi * step / (16 * total_steps))


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1], channels-last in memory (a free permute)."""
    return images.permute(0, 3, 1, 2).float().div_(255)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the input range FixMatch's models expect."""
    return images * 2 - 1


def ema_decay_at(step: int, decay: float) -> float:
    """min(decay, (1 + k) / (10 + k)): TensorFlow's ExponentialMovingAverage warm-up. Without it, a
    0.999 average is still 80% random initialisation after 200 steps, which short studies hit."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights; buffers (batch-norm statistics) are copied."""
    ema_params = list(ema_model.parameters())
    torch._foreach_lerp_(ema_params, list(model.parameters()), 1 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


@dataclass
class TrainState:
    """Everything a step changes, and everything a checkpoint must hold."""

    model: torch.nn.Module  # the module being trained (possibly wrapped, e.g. by DDP)
    ema_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    p_ema: torch.Tensor  # (C,) class prior of the unlabeled data, starts at 1/C
    generator: torch.Generator  # augmentation and batch sampling randomness
    strong: object = None  # the strong augmentation (RandAugment, or CTAugment with learned bins)
    step: int = 0
    tracker: MetricTracker = field(default_factory=MetricTracker)

    @property
    def raw_model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    def state_dict(self) -> dict:
        """Tensors, numbers, strings and plain containers only (loads with weights_only=True)."""
        return {
            "model": self.raw_model.state_dict(),
            "ema_model": self.ema_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "p_ema": self.p_ema.detach().cpu(),
            "generator": self.generator.get_state(),
            "strong_augment": self.strong.state_dict(),
            "step": self.step,
            "tracker": self.tracker.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.ema_model.load_state_dict(state["ema_model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.p_ema = state["p_ema"].to(self.p_ema.device, self.p_ema.dtype)
        self.generator.set_state(state["generator"])
        self.strong.load_state_dict(state["strong_augment"])
        self.step = int(state["step"])
        self.tracker.load_state_dict(state["tracker"])
        torch.set_rng_state(state["torch_rng"])


def build_state(config: TrainConfig, num_classes: int, image_shape, device) -> TrainState:
    """Model, EMA copy, SGD (Nesterov; weight decay on conv/linear weights only), schedule, prior."""
    strong = create_strong_augmentation(config.strong_augment)
    torch.manual_seed(config.seed)
    height, _, channels = image_shape
    model = create_model(config.model, num_classes, in_channels=channels, image_size=height).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    decay, no_decay = weight_decay_parameters(model)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": config.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: cosine_lr_factor(k, config.steps))
    generator = torch.Generator().manual_seed(config.seed)
    return TrainState(
        model=model, ema_model=ema_model, optimizer=optimizer, scheduler=scheduler,
        p_ema=torch.full((num_classes,), 1.0 / num_classes, device=device), generator=generator,
        strong=strong,
    )


def use_flip(config: TrainConfig, image_shape) -> bool:
    """Horizontal flips are on by default except for single-channel data (digits, MNIST)."""
    return config.flip if config.flip is not None else image_shape[2] != 1


def train_step(state: TrainState, config: TrainConfig, labeled_images, labels, unlabeled_images,
               *, flip: bool, forward=None, collective=None) -> dict:
    """One FixMatch step on uint8 NHWC batches already on the model's device.

    Returns detached 0-d tensors (total, labeled, unlabeled, cadr, mask_rate, lr, finite); reading
    them is the caller's choice, so the step itself never waits for the device.
    """
    forward = state.model if forward is None else forward  # a compiled module has no truth value
    generator = state.generator
    labeled = to_unit_float(labeled_images)
    unlabeled = to_unit_float(unlabeled_images)
    weak_labeled = weak_augment(labeled, flip=flip, generator=generator)
    weak_unlabeled = weak_augment(unlabeled, flip=flip, generator=generator)
    strong_unlabeled, _ = state.strong(unlabeled, flip=flip, generator=generator)

    batch = torch.cat([weak_labeled, weak_unlabeled, strong_unlabeled])
    if config.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    logits = forward(normalize(batch))
    n_labeled, n_unlabeled = len(labeled), len(unlabeled)
    logits_x, logits_weak, logits_strong = logits.split([n_labeled, n_unlabeled, n_unlabeled])

    loss_config = config.loss
    out = compute_losses(
        logits_x, labels, logits_weak, logits_strong, state.p_ema,
        cap=loss_config.cap, cai=loss_config.cai, cadr=loss_config.cadr, confidence=loss_config.confidence,
        cai_beta=loss_config.cai_beta, cap_momentum=loss_config.cap_momentum, upper=loss_config.upper,
        cap_ema=loss_config.cap_ema, cap_form=loss_config.cap_form, wu=loss_config.wu, collective=collective,
    )
    state.optimizer.zero_grad(set_to_none=True)
    out.total.backward()
    lr = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    state.scheduler.step()
    ema_update(state.ema_model, state.raw_model, ema_decay_at(state.step, config.ema_decay))
    state.p_ema = out.p_new.detach()
    state.step += 1

    if state.strong.uses_probes:
        _update_strong_augment(state, weak_labeled, labels, forward)
    return {
        "total": out.total.detach(), "labeled": out.labeled.detach(), "unlabeled": out.unlabeled.detach(),
        "cadr": out.cadr.detach(), "mask_rate": global_mean(out.mask.detach(), collective or LocalCollective()),
        "lr": torch.tensor(lr),
        "finite": torch.isfinite(out.total.detach()),
    }


@torch.no_grad()
def _update_strong_augment(state: TrainState, weak_labeled, labels, forward) -> None:
    """CTAugment learns which magnitudes keep labeled images recognisable: probe and update."""
    probe, policy = state.strong.probe(weak_labeled, generator=state.generator)
    model = state.raw_model
    model.eval()
    probs = F.softmax(forward(normalize(probe)), dim=1)
    model.train()
    state.strong.update(policy, probs, labels)


@torch.no_grad()
def predict(model, images, device, *, batch_size=1024, channels_last=True) -> torch.Tensor:
    """Class predictions for uint8 NHWC images (numpy or tensor), in eval mode."""
    was_training = model.training
    model.eval()
    images = torch.as_tensor(images)
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = to_unit_float(images[start:start + batch_size].to(device))
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        predictions.append(model(normalize(batch)).argmax(dim=1))
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
    }


EVALUATED = ("accuracy", "gm", "balanced_accuracy")  # tracked per evaluation split, with medians


class EpochSampler:
    """Endless shuffled epochs over n rows, served in batches (rows repeat only across epochs,
    or within a batch when n < batch_size)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self._order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        while len(self._order) < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(self.n, generator=self.generator)])
        batch, self._order = self._order[:self.batch_size], self._order[self.batch_size:]
        return batch


class RunningStats:
    """Step statistics summed on the device between evaluations, plus the wall time they took."""

    def __init__(self):
        self.sums, self.steps, self.images, self.started = {}, 0, 0, time.perf_counter()

    def add(self, stats: dict, images: int) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.steps += 1
        self.images += images

    def means(self, step: int) -> dict:
        """Mean of each statistic (one host sync); raises TrainingDiverged on a non-finite loss.
        Empty when no step ran since the last evaluation."""
        if not self.steps:
            return {}
        sums = {key: float(value) for key, value in self.sums.items()}
        if sums.pop("finite") != self.steps:
            raise TrainingDiverged(f"loss became NaN or infinite before step {step}; lower lr or check the data")
        means = {f"loss/{k}" if k in LOSS_KEYS else k: v / self.steps for k, v in sums.items()}
        means["images_per_second"] = self.images / (time.perf_counter() - self.started)
        return means


LOSS_KEYS = ("total", "labeled", "unlabeled", "cadr")


def evaluation_metrics(state: TrainState, config: TrainConfig, eval_sets: dict, num_classes, device,
                       running: RunningStats) -> dict:
    """Evaluate the EMA model on each evaluation split and return flat scalars.

    eval_sets: {"valid": (images, labels), "test": (images, labels)}; a split with no rows is
    skipped. Per split s: s_accuracy, s_gm, s_balanced_accuracy (this evaluation), their medians
    over the last 10 / 20 evaluations (s_gm_median_10, ...) and s_class_accuracy/<c>; plus the
    mean step statistics and p_ema/<c>."""
    metrics = {"step": state.step, **running.means(state.step)}
    current = {}
    for split, (images, labels) in eval_sets.items():
        if len(labels) == 0:
            continue
        result = evaluate(state.ema_model, images, labels, num_classes, device,
                          batch_size=config.eval_batch_size, channels_last=config.channels_last)
        current.update({f"{split}_{name}": result[name] for name in EVALUATED})
        metrics.update({f"{split}_class_accuracy/{c}": a for c, a in enumerate(result["per_class_accuracy"])})
    state.tracker.update(current)
    metrics.update(current)
    for name, summary in state.tracker.summary().items():
        metrics.update({f"{name}_{key}": value for key, value in summary.items() if key != "last"})
    metrics.update({f"p_ema/{c}": p for c, p in enumerate(state.p_ema.tolist())})
    return metrics


def train(config: TrainConfig, *, progress=True, on_eval=None) -> dict:
    """Train in this process on the in-memory loader; returns the final metrics and the history.

    `on_eval(metrics)` is called after each evaluation."""
    from tqdm import tqdm

    from data_prep.loading import load_arrays

    device = resolve_device(config.device)
    data = load_arrays(config.dataset, config.split, config.data_root)
    state = build_state(config, data.num_classes, data.image_shape, device)
    forward = torch.compile(state.model) if config.compile else state.model
    flip = use_flip(config, data.image_shape)

    labeled_images = torch.from_numpy(data.labeled_images).to(device)
    labeled_labels = torch.from_numpy(data.labeled_labels).to(device)
    unlabeled_images = torch.from_numpy(data.unlabeled_images).to(device)
    labeled_sampler = EpochSampler(len(labeled_labels), config.batch_size, state.generator)
    unlabeled_sampler = EpochSampler(len(unlabeled_images), config.batch_size * config.mu, state.generator)
    images_per_step = config.batch_size * (1 + 2 * config.mu)

    history, running = [], RunningStats()
    bar = tqdm(total=config.steps, desc="training", unit="step", disable=not progress)
    while state.step < config.steps:
        rows = labeled_sampler.next().to(device)
        stats = train_step(state, config, labeled_images[rows], labeled_labels[rows],
                           unlabeled_images[unlabeled_sampler.next().to(device)], flip=flip, forward=forward)
        running.add(stats, images_per_step)
        bar.update(1)
        if state.step % config.eval_every == 0 or state.step == config.steps:
            eval_sets = {"valid": (data.valid_images, data.valid_labels), "test": (data.test_images, data.test_labels)}
            metrics = evaluation_metrics(state, config, eval_sets, data.num_classes, device, running)
            running = RunningStats()
            history.append(metrics)
            bar.set_postfix(acc=f"{metrics['test_accuracy']:.3f}", gm=f"{metrics['test_gm']:.3f}")
            if on_eval is not None:
                on_eval(metrics)
    bar.close()
    return {"metrics": history[-1], "history": history, "state": state}
