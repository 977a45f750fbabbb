"""FixMatch losses with the class-aware corrections CAP, CAI and CADR (docs/method.md).

Notation as in docs/method.md: a labeled batch of B rows (``logits_x`` z_l, ``labels`` y), an
unlabeled batch of mu*B rows seen weakly (``logits_weak`` z_w) and strongly (``logits_strong``
z_s), C classes, and the class prior ``p_ema`` (C,) carried in the training state.
`compute_losses` is one step; the functions before it are its named pieces. Pure functions of
tensors: no Ray, no I/O, no globals.

Data parallelism: every batch-level quantity (each mean, the batch class prior, the
pseudo-inverse over the unlabeled rows, the normalisation of the propensity weights) is taken
over the *global* batch through a ``collective``. `LocalCollective` is the single-process
identity; one built on a differentiable all-reduce (``torch.distributed.nn.functional.all_reduce``)
gives every worker the identical global loss, so DDP's gradient averaging reproduces the
single-process gradient exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

PROPENSITY_FLOOR = 1e-12
"""Smallest propensity put into 1/pi, so an all-zero W or a class absent from q stays finite."""


class Collective(Protocol):
    """How batch-level quantities reach the other data-parallel workers."""

    def sum(self, x: Tensor) -> Tensor:
        """Differentiable sum of ``x`` over all workers."""

    def gather_rows(self, x: Tensor) -> tuple[Tensor, slice]:
        """All workers' rows of ``x`` (detached, in rank order) and the slice holding this worker's."""


class LocalCollective:
    """The single-process collective: this worker's batch is the global batch."""

    def sum(self, x: Tensor) -> Tensor:
        return x

    def gather_rows(self, x: Tensor) -> tuple[Tensor, slice]:
        return x.detach(), slice(0, x.shape[0])


@dataclass(frozen=True)
class LossOutput:
    """The losses of one step (0-d tensors) and the state it updates."""

    total: Tensor  # labeled + wu * unlabeled (weight decay is the optimiser's job)
    labeled: Tensor  # L_x, including the CADR term when cadr=True
    unlabeled: Tensor  # L_u, the masked pseudo-label loss, before wu
    cadr: Tensor  # the CADR term alone (0 when cadr=False)
    mask: Tensor  # (mu*B,) float: 1 where this worker's unlabeled row was used
    p_new: Tensor  # (C,) updated class prior, detached: the caller's next p_ema
    thresholds: Tensor  # (C,) class-aware thresholds from p_new


def safe_log(x: Tensor) -> Tensor:
    """log(x) with x floored at the dtype's smallest normal number (never -inf)."""
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def global_mean(values: Tensor, collective: Collective) -> Tensor:
    """Mean over the rows (dim 0) of the global batch: (N, ...) -> (...)."""
    row_count = values.new_full((), values.shape[0])
    return collective.sum(values.sum(dim=0)) / collective.sum(row_count)


def update_prior(p_ema: Tensor, probs_weak: Tensor, momentum: float, collective: Collective) -> Tensor:
    """p_new = m * p_ema + (1 - m) * mean_k P[k], without gradient; (C,), (N, C) -> (C,)."""
    p_batch = global_mean(probs_weak.detach(), collective)
    return momentum * p_ema + (1 - momentum) * p_batch.to(p_ema.dtype)


def class_thresholds(p: Tensor, confidence: float, beta: float) -> Tensor:
    """CAI thresholds t_c = confidence * (p[c] / max(p)) ** beta; (C,) -> (C,).

    The most frequent class keeps the full threshold, rarer classes get lower ones; beta = 0
    gives FixMatch's single threshold.
    """
    return confidence * (p / p.max()) ** beta


def propensity(p_ema: Tensor, probs_weak: Tensor, upper: float, collective: Collective) -> Tensor:
    """CAP's class propensity q = W @ P with W = clip(p_ema @ pinv(P), 0, upper); -> (C,).

    P (N, C) holds the weak-view probabilities of the global unlabeled batch; W (1, N) weighs
    its rows. The pseudo-inverse sees P without gradient.
    """
    all_probs, own_rows = collective.gather_rows(probs_weak.detach())
    # The cutoff for small singular values is tf.linalg.pinv's default, as in the reference.
    cutoff = 10 * max(all_probs.shape) * torch.finfo(all_probs.dtype).eps
    row_weights = (p_ema[None, :] @ torch.linalg.pinv(all_probs, rtol=cutoff)).clamp(0, upper)
    # W is a constant, but the gradient flows through P here, into the weak logits: the
    # reference multiplies the pinv weights with the live probabilities.
    return collective.sum(row_weights[:, own_rows] @ probs_weak)[0]


def normalized_inverse_weights(pi: Tensor, collective: Collective) -> Tensor:
    """w_i = B * (1/pi_i) / sum_j (1/pi_j) over the B rows of the global batch; (B,) -> (B,).

    The weights average to 1. pi is floored at PROPENSITY_FLOOR so 1/pi stays finite.
    """
    inverse = 1 / pi.clamp_min(PROPENSITY_FLOOR)
    return inverse / global_mean(inverse, collective)


CAP_FORMS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    # The reference adds log w_i to the log-probabilities: CE_i - log w_i.
    "reference": lambda cross_entropy, weights: cross_entropy - safe_log(weights),
    # Inverse-propensity weighting: w_i * CE_i.
    "ipw": lambda cross_entropy, weights: weights * cross_entropy,
}
"""How the CAP weight w_i enters labeled row i's loss, by ``cap_form``."""


def labeled_loss(logits_x: Tensor, labels: Tensor, q: Tensor | None = None, cap_form: str = "reference",
                 collective: Collective | None = None) -> Tensor:
    """L_x = mean_i CE(z_l[i], y_i); with CAP (q given), mean_i CAP_FORMS[cap_form](CE_i, w_i)
    where w = normalized_inverse_weights(q[y]). The peer methods use the plain form (no q)."""
    collective = collective or LocalCollective()
    cross_entropy = F.cross_entropy(logits_x, labels, reduction="none")
    if q is not None:
        cross_entropy = CAP_FORMS[cap_form](cross_entropy, normalized_inverse_weights(q[labels], collective))
    return global_mean(cross_entropy, collective)


def pseudo_label_mask(confidences: Tensor, pseudo_labels: Tensor, thresholds: Tensor,
                      confidence: float, class_aware: bool) -> Tensor:
    """Which unlabeled rows count: conf_k >= confidence (FixMatch), or conf_k > t[c_k] (CAI)."""
    if class_aware:
        return confidences > thresholds[pseudo_labels]
    return confidences >= confidence


def unlabeled_loss(logits_strong: Tensor, pseudo_labels: Tensor, mask: Tensor,
                   collective: Collective) -> Tensor:
    """L_u = mean_k mask_k * CE(z_s[k], c_k), the mean over all rows, masked or not."""
    cross_entropy = F.cross_entropy(logits_strong, pseudo_labels, reduction="none")
    return global_mean(mask * cross_entropy, collective)


def cadr_term(logits_x: Tensor, q: Tensor, thresholds: Tensor, collective: Collective) -> Tensor:
    """CADR's correction mean_i mask'_i * log w'_i on the labeled batch.

    c'_i and the mask use the model's own labeled predictions, without gradient:
    c'_i = argmax softmax(z_l[i]), mask'_i = max softmax(z_l[i]) > t[c'_i];
    w' = normalized_inverse_weights(q[c']) (the gradient flows through q).
    """
    confidences, predictions = F.softmax(logits_x.detach(), dim=1).max(dim=1)
    mask = (confidences > thresholds[predictions]).to(logits_x.dtype)
    log_weights = safe_log(normalized_inverse_weights(q[predictions], collective))
    return global_mean(mask * log_weights, collective)


def compute_losses(logits_x: Tensor, labels: Tensor, logits_weak: Tensor, logits_strong: Tensor,
                   p_ema: Tensor, *, cap: bool, cai: bool, cadr: bool, confidence: float, cai_beta: float,
                   cap_momentum: float, upper: float, cap_ema: bool, cap_form: str, wu: float,
                   collective: Collective | None = None) -> LossOutput:
    """The losses of one FixMatch step with CAP / CAI / CADR (docs/method.md).

    Shapes: logits_x (B, C), labels (B,) int64, logits_weak and logits_strong (mu*B, C),
    p_ema (C,), the prior before this step. Rows are this worker's; means and batch statistics
    are over all workers' rows through ``collective`` (default: `LocalCollective`). The options'
    defaults, ranges and meaning are the `fixmatch` method's (trainables/methods/fixmatch.py),
    which checks them once; this function trusts them.

    1. P = softmax(z_w); p_new = m * p_ema + (1 - m) * mean_k P[k], without gradient.
    2. CAP: q = propensity(p_ema, P) (or mean_k P[k] with cap_ema=False), pi_i = q[y_i],
       w = normalized_inverse_weights(pi); L_x = mean_i (CE_i - log w_i) ("reference") or
       mean_i w_i CE_i ("ipw"). Without CAP, L_x = mean_i CE_i.
    3. t = class_thresholds(p_new, confidence, cai_beta).
    4. c_k, conf_k = argmax, max of P[k] (no gradient); mask_k = conf_k >= confidence, or
       conf_k > t[c_k] with CAI; L_u = mean_k mask_k CE(z_s[k], c_k).
    5. CADR (requires CAP): L_x += cadr_term(z_l, q, t).
    6. total = L_x + wu * L_u.

    Half-precision logits are computed in float32 (pinv and 1/pi need the range). Losses and
    mask come back in the logits' dtype; p_new and thresholds in p_ema's, since the prior is
    state that keeps its own precision.
    """
    if collective is None:
        collective = LocalCollective()
    out_dtype = logits_x.dtype
    work_dtype = torch.promote_types(out_dtype, torch.float32)
    logits_x, logits_weak, logits_strong = (z.to(work_dtype) for z in (logits_x, logits_weak, logits_strong))
    p_ema = p_ema.detach()

    probs_weak = F.softmax(logits_weak, dim=1)
    p_new = update_prior(p_ema, probs_weak, cap_momentum, collective)
    thresholds = class_thresholds(p_new, confidence, cai_beta)
    work_thresholds = thresholds.to(work_dtype)

    q = None
    if cap:
        q = (propensity(p_ema.to(work_dtype), probs_weak, upper, collective) if cap_ema
             else global_mean(probs_weak, collective))
    cadr_loss = cadr_term(logits_x, q, work_thresholds, collective) if cadr else logits_x.new_zeros(())
    labeled = labeled_loss(logits_x, labels, q, cap_form, collective) + cadr_loss

    confidences, pseudo_labels = probs_weak.detach().max(dim=1)
    mask = pseudo_label_mask(confidences, pseudo_labels, work_thresholds, confidence,
                             class_aware=cai).to(work_dtype)
    unlabeled = unlabeled_loss(logits_strong, pseudo_labels, mask, collective)

    return LossOutput(
        total=(labeled + wu * unlabeled).to(out_dtype),
        labeled=labeled.to(out_dtype),
        unlabeled=unlabeled.to(out_dtype),
        cadr=cadr_loss.to(out_dtype),
        mask=mask.to(out_dtype),
        p_new=p_new,
        thresholds=thresholds,
    )
