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

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from trainables.errors import TrainConfigError
from trainables.losses import Collective, LocalCollective
from trainables.options import Option

COMMON_OPTIONS = {
    "wu": Option(1.0, "weight of the unlabeled loss: total = labeled + wu * unlabeled", low=0,
                 search={"loguniform": [0.3, 3.0]}),
}


@dataclass(frozen=True)
class MethodOutput:
    """The losses of one step (0-d tensors), the unlabeled rows' weights, and logged extras."""

    total: Tensor  # what backward() runs on (weight decay is the optimiser's)
    labeled: Tensor
    unlabeled: Tensor  # before wu
    mask: Tensor  # (mu*B,) weight in [0, 1] of each of this worker's unlabeled rows
    stats: dict[str, Tensor] = field(default_factory=dict)  # further 0-d values to log (e.g. cadr)

    def to(self, dtype: torch.dtype) -> MethodOutput:
        """The losses and the mask in `dtype` (the statistics keep theirs)."""
        return MethodOutput(total=self.total.to(dtype), labeled=self.labeled.to(dtype),
                            unlabeled=self.unlabeled.to(dtype), mask=self.mask.to(dtype), stats=self.stats)


class Method:
    """The base of every method. A subclass sets `name`, `title`, `options` and writes
    `initial_state` and `step_losses`; `needs_index` when it keeps a memory per unlabeled row,
    `check` for a rule between its options."""

    name: ClassVar[str]
    title: ClassVar[str]  # how reports name it
    options: ClassVar[dict[str, Option]] = {}
    needs_index: ClassVar[bool] = False

    def __init__(self, num_classes: int, num_unlabeled: int = 0, collective: Collective | None = None,
                 **options):
        self._setup(num_classes, num_unlabeled, collective, self.validate(options))

    @classmethod
    def from_checked(cls, options: dict, num_classes: int, num_unlabeled: int = 0,
                     collective: Collective | None = None) -> Method:
        """The method with options a training config has already checked (`validate`'s output):
        they are not checked again."""
        method = cls.__new__(cls)
        method._setup(num_classes, num_unlabeled, collective, dict(options))
        return method

    def _setup(self, num_classes: int, num_unlabeled: int, collective: Collective | None, config: dict) -> None:
        if num_classes < 1:
            raise TrainConfigError(f"num_classes must be >= 1, got {num_classes}")
        if self.needs_index and num_unlabeled < 1:
            raise TrainConfigError(f"method {self.name} keeps a memory per unlabeled row: num_unlabeled must be "
                                   f">= 1, got {num_unlabeled}")
        self.num_classes, self.num_unlabeled = num_classes, num_unlabeled
        self.config = config
        self.collective = collective or LocalCollective()
        self.state: dict[str, Tensor] = self.initial_state()

    @classmethod
    def all_options(cls) -> dict[str, Option]:
        return {**COMMON_OPTIONS, **cls.options}

    @classmethod
    def validate(cls, options: dict) -> dict:
        """The complete options (defaults filled in); TrainConfigError on a bad one, or on a bad
        combination (`check`)."""
        values = resolve_options(cls.name, cls.all_options(), options)
        cls.check(values)
        return values

    @classmethod
    def check(cls, options: dict) -> None:
        """Rules between options (raise TrainConfigError); each option is already checked."""

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
        unlabeled rows' positions in the unlabeled pool (mu*B,). Updates the state.

        Half-precision logits are computed in float32 (`step_losses` sees at least float32);
        the losses and the mask come back in the logits' dtype."""
        if self.needs_index and unlabeled_index is None:
            raise ValueError(f"{self.name} keeps a memory per unlabeled row: losses() needs unlabeled_index")
        out_dtype = logits_x.dtype
        work_dtype = torch.promote_types(out_dtype, torch.float32)
        logits_x, logits_weak, logits_strong = (z.to(work_dtype) for z in (logits_x, logits_weak, logits_strong))
        return self.step_losses(logits_x, labels, logits_weak, logits_strong, unlabeled_index).to(out_dtype)

    def step_losses(self, logits_x: Tensor, labels: Tensor, logits_weak: Tensor, logits_strong: Tensor,
                    unlabeled_index: Tensor | None) -> MethodOutput:
        """`losses` on logits of at least float32: the method's own computation."""
        raise NotImplementedError


def resolve_options(method: str, declared: dict[str, Option], given: dict) -> dict:
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise TrainConfigError(f"{', '.join(unknown)}: not an option of method {method} "
                               f"(its options: {', '.join(sorted(declared))})")
    return {name: option.check(name, given.get(name, option.default), TrainConfigError)
            for name, option in declared.items()}


def hard_pseudo_labels(logits_weak: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """softmax of the weak logits without gradient, its max and argmax: (probs, confidence, label)."""
    probs = torch.softmax(logits_weak.detach(), dim=1)
    confidence, label = probs.max(dim=1)
    return probs, confidence, label
