"""What every semi-supervised method is: typed options, state, and the losses of one step.

A method (docs/method.md, "Methods") is one object:

    method = create_method("fixmatch", num_classes=C, num_unlabeled=N, cap=True, cai=True)
    out = method.losses(logits_x, labels, logits_weak, logits_strong, unlabeled_index)
    out.total, out.labeled, out.unlabeled, out.mask
    method.state_dict(); method.load_state_dict(state)

Options are declared once, with the reference's names, defaults and allowed ranges; the
training config, the command line and the study layer all read them from here. State is a dict
of tensors: initial values from `initial_state`, changed only inside `losses`, saved in every
checkpoint (tensors only, so a checkpoint loads with `torch.load(weights_only=True)`). Batch
statistics go through the `collective`, so N data-parallel workers keep the same state as one
process given the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from trainables.errors import TrainConfigError
from trainables.losses import Collective, LocalCollective


@dataclass(frozen=True)
class Option:
    """One option of a method: its default, what it allows (said as `allowed`), and a help line."""

    default: Any
    help: str
    low: float | None = None  # numeric bounds; *_open excludes the bound itself
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None

    @property
    def kind(self) -> type:
        return type(self.default)

    @property
    def allowed(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.choices is not None:
            return f"one of {', '.join(map(str, self.choices))}"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"a finite {self.kind.__name__}"

    def accepts(self, value) -> bool:
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return isinstance(value, str) and (self.choices is None or value in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.kind is int and not float(value).is_integer():
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


COMMON_OPTIONS = {
    "wu": Option(1.0, "weight of the unlabeled loss: total = labeled + wu * unlabeled", low=0),
}


@dataclass(frozen=True)
class MethodOutput:
    """The losses of one step (0-d tensors), the unlabeled rows' weights, and logged extras."""

    total: Tensor  # what backward() runs on (weight decay is the optimiser's)
    labeled: Tensor
    unlabeled: Tensor  # before wu
    mask: Tensor  # (mu*B,) weight in [0, 1] of each of this worker's unlabeled rows
    stats: dict[str, Tensor] = field(default_factory=dict)  # further 0-d values to log (e.g. cadr)


class Method:
    """The base of every method. A subclass sets `name`, `title`, `options` and writes
    `initial_state` and `losses`; `needs_index` when it keeps a memory per unlabeled row."""

    name: ClassVar[str]
    title: ClassVar[str]  # how reports name it
    options: ClassVar[dict[str, Option]] = {}
    needs_index: ClassVar[bool] = False

    def __init__(self, num_classes: int, num_unlabeled: int = 0, collective: Collective | None = None,
                 **options):
        if num_classes < 1:
            raise TrainConfigError(f"num_classes must be >= 1, got {num_classes}")
        if self.needs_index and num_unlabeled < 1:
            raise TrainConfigError(f"method {self.name} keeps a memory per unlabeled row: num_unlabeled must be "
                                   f">= 1, got {num_unlabeled}")
        self.num_classes, self.num_unlabeled = num_classes, num_unlabeled
        self.config = resolve_options(self.name, self.all_options(), options)
        self.collective = collective or LocalCollective()
        self.state: dict[str, Tensor] = self.initial_state()

    @classmethod
    def all_options(cls) -> dict[str, Option]:
        return {**COMMON_OPTIONS, **cls.options}

    @classmethod
    def validate(cls, options: dict) -> dict:
        """The complete options (defaults filled in); TrainConfigError on a bad one."""
        return resolve_options(cls.name, cls.all_options(), options)

    @classmethod
    def label(cls, options: dict) -> str:
        """The name of this configuration in reports (FixMatch names its corrections)."""
        return cls.title

    # --- state ----------------------------------------------------------------------------------

    def initial_state(self) -> dict[str, Tensor]:
        return {}

    def class_state(self) -> dict[str, Tensor]:
        """Per-class state vectors worth a TensorBoard curve each: those of length num_classes."""
        return {k: v for k, v in self.state.items() if v.dim() == 1 and v.shape[0] == self.num_classes
                and v.is_floating_point()}

    def to(self, device=None, dtype=None) -> Method:
        """Move the state; dtype applies to floating-point state only."""
        self.state = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
                      for k, v in self.state.items()}
        return self

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.state):
            raise TrainConfigError(f"method {self.name}: checkpoint state holds {sorted(state)}, "
                                   f"expected {sorted(self.state)} (was it saved by another method?)")
        for key, value in state.items():
            current = self.state[key]
            if tuple(value.shape) != tuple(current.shape):
                raise TrainConfigError(f"method {self.name}: checkpoint state {key} has shape {tuple(value.shape)}, "
                                       f"expected {tuple(current.shape)} (other classes or unlabeled rows?)")
            self.state[key] = value.to(device=current.device, dtype=current.dtype).clone()

    # --- the step -------------------------------------------------------------------------------

    def losses(self, logits_x: Tensor, labels: Tensor, logits_weak: Tensor, logits_strong: Tensor,
               unlabeled_index: Tensor | None = None) -> MethodOutput:
        """One step: logits_x (B, C), labels (B,), logits_weak and logits_strong (mu*B, C), the
        unlabeled rows' positions in the unlabeled pool (mu*B,). Updates the state."""
        raise NotImplementedError


def resolve_options(method: str, declared: dict[str, Option], given: dict) -> dict:
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise TrainConfigError(f"{', '.join(unknown)}: not an option of method {method} "
                               f"(its options: {', '.join(sorted(declared))})")
    values = {}
    for name, option in declared.items():
        value = given.get(name, option.default)
        if option.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not option.accepts(value):
            raise TrainConfigError(f"{name} must be {option.allowed}, got {value!r}")
        values[name] = value
    return values


def hard_pseudo_labels(logits_weak: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """softmax of the weak logits without gradient, its max and argmax: (probs, confidence, label)."""
    probs = torch.softmax(logits_weak.detach(), dim=1)
    confidence, label = probs.max(dim=1)
    return probs, confidence, label
