"""SimPro: FixMatch with logit adjustment by estimated class priors, for an unknown unlabeled
class distribution (docs/method.md, "Frontier methods"; Du et al., ICML 2024, the authors'
SimPro/train.py).

State: the joint prior `pi` (the labeled class distribution at first) and the unlabeled prior
`pi_u` (1/C at first), both moved once per epoch; during an epoch, the labeled label counts
`count_labeled` and the masked pseudo-label mass `dis_unlabeled`; `step`, the steps taken. An
epoch is `epoch_steps` steps, as the reference's (its eval_step). One step, with
A = tau log(pi), A_u = tau log(pi_u) (each log(prior ** tau + 1e-12)):

1. Soft pseudo-labels P = softmax(z_w + A_u) without gradient; mask_k = max P[k] >= confidence.
2. L_x = mean over the weak and the strong labeled view of CE(z_l + A, y) / scale_ratio, where
   scale_ratio = floor(N_u / (mu B)) / floor(N_l / B) (unlabeled over labeled batches per pass,
   each at least 1).
3. L_u = mean over both strong unlabeled views of mask_k CE(z_s + A, P[k]) (soft targets).
4. count_labeled += hist(y); dis_unlabeled += sum_k mask_k P[k]. At the end of an epoch:
   pi_u <- ema_u pi_u + (1 - ema_u) dis_unlabeled / (sum dis_unlabeled + 1),
   pi <- ema_u pi + (1 - ema_u) SumNorm(count_labeled + dis_unlabeled), and both counts restart.

total = L_x + wu L_u. Every sum and mean is over the global batch (through the collective), so
all data-parallel workers keep the same priors.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.errors import TrainConfigError
from trainables.losses import global_mean
from trainables.methods.base import Method, MethodOutput
from trainables.options import Option

PRIOR_EPS = 1e-12
"""Added to prior ** tau inside the log of the logit adjustment, as the reference does."""


def logit_adjustment(prior: Tensor, tau: float) -> Tensor:
    """log(prior ** tau + 1e-12): the reference's compute_adjustment_by_py."""
    return torch.log(prior ** tau + PRIOR_EPS)


def batches_per_pass(rows: int, batch_rows: Tensor) -> Tensor:
    """floor(rows / batch_rows), at least 1: the batches of a loader that drops the last partial one."""
    return torch.clamp_min(torch.div(rows, batch_rows, rounding_mode="floor"), 1)


class SimPro(Method):
    name = "simpro"
    title = "SimPro"
    views = ("labeled_strong", "strong2")
    needs_labeled_counts = True
    options = {
        "tau": Option(1.0, "logit-adjustment strength: logits + tau log(prior) (the reference's scripts use 2 "
                      "for CIFAR-10)", low=0, search={"uniform": [0.5, 3.0]}),
        "ema_u": Option(0.9, "momentum of the priors pi and pi_u, moved once per epoch", low=0, high=1,
                        high_open=True, search={"loguniform": [0.01, 0.5], "complement": True}),
        "confidence": Option(0.95, "pseudo-label threshold on the adjusted weak probabilities (the reference's "
                             "threshold)", low=0, high=1, search={"uniform": [0.7, 0.99]}),
        "epoch_steps": Option(500, "steps per epoch: the priors move at the end of each (the reference's "
                              "eval_step)", low=1),
    }

    def initial_state(self):
        if self.num_unlabeled < 1:
            raise TrainConfigError(f"method {self.name} weighs the labeled loss by the unlabeled pool's size: "
                                   f"num_unlabeled must be >= 1, got {self.num_unlabeled}")
        C = self.num_classes
        labeled = self.labeled_counts.to(torch.get_default_dtype())
        return {"pi": labeled / labeled.sum(), "pi_u": torch.full((C,), 1.0 / C),
                "dis_unlabeled": torch.zeros(C), "count_labeled": torch.zeros(C, dtype=torch.int64),
                "step": torch.zeros((), dtype=torch.int64)}

    def class_state(self):
        return {"pi": self.state["pi"], "pi_u": self.state["pi_u"]}

    def scale_ratio(self, labeled_rows: int, unlabeled_rows: int, like: Tensor) -> Tensor:
        """Unlabeled over labeled batches per pass over each set, at the global batch: summed over
        the workers once per batch shape, not every step (a copy to the device and a collective)."""
        made = self.__dict__.setdefault("_scale_ratio", {})
        key = (labeled_rows, unlabeled_rows, like.device, like.dtype)
        if key not in made:
            batch, unlabeled_batch = self.collective.sum(like.new_tensor([float(labeled_rows),
                                                                          float(unlabeled_rows)]))
            labeled_total = float(self.labeled_counts.sum())
            made[key] = batches_per_pass(self.num_unlabeled, unlabeled_batch) / batches_per_pass(labeled_total, batch)
        return made[key]

    def step_losses(self, logits_x, labels, logits_weak, logits_strong, unlabeled_index, extras) -> MethodOutput:
        tau, collective, dtype = self.config["tau"], self.collective, logits_x.dtype
        adjustment = logit_adjustment(self.state["pi"], tau).to(dtype)
        adjustment_u = logit_adjustment(self.state["pi_u"], tau).to(dtype)

        pseudo_labels = torch.softmax(logits_weak.detach() + adjustment_u, dim=1)
        mask = (pseudo_labels.max(dim=1).values >= self.config["confidence"]).to(dtype)

        labeled_views = torch.cat([logits_x, extras["labeled_strong"]]) + adjustment
        labeled_ce = F.cross_entropy(labeled_views, torch.cat([labels, labels]), reduction="none")
        scale_ratio = self.scale_ratio(len(labels), len(logits_weak), logits_x)
        labeled = global_mean(labeled_ce, collective) / scale_ratio

        strong_views = torch.cat([logits_strong, extras["strong2"]]) + adjustment
        unlabeled_ce = F.cross_entropy(strong_views, torch.cat([pseudo_labels, pseudo_labels]), reduction="none")
        unlabeled = global_mean(torch.cat([mask, mask]) * unlabeled_ce, collective)

        self._count(labels, pseudo_labels, mask)
        total = labeled + self.config["wu"] * unlabeled
        return MethodOutput(total=total, labeled=labeled, unlabeled=unlabeled, mask=mask)

    @torch.no_grad()
    def _count(self, labels: Tensor, pseudo_labels: Tensor, mask: Tensor) -> None:
        """This step's counts into the epoch's; at the end of an epoch the priors move and the counts
        restart (selected on the device: no host synchronisation per step)."""
        state, collective = self.state, self.collective
        counts = state["count_labeled"] + collective.sum(
            torch.bincount(labels, minlength=self.num_classes).to(state["count_labeled"].device))
        mass = state["dis_unlabeled"] + collective.sum((mask[:, None] * pseudo_labels).sum(dim=0)).to(
            state["dis_unlabeled"].dtype)
        state["step"] = state["step"] + 1
        epoch_end = state["step"] % self.config["epoch_steps"] == 0

        momentum = self.config["ema_u"]
        pi_u = momentum * state["pi_u"] + (1 - momentum) * mass / (mass.sum() + 1)
        joint = counts.to(mass.dtype) + mass
        pi = momentum * state["pi"] + (1 - momentum) * joint / joint.sum()
        state["pi_u"] = torch.where(epoch_end, pi_u, state["pi_u"])
        state["pi"] = torch.where(epoch_end, pi, state["pi"])
        state["dis_unlabeled"] = torch.where(epoch_end, torch.zeros_like(mass), mass)
        state["count_labeled"] = torch.where(epoch_end, torch.zeros_like(counts), counts)
