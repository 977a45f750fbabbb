"""SoftMatch: uniform distribution alignment and a truncated Gaussian weight (docs/method.md, "Peer methods").

One step, with P = softmax(z_w) (no gradient) and m = ema_m:

1. The model's class distribution: p_model = mean_k P[k] on the first step, then
   p_model = m p_model + (1 - m) mean_k P[k].
2. Uniform alignment with the updated p_model: P~[k] = SumNorm(P[k] * (1/C + 1e-6) / (p_model + 1e-6)).
3. With conf_k = max P~[k]: mu = m mu + (1 - m) mean_k conf_k and
   var = m var + (1 - m) var_k conf_k (unbiased); initially mu = 1/C, var = 1.
4. The weight, with the updated mu and var: mask_k = exp(-min(conf_k - mu, 0)^2 / (2 var / n_sigma^2)).
5. Pseudo-labels from the unaligned P: c_k = argmax P[k]; L_u = mean_k mask_k CE(z_s[k], c_k);
   total = L_x + wu L_u.

Every batch statistic (both means, the variance) is over the global batch through the collective.
Two guards where the formulas are undefined: a global batch of one unlabeled row has no unbiased
variance, so var keeps its value that step; a row exactly at mu with var = 0 (possible only with
ema_m = 0) gets weight 1, the limit of the formula.
"""

import torch
from torch import Tensor

from trainables.losses import global_mean, labeled_loss, unlabeled_loss
from trainables.methods.base import Method, MethodOutput, hard_pseudo_labels
from trainables.options import Option

ALIGN_EPS = 1e-6
"""Added to the target and the model distribution in the alignment ratio."""


class SoftMatch(Method):
    name = "softmatch"
    title = "SoftMatch"
    options = {
        "ema_m": Option(0.999, "momentum m of the class distribution p_model and of the confidence's mean and "
                        "variance", low=0, high=1, high_open=True,
                        search={"loguniform": [0.001, 0.1], "complement": True}),
        "n_sigma": Option(2, "width of the truncated Gaussian in standard deviations: weight "
                          "exp(-min(conf - mu, 0)^2 / (2 var / n_sigma^2))", low=0, low_open=True,
                          search={"choice": [1, 2, 3]}),
    }

    def initial_state(self):
        num_classes = self.num_classes
        return {
            "p_model": torch.full((num_classes,), 1.0 / num_classes),  # unused until p_model_set
            "p_model_set": torch.tensor(False),  # the first step sets p_model to its batch mean
            "prob_max_mu": torch.tensor(1.0 / num_classes),
            "prob_max_var": torch.tensor(1.0),
        }

    def _align(self, probs: Tensor) -> Tensor:
        """Update p_model from the global batch, then align P to the uniform distribution with it."""
        m, p_model = self.config["ema_m"], self.state["p_model"]
        batch_mean = global_mean(probs, self.collective).to(p_model.dtype)
        p_model = torch.where(self.state["p_model_set"], m * p_model + (1 - m) * batch_mean, batch_mean)
        self.state["p_model"] = p_model.detach()
        self.state["p_model_set"] = torch.ones_like(self.state["p_model_set"])

        aligned = probs * (1.0 / self.num_classes + ALIGN_EPS) / (p_model.to(probs.dtype) + ALIGN_EPS)
        return aligned / aligned.sum(dim=1, keepdim=True)

    def _update_moments(self, confidences: Tensor) -> None:
        """mu and var from the global batch's aligned confidences (unbiased variance)."""
        m, collective = self.config["ema_m"], self.collective
        rows = collective.sum(confidences.new_full((), confidences.shape[0]))
        batch_mu = collective.sum(confidences.sum()) / rows
        squares = collective.sum(((confidences - batch_mu) ** 2).sum())
        batch_var = squares / (rows - 1).clamp_min(1)

        mu, var = self.state["prob_max_mu"], self.state["prob_max_var"]
        new_mu = m * mu + (1 - m) * batch_mu.to(mu.dtype)
        new_var = torch.where(rows > 1, m * var + (1 - m) * batch_var.to(var.dtype), var)
        self.state["prob_max_mu"], self.state["prob_max_var"] = new_mu.detach(), new_var.detach()

    def step_losses(self, logits_x, labels, logits_weak, logits_strong, unlabeled_index) -> MethodOutput:
        work_dtype = logits_x.dtype

        labeled = labeled_loss(logits_x, labels, collective=self.collective)

        probs, _, pseudo_labels = hard_pseudo_labels(logits_weak)
        confidences = self._align(probs).max(dim=1).values
        self._update_moments(confidences)
        mu, var = (self.state[key].to(work_dtype) for key in ("prob_max_mu", "prob_max_var"))

        deficit = torch.clamp(confidences - mu, max=0.0)
        gaussian = torch.exp(-(deficit ** 2) / (2 * var / self.config["n_sigma"] ** 2))
        mask = torch.where(deficit < 0, gaussian, torch.ones_like(gaussian))
        unlabeled = unlabeled_loss(logits_strong, pseudo_labels, mask, self.collective)

        total = labeled + self.config["wu"] * unlabeled
        return MethodOutput(total=total, labeled=labeled, unlabeled=unlabeled, mask=mask,
                            stats={"softmatch/mu": self.state["prob_max_mu"].detach().clone(),
                                   "softmatch/var": self.state["prob_max_var"].detach().clone()})
