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

What a method may ask of the training step beyond the three logits (class attributes it sets;
the step, the model and the evaluation read them, docs/method.md "What a method may ask for"):

- `views`: further augmented views in the one forward pass, from `VIEWS`: "labeled_strong" (the
  labeled batch strongly augmented) and "strong2" (a second strong view of the unlabeled batch).
- `auxiliary_head`: the model gets a second linear classifier on the shared features; the
  method then also sees that head's logits of every view ("aux_x", "aux_weak", "aux_strong",
  "aux_<view>").
- `solid_probe`: the step also passes "solid", the training model's logits (no gradient, train
  mode, a batch of its own, before the step's forward) on one solid white image.
- `needs_labeled_counts`: the method is built with the labeled set's class counts
  (`self.labeled_counts`, (C,) float64), e.g. for a prior that starts at the labeled distribution.
  Every method may also be given `labeled_in_pool` (`self.labeled_in_pool`, (N,) bool or None):
  which rows of the unlabeled pool are labeled rows too, by position (with `needs_index`).

The further logits arrive as `step_losses(..., extras={name: logits})` (only for a method that
asks for any). At evaluation `test_logits` turns the evaluated model's outputs into the logits
that predict (by default the main head's; a method may pick its auxiliary head or subtract the
solid image's logits). A method that counts epochs keeps its own step counter in its state.
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

VIEWS = ("labeled_strong", "strong2")
"""The further views a method may ask for: the labeled batch strongly augmented, a second strong
view of the unlabeled batch."""
HEAD_VIEWS = ("x", "weak", "strong")
"""The views every method sees; with an auxiliary head their logits come as aux_x, aux_weak, ..."""


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
    `initial_state` and `step_losses`; `needs_index` when it reads its unlabeled rows by position
    (a memory per row, or which rows are labeled too),
    `check` for a rule between its options; `views`, `auxiliary_head`, `solid_probe`,
    `needs_labeled_counts` and `test_logits` when it needs more than the three logits (see the
    module's docstring)."""

    name: ClassVar[str]
    title: ClassVar[str]  # how reports name it
    options: ClassVar[dict[str, Option]] = {}
    needs_index: ClassVar[bool] = False
    views: ClassVar[tuple[str, ...]] = ()  # from VIEWS
    auxiliary_head: ClassVar[bool] = False
    solid_probe: ClassVar[bool] = False
    needs_labeled_counts: ClassVar[bool] = False

    def __init__(self, num_classes: int, num_unlabeled: int = 0, collective: Collective | None = None,
                 labeled_counts=None, *, labeled_in_pool=None, **options):
        self._setup(num_classes, num_unlabeled, collective, self.validate(options), labeled_counts, labeled_in_pool)

    @classmethod
    def from_checked(cls, options: dict, num_classes: int, num_unlabeled: int = 0,
                     collective: Collective | None = None, labeled_counts=None, labeled_in_pool=None) -> Method:
        """The method with options a training config has already checked (`validate`'s output):
        they are not checked again."""
        method = cls.__new__(cls)
        method._setup(num_classes, num_unlabeled, collective, dict(options), labeled_counts, labeled_in_pool)
        return method

    def _setup(self, num_classes: int, num_unlabeled: int, collective: Collective | None, config: dict,
               labeled_counts=None, labeled_in_pool=None) -> None:
        if num_classes < 1:
            raise TrainConfigError(f"num_classes must be >= 1, got {num_classes}")
        if self.needs_index and num_unlabeled < 1:
            raise TrainConfigError(f"method {self.name} reads its unlabeled rows by position: num_unlabeled must be "
                                   f">= 1, got {num_unlabeled}")
        self.labeled_counts = None
        if labeled_counts is not None:
            self.labeled_counts = torch.as_tensor(labeled_counts, dtype=torch.float64).flatten()
            if self.labeled_counts.shape != (num_classes,) or not (self.labeled_counts >= 0).all() \
                    or self.labeled_counts.sum() <= 0:
                raise TrainConfigError(f"labeled_counts must be {num_classes} counts >= 0, not all 0, got "
                                       f"{labeled_counts!r}")
        elif self.needs_labeled_counts:
            raise TrainConfigError(f"method {self.name} starts from the labeled class distribution: it needs "
                                   "labeled_counts, the labeled rows per class")
        self.labeled_in_pool = None
        if labeled_in_pool is not None:
            self.labeled_in_pool = torch.as_tensor(labeled_in_pool, dtype=torch.bool).flatten()
            if self.labeled_in_pool.shape != (num_unlabeled,):
                raise TrainConfigError(f"labeled_in_pool must hold a flag per unlabeled row ({num_unlabeled}), "
                                       f"got {tuple(self.labeled_in_pool.shape)}")
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

    @classmethod
    def extra_logits(cls) -> tuple[str, ...]:
        """The names of the further logits this method's `losses` needs (see the module's docstring)."""
        names = [*cls.views]
        if cls.auxiliary_head:
            names += [f"aux_{view}" for view in (*HEAD_VIEWS, *cls.views)]
        if cls.solid_probe:
            names.append("solid")
        return tuple(names)

    def losses(self, logits_x: Tensor, labels: Tensor, logits_weak: Tensor, logits_strong: Tensor,
               unlabeled_index: Tensor | None = None, extras: dict[str, Tensor] | None = None) -> MethodOutput:
        """One step: logits_x (B, C), labels (B,), logits_weak and logits_strong (mu*B, C), the
        unlabeled rows' positions in the unlabeled pool (mu*B,), and the further logits the
        method asks for (`extra_logits`: a labeled view has B rows, an unlabeled one mu*B,
        "solid" one). Updates the state.

        Half-precision logits are computed in float32 (`step_losses` sees at least float32);
        the losses and the mask come back in the logits' dtype."""
        if self.needs_index and unlabeled_index is None:
            raise ValueError(f"{self.name} reads its unlabeled rows by position: losses() needs unlabeled_index")
        out_dtype = logits_x.dtype
        work_dtype = torch.promote_types(out_dtype, torch.float32)
        logits_x, logits_weak, logits_strong = (z.to(work_dtype) for z in (logits_x, logits_weak, logits_strong))
        wanted = self.extra_logits()
        if not wanted:
            return self.step_losses(logits_x, labels, logits_weak, logits_strong, unlabeled_index).to(out_dtype)
        missing = [name for name in wanted if name not in (extras or {})]
        if missing:
            raise ValueError(f"{self.name}: losses() needs the further logits {', '.join(missing)}")
        extras = {name: extras[name].to(work_dtype) for name in wanted}
        return self.step_losses(logits_x, labels, logits_weak, logits_strong, unlabeled_index,
                                extras=extras).to(out_dtype)

    def step_losses(self, logits_x: Tensor, labels: Tensor, logits_weak: Tensor, logits_strong: Tensor,
                    unlabeled_index: Tensor | None) -> MethodOutput:
        """`losses` on logits of at least float32: the method's own computation (a method that
        asks for further logits also takes them, as `extras`)."""
        raise NotImplementedError

    def test_logits(self, logits: Tensor, solid: Tensor | None = None) -> Tensor:
        """The logits that predict at evaluation, from the evaluated model's outputs (N, C), or
        (N, 2C) with an auxiliary head, and with `solid_probe` its outputs on the solid image
        (1, C or 2C): the main head's."""
        return logits[:, :self.num_classes]


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
