"""Typed, validated training configuration: one dataclass per concern.

`TrainConfig.from_dict` takes a flat dict (what a Tune trial or a YAML file holds): `method` names
a registered method (trainables/methods) and the method's options (the paper's `cap`, `cai`,
`confidence`, ...) go into one `MethodConfig`; a bad value fails here, before any training or Ray
starts, with a message naming the field and what it allows.
"""

import math
from dataclasses import dataclass, field, fields

from trainables.augment import DEFAULT_AUGMENT, PARTS, parse_augment
from trainables.errors import TrainConfigError
from trainables.methods import get_method, option_names
from trainables.models import MODELS

PRECISIONS = ("fp32", "bf16", "fp16")


def _check(condition, name, value, allowed):
    if not condition:
        raise TrainConfigError(f"{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class MethodConfig:
    """A registered method and all its options (defaults filled in), validated by the method."""

    name: str = "fixmatch"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "options", get_method(self.name).validate(dict(self.options)))

    @property
    def label(self) -> str:
        """How reports name this configuration (e.g. "CADR", "FlexMatch")."""
        return get_method(self.name).label(self.options)


@dataclass(frozen=True)
class TrainConfig:
    # data
    dataset: str = "digits"
    split: str = "digits_LT_10.1@50"
    data_root: str | None = None
    # model and augmentation
    model: str = "cnn_small"
    augment: str = DEFAULT_AUGMENT  # "L.W.S": the labeled, weak and strong branches (trainables/augment.py)
    flip: bool | None = None  # None: off for single-channel data (digits), on otherwise
    channels_last: bool = True
    compile: bool = False
    precision: str = "fp32"  # fp32, or bf16 / fp16 autocast of the model (losses, EMA, optimizer stay fp32)
    # optimisation
    steps: int = 1000
    batch_size: int = 64  # B labeled images per step (global, across workers)
    mu: int = 7  # unlabeled images per labeled image
    lr: float = 0.03
    momentum: float = 0.9
    wd: float = 5e-4
    ema_decay: float = 0.999
    # evaluation and bookkeeping
    eval_every: int = 100
    eval_batch_size: int = 1024
    seed: int = 0
    device: str = "auto"
    method: MethodConfig = field(default_factory=MethodConfig)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainConfigError(f"{f.name} must be a finite number, got {value!r}")
        _check(self.steps >= 1, "steps", self.steps, ">= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.mu >= 1, "mu", self.mu, ">= 1")
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        _check(self.wd >= 0, "wd", self.wd, ">= 0")
        _check(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "in [0, 1)")
        _check(self.eval_every >= 1, "eval_every", self.eval_every, ">= 1")
        _check(self.model in MODELS, "model", self.model, f"one of {sorted(MODELS)}")
        parse_augment(self.augment)
        _check(self.precision in PRECISIONS, "precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               "device", self.device, "auto, cpu, cuda or cuda:N")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a flat dict: `method` (default fixmatch) and its options (cap, confidence,
        ...) go into `method`, every other key is a TrainConfig field."""
        train_keys = {f.name for f in fields(cls)} - {"method"}
        method_keys = option_names()
        if "strong_augment" in values:
            raise TrainConfigError("strong_augment was replaced by augment (L.W.S): strong_augment: randaugment is "
                                   "augment: d.d.rac, ctaugment is augment: d.d.cta")
        unknown = set(values) - train_keys - method_keys - {"method"}
        if unknown:
            raise TrainConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        method = MethodConfig(values.get("method", "fixmatch"), {k: v for k, v in values.items() if k in method_keys})
        return cls(method=method, **{k: v for k, v in values.items() if k in train_keys})

    @staticmethod
    def help(name: str) -> str:
        """One line on a field, for the command line's --help."""
        return FIELD_HELP.get(name, "")

    def to_dict(self) -> dict:
        """Flat dict, the inverse of from_dict."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "method"}
        return {**flat, "method": self.method.name, **self.method.options}


FIELD_HELP = {
    "dataset": "a converted dataset (python -m data_prep list)",
    "split": "an MNAR split of it: a file in its splits/ or an original-style name such as digits_LT_10.1@50-100",
    "data_root": "where datasets live (default: $ML_DATA or ./data)",
    "model": f"one of {', '.join(sorted(MODELS))}",
    "augment": ("augmentation of the labeled, weak and strong branches, L.W.S, each part one of "
                + ", ".join(f"{part} ({what})" for part, what in PARTS.items()) + "; a strong d means cta"),
    "channels_last": "channels-last memory format (faster convolutions on most hardware)",
    "compile": "torch.compile the model",
    "precision": "fp32, or bf16 / fp16 autocast of the model's forward (fp16 with a gradient scaler); losses, "
                 "class priors, EMA weights, optimizer state and checkpoints stay fp32",
    "steps": "training steps",
    "batch_size": "B labeled images per step, global: split across the workers",
    "mu": "unlabeled images per labeled image (mu*B per step)",
    "lr": "learning rate, with FixMatch's cosine schedule lr * cos(7 pi k / (16 K))",
    "momentum": "SGD (Nesterov) momentum",
    "wd": "weight decay on convolution and linear weights",
    "ema_decay": "decay of the EMA weights (the evaluated model)",
    "eval_every": "steps between evaluations (and checkpoints)",
    "eval_batch_size": "images per evaluation batch",
    "seed": "seed of the model, sampling and augmentation",
}
