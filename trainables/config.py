"""Typed, validated training configuration: one dataclass per concern.

`TrainConfig.from_dict` takes a flat dict (what a Tune trial or a YAML file holds) and routes the
paper's loss flags into `LossConfig`; a bad value fails here, before any training or Ray starts,
with a message naming the field and what it allows.
"""

from dataclasses import asdict, dataclass, field, fields

from trainables.augment import STRONG_AUGMENTATIONS
from trainables.errors import TrainConfigError
from trainables.losses import validate_loss_options
from trainables.models import MODELS


def _check(condition, name, value, allowed):
    if not condition:
        raise TrainConfigError(f"{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class LossConfig:
    """FixMatch and the three corrections, with the paper's names and defaults (DESIGN.md 4)."""

    cap: bool = False
    cai: bool = False
    cadr: bool = False
    confidence: float = 0.95  # tau
    cai_beta: float = 0.5
    cap_momentum: float = 0.99
    upper: float = 5.0
    cap_ema: bool = True
    cap_form: str = "reference"
    wu: float = 1.0

    def __post_init__(self):
        validate_loss_options(**asdict(self))


@dataclass(frozen=True)
class TrainConfig:
    # data
    dataset: str = "digits"
    split: str = "digits_LT_10.1@50"
    data_root: str | None = None
    # model and augmentation
    model: str = "cnn_small"
    strong_augment: str = "randaugment"
    flip: bool | None = None  # None: off for single-channel data (digits), on otherwise
    channels_last: bool = True
    compile: bool = False
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
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self):
        _check(self.steps >= 1, "steps", self.steps, ">= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.mu >= 1, "mu", self.mu, ">= 1")
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        _check(self.wd >= 0, "wd", self.wd, ">= 0")
        _check(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "in [0, 1)")
        _check(self.eval_every >= 1, "eval_every", self.eval_every, ">= 1")
        _check(self.model in MODELS, "model", self.model, f"one of {sorted(MODELS)}")
        _check(self.strong_augment in STRONG_AUGMENTATIONS, "strong_augment", self.strong_augment,
               f"one of {sorted(STRONG_AUGMENTATIONS)}")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               "device", self.device, "auto, cpu, cuda or cuda:N")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a flat dict; loss keys (cap, confidence, ...) go into `loss`."""
        loss_keys = {f.name for f in fields(LossConfig)}
        train_keys = {f.name for f in fields(cls)} - {"loss"}
        unknown = set(values) - loss_keys - train_keys - {"loss"}
        if unknown:
            raise TrainConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        loss = dict(values.get("loss") or {})
        loss.update({k: v for k, v in values.items() if k in loss_keys})
        return cls(loss=LossConfig(**loss), **{k: v for k, v in values.items() if k in train_keys})

    def to_dict(self) -> dict:
        """Flat dict, the inverse of from_dict."""
        flat = asdict(self)
        flat.update(flat.pop("loss"))
        return flat
