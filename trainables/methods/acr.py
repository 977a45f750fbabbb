"""ACR: adaptive consistency regularisation with a balanced auxiliary classifier (docs/method.md,
"Frontier methods"; Wei and Gan, CVPR 2023, the authors' train.py).

The model has two heads on its shared features: the main head z and the balanced head b (its
auxiliary head, which predicts at evaluation). With py_con the labeled class distribution and
A(tau) = log(py_con ** tau + 1e-12), one step (temperature T, threshold = confidence):

    L_x   = mean_i CE(z_l[i], y_i)                L_x_b = mean_i CE(b_l[i] + A(tau2), y_i)
    P     = softmax((z_w - A(tau_now)) / T)       P_h2  = softmax((z_w - A(tau12)) / T)
    P_b   = softmax(b_w / T)                      P_t   = softmax(z_w / T)       (no gradient)
    L_u   = mean over both strong views of [max P >= c or max P_t >= c] CE(z_s, argmax P)
    L_u_b = mean over both strong views of [max P_b >= c or max P_h2 >= c] CE(b_s, argmax P_h2)

total = (L_x + L_x_b) + wu (L_u + L_u_b). An epoch is `epoch_steps` steps. In epochs after
`est_epoch`, each step moves the estimated unlabeled distribution u_py (uniform at first) toward
the histogram of the balanced head's confident pseudo-labels of the rows that are not labeled rows
too (`labeled_in_pool`, by position), u_py <- ema_u u_py + (1 - ema_u) hist,
and adds its symmetric KL distances to the consistent (py_con), uniform and reversed (py_con
flipped) anchors to `count_KL`. At the start of an epoch after est_epoch,
tau_now = tau1 exp(KL_con) / (exp(KL_con) + exp(KL_uni) + exp(KL_rev)) from the previous epoch's
mean distances (count_KL / epoch_steps; tau_now stays where that is NaN), and count_KL restarts.

State: u_py, count_KL (3,), tau_now (0-d, tau1 at first) and step. Every mean and histogram is over
the global batch.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.losses import global_mean
from trainables.methods.base import Method, MethodOutput
from trainables.methods.simpro import logit_adjustment
from trainables.options import Option

TAU_MIN = 0.0
"""The adaptive tau runs from TAU_MIN (reversed unlabeled data) to tau1 (consistent): the reference's taumin."""


def symmetric_kl(p: Tensor, q: Tensor) -> Tensor:
    """0.5 KL(p || q) + 0.5 KL(q || p), with 0 log 0 = 0: the reference's pair of KLDivLoss(reduction='sum')."""
    return 0.5 * (torch.xlogy(p, p) - p * torch.log(q)).sum() + 0.5 * (torch.xlogy(q, q) - q * torch.log(p)).sum()


class ACR(Method):
    name = "acr"
    title = "ACR"
    views = ("strong2",)
    auxiliary_head = True
    needs_labeled_counts = True
    needs_index = True  # the estimate leaves out the pool's rows that are labeled too
    options = {
        "tau1": Option(2.0, "the main head's pseudo-label adjustment strength at most (consistent unlabeled data); "
                       "adapted once per epoch after est_epoch", low=0, search={"uniform": [0.5, 3.0]}),
        "tau12": Option(2.0, "the balanced head's pseudo-label adjustment strength", low=0,
                        search={"uniform": [0.5, 3.0]}),
        "tau2": Option(2.0, "the balanced head's logit-adjusted labeled loss strength", low=0,
                       search={"uniform": [0.5, 3.0]}),
        "ema_u": Option(0.9, "momentum of the estimated unlabeled distribution u_py", low=0, high=1, high_open=True,
                        search={"loguniform": [0.01, 0.5], "complement": True}),
        "est_epoch": Option(5, "the epoch after which u_py is estimated and tau adapted", low=0),
        "confidence": Option(0.95, "pseudo-label threshold of every mask (the reference's threshold)", low=0, high=1,
                             low_open=True, search={"uniform": [0.7, 0.99]}),
        "T": Option(1.0, "pseudo-label temperature", low=0, low_open=True),
        "epoch_steps": Option(500, "steps per epoch (the reference's eval_step)", low=1),
    }

    def initial_state(self):
        C = self.num_classes
        return {"u_py": torch.full((C,), 1.0 / C), "count_KL": torch.zeros(3),
                "tau_now": torch.tensor(float(self.config["tau1"])), "step": torch.zeros((), dtype=torch.int64)}

    def class_state(self):
        return {"u_py": self.state["u_py"]}

    def anchors(self, dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The consistent (the labeled distribution), uniform and reversed class distributions,
        made once per device and dtype (a copy to the device every step would wait for it)."""
        device = self.state["u_py"].device
        made = self.__dict__.setdefault("_anchors", {})
        if (device, dtype) not in made:
            consistent = (self.labeled_counts / self.labeled_counts.sum()).to(device=device, dtype=dtype)
            made[device, dtype] = (consistent, torch.full_like(consistent, 1.0 / self.num_classes), consistent.flip(0))
        return made[device, dtype]

    def step_losses(self, logits_x, labels, logits_weak, logits_strong, unlabeled_index, extras) -> MethodOutput:
        o, collective, dtype = self.config, self.collective, logits_x.dtype
        self._start_epoch()
        consistent, _, _ = self.anchors(dtype)
        threshold, T = o["confidence"], o["T"]

        labeled = (global_mean(F.cross_entropy(logits_x, labels, reduction="none"), collective)
                   + global_mean(F.cross_entropy(extras["aux_x"] + logit_adjustment(consistent, o["tau2"]), labels,
                                                 reduction="none"), collective))

        weak, weak_balanced = logits_weak.detach(), extras["aux_weak"].detach()
        adjusted = torch.softmax((weak - logit_adjustment(consistent, self.state["tau_now"].to(dtype))) / T, dim=1)
        adjusted_h2 = torch.softmax((weak - logit_adjustment(consistent, o["tau12"])) / T, dim=1)
        balanced = torch.softmax(weak_balanced / T, dim=1)
        plain = torch.softmax(weak / T, dim=1)
        confident = {name: probs.max(dim=1).values >= threshold
                     for name, probs in (("adjusted", adjusted), ("h2", adjusted_h2), ("balanced", balanced),
                                         ("plain", plain))}
        mask = (confident["adjusted"] | confident["plain"]).to(dtype)
        mask_balanced = (confident["balanced"] | confident["h2"]).to(dtype)

        targets, targets_h2 = adjusted.argmax(dim=1), adjusted_h2.argmax(dim=1)
        strong = torch.cat([logits_strong, extras["strong2"]])
        strong_balanced = torch.cat([extras["aux_strong"], extras["aux_strong2"]])
        unlabeled = (
            global_mean(torch.cat([mask, mask]) * F.cross_entropy(strong, targets.repeat(2), reduction="none"),
                        collective)
            + global_mean(torch.cat([mask_balanced, mask_balanced])
                          * F.cross_entropy(strong_balanced, targets_h2.repeat(2), reduction="none"), collective))

        self._estimate(balanced.argmax(dim=1), confident["balanced"] & self._truly_unlabeled(unlabeled_index))
        total = labeled + o["wu"] * unlabeled
        return MethodOutput(total=total, labeled=labeled, unlabeled=unlabeled, mask=mask,
                            stats={"acr/tau": self.state["tau_now"].detach().clone(),
                                   "acr/mask_balanced": global_mean(mask_balanced, collective).detach()})

    def _truly_unlabeled(self, unlabeled_index: Tensor) -> Tensor:
        """Which of the batch's unlabeled rows are not labeled rows too (the reference's targets != -2);
        every row when the pool's labeled rows are not given."""
        if self.labeled_in_pool is None:
            return torch.ones_like(unlabeled_index, dtype=torch.bool)
        if self.labeled_in_pool.device != unlabeled_index.device:
            self.labeled_in_pool = self.labeled_in_pool.to(unlabeled_index.device)
        return ~self.labeled_in_pool[unlabeled_index]

    def _epoch(self) -> Tensor:
        return torch.div(self.state["step"], self.config["epoch_steps"], rounding_mode="floor")

    @torch.no_grad()
    def _start_epoch(self) -> None:
        """At the start of an epoch: after est_epoch, tau from the last epoch's mean distances (kept
        where NaN); count_KL restarts. Selected on the device (no host synchronisation)."""
        state, o = self.state, self.config
        starting = state["step"] % o["epoch_steps"] == 0
        mean_kl = state["count_KL"] / o["epoch_steps"]
        weights = torch.exp(mean_kl)
        tau = TAU_MIN + (o["tau1"] - TAU_MIN) * weights[0] / weights.sum()
        adapt = starting & (self._epoch() > o["est_epoch"]) & ~torch.isnan(tau)
        state["tau_now"] = torch.where(adapt, tau.to(state["tau_now"].dtype), state["tau_now"])
        state["count_KL"] = torch.where(starting, torch.zeros_like(state["count_KL"]), state["count_KL"])

    @torch.no_grad()
    def _estimate(self, predictions: Tensor, confident: Tensor) -> None:
        """After est_epoch: u_py toward the global histogram of the balanced head's confident
        pseudo-labels (when there is one), and the distances to the anchors into count_KL."""
        state, o = self.state, self.config
        dtype = state["u_py"].dtype
        hist = self.collective.sum((F.one_hot(predictions, self.num_classes) * confident[:, None]).sum(dim=0)
                                   .to(dtype))
        estimating = self._epoch() > o["est_epoch"]
        counted = estimating & (hist.sum() > 0)
        u_py = o["ema_u"] * state["u_py"] + (1 - o["ema_u"]) * hist / hist.sum().clamp_min(1)
        u_py = torch.where(counted, u_py, state["u_py"])
        distances = torch.stack([symmetric_kl(anchor, u_py) for anchor in self.anchors(dtype)])
        state["u_py"] = u_py
        state["count_KL"] = torch.where(counted, state["count_KL"] + distances.to(state["count_KL"].dtype),
                                        state["count_KL"])
        state["step"] = state["step"] + 1

    def test_logits(self, logits: Tensor, solid: Tensor | None = None) -> Tensor:
        """The balanced (auxiliary) head's logits: it predicts at evaluation, as in the reference."""
        return logits[:, self.num_classes:]
