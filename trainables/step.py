"""The training step every runner uses, and the state it changes.

Per step (docs/method.md): weak-augment the labeled batch, weak- and strong-augment the unlabeled
batch (plus the further views a method asks for), run ONE forward over the concatenation
(batch-norm sees all of it), let the method compute its losses (and update its state), take an
SGD step, update the EMA weights.

Nothing here synchronises with the host per step: statistics stay on the device until a caller
reads them.
"""

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainables.augment import Augmenter
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError, TrainingDiverged
from trainables.losses import Collective, global_mean
from trainables.methods import Method, get_method
from trainables.metrics import MetricTracker
from trainables.models import create_model, weight_decay_parameters


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


def solid_image(image_shape, device) -> torch.Tensor:
    """One white image (every pixel 1 in [0, 1]) as the model sees it, normalised: (1, C, H, W) of ones."""
    height, width, channels = image_shape
    return normalize(torch.ones(1, channels, height, width, device=device))


def images_per_step(config: TrainConfig, method: type[Method] | Method) -> int:
    """Images in one step's forward over the global batch: labeled, weak and strong unlabeled,
    and the further views the method asks for."""
    labeled_views = 1 + ("labeled_strong" in method.views)
    unlabeled_views = 2 + ("strong2" in method.views)
    return config.batch_size * (labeled_views + config.mu * unlabeled_views)


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
    method: Method  # the method's losses and its own state (FixMatch: p_ema)
    generator: torch.Generator  # augmentation and batch sampling randomness
    augment: Augmenter  # the three branches' augmentations (and CTAugment's learned bins, if used)
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    step: int = 0
    tracker: MetricTracker = field(default_factory=MetricTracker)
    # The loop's batch samplers (trainables/loop.py): where each stands in its shuffled epoch, so
    # that a run resumed from a checkpoint draws the batches the uninterrupted run would have.
    samplers: dict = field(default_factory=dict)

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
            "method": self.method.name,
            "method_state": self.method.state_dict(),
            "generator": self.generator.get_state(),
            "augment": self.augment.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "step": self.step,
            "tracker": self.tracker.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "samplers": {name: sampler.state_dict() for name, sampler in self.samplers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method.name:
            raise TrainConfigError(f"the checkpoint was saved by method {state.get('method')!r}, "
                                   f"this run trains {self.method.name!r}")
        self.raw_model.load_state_dict(state["model"])
        self.ema_model.load_state_dict(state["ema_model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method_state"])
        self.generator.set_state(state["generator"])
        self.augment.load_state_dict(state["augment"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.tracker.load_state_dict(state["tracker"])
        torch.set_rng_state(state["torch_rng"])
        for name, saved in state.get("samplers", {}).items():  # an older checkpoint has none: new epochs
            if name in self.samplers:
                self.samplers[name].load_state_dict(saved)


def build_state(config: TrainConfig, num_classes: int, image_shape, device, *, num_unlabeled: int = 0,
                collective: Collective | None = None, labeled_counts=None, labeled_in_pool=None) -> TrainState:
    """Model, EMA copy, SGD (Nesterov; weight decay on conv/linear weights only), schedule, and
    the method (its options from the config, its state on `device`; `labeled_counts`, the labeled
    rows per class, and `labeled_in_pool`, which unlabeled rows are labeled too, for a method that
    needs them)."""
    augment = Augmenter(config.augment)
    method = get_method(config.method.name).from_checked(config.method.options, num_classes, num_unlabeled,
                                                        collective, labeled_counts, labeled_in_pool).to(device)
    torch.manual_seed(config.seed)
    height, _, channels = image_shape
    model = create_model(config.model, num_classes, in_channels=channels, image_size=height,
                         auxiliary_head=method.auxiliary_head).to(device)
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
    scaler = torch.amp.GradScaler(torch.device(device).type) if config.precision == "fp16" else None
    return TrainState(model=model, ema_model=ema_model, optimizer=optimizer, scheduler=scheduler, method=method,
                      generator=generator, augment=augment, scaler=scaler)


HALF = (torch.bfloat16, torch.float16)


def autocast(config: TrainConfig, device: torch.device):
    """The model's forward in the config's precision: torch.autocast to bf16 or fp16 on the
    device, or nothing for fp32 (the parameters themselves always stay fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def use_flip(config: TrainConfig, image_shape) -> bool:
    """Horizontal flips are on by default except for single-channel data (digits, MNIST)."""
    return config.flip if config.flip is not None else image_shape[2] != 1


def train_step(state: TrainState, config: TrainConfig, labeled_images, labels, unlabeled_images,
               unlabeled_index=None, *, flip: bool, forward=None) -> dict:
    """One step on uint8 NHWC batches already on the model's device; `unlabeled_index` holds the
    unlabeled rows' positions in the unlabeled pool (methods with a per-row memory need them).

    Returns detached 0-d tensors (loss/total, loss/labeled, loss/unlabeled, the method's own
    statistics, mask_rate, lr, finite); reading them is the caller's choice, so the step itself
    never waits for the device.
    """
    forward = state.model if forward is None else forward  # a compiled module has no truth value
    augment, generator, method = state.augment, state.generator, state.method
    labeled = to_unit_float(labeled_images)
    unlabeled = to_unit_float(unlabeled_images)
    labeled_view = augment("labeled", labeled, flip=flip, generator=generator)
    views = {"x": labeled_view,
             "weak": augment("weak", unlabeled, flip=flip, generator=generator),
             "strong": augment("strong", unlabeled, flip=flip, generator=generator)}
    if "labeled_strong" in method.views:
        views["labeled_strong"] = augment("strong", labeled, flip=flip, generator=generator)
    if "strong2" in method.views:
        views["strong2"] = augment("strong", unlabeled, flip=flip, generator=generator)

    extras = {}
    if method.solid_probe:
        extras["solid"] = _solid_logits(state, config, labeled_view)[:, :method.num_classes]
    batch = torch.cat(list(views.values()))
    if config.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast(config, batch.device):
        logits = forward(normalize(batch))
    if logits.dtype in HALF:  # the method's losses and state stay fp32 whatever the model computes in
        logits = logits.float()
    heads = {"": logits[:, :method.num_classes]}
    if method.auxiliary_head:
        heads["aux_"] = logits[:, method.num_classes:]
    for prefix, head in heads.items():
        extras.update({prefix + name: part for name, part in
                       zip(views, head.split([len(view) for view in views.values()]))})
    logits_x, logits_weak, logits_strong = (extras.pop(name) for name in ("x", "weak", "strong"))

    try:
        out = method.losses(logits_x, labels, logits_weak, logits_strong, unlabeled_index, extras)
    except torch.linalg.LinAlgError:
        # CAP's pseudo-inverse is the first thing to fail on non-finite logits.
        raise TrainingDiverged(f"the logits became NaN or infinite at step {state.step + 1}; "
                               "lower lr or check the data") from None
    state.optimizer.zero_grad(set_to_none=True)
    lr = state.optimizer.param_groups[0]["lr"]
    if state.scaler is None:
        out.total.backward()
        state.optimizer.step()
    else:  # fp16: scale the loss so small gradients survive, skip steps whose gradients overflowed
        state.scaler.scale(out.total).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    state.scheduler.step()
    ema_update(state.ema_model, state.raw_model, ema_decay_at(state.step, config.ema_decay))
    state.step += 1

    if augment.uses_probes:
        _update_ctaugment(state, config, labeled_view, labels, forward)
    total = out.total.detach()
    return {
        "loss/total": total, "loss/labeled": out.labeled.detach(), "loss/unlabeled": out.unlabeled.detach(),
        **out.stats,
        "mask_rate": global_mean(out.mask.detach(), state.method.collective),
        "lr": torch.tensor(lr),
        "finite": torch.isfinite(total),
    }


@torch.no_grad()
def _solid_logits(state: TrainState, config: TrainConfig, like: torch.Tensor) -> torch.Tensor:
    """The training model's logits on one solid white image, without gradient, in train mode, as
    a batch of its own (its batch-norm statistics are the image's own): CDMAD's measure of the
    classifier's bias. The running statistics are left as they were (docs/method.md, CDMAD)."""
    image = solid_image((like.shape[2], like.shape[3], like.shape[1]), like.device)
    if config.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    model = state.raw_model
    kept = [(buffer, buffer.clone()) for buffer in model.buffers()]
    with autocast(config, image.device):
        logits = model(image)
    for buffer, before in kept:
        buffer.copy_(before)
    return logits.float() if logits.dtype in HALF else logits


@torch.no_grad()
def _update_ctaugment(state: TrainState, config: TrainConfig, labeled_view, labels, forward) -> None:
    """CTAugment learns which magnitudes keep labeled images recognisable: probe the labeled
    branch's images and update. Every worker updates from all workers' probes (in rank order), so
    the augmentation state stays the same on every worker, as one process given the whole batch
    would have it."""
    probe, policy = state.augment.probe(labeled_view, generator=state.generator)
    model = state.raw_model
    model.eval()
    with autocast(config, probe.device):
        logits = forward(normalize(probe))
    logits = logits[:, :state.method.num_classes]  # the main head's, with an auxiliary head
    probs = F.softmax(logits.float() if logits.dtype in HALF else logits, dim=1)
    model.train()
    gather = state.method.collective.gather_rows
    policy = type(policy)(*(gather(part.to(probs.device))[0].cpu() for part in policy))
    state.augment.update(policy, gather(probs)[0], gather(labels)[0])
