"""FreeMatch: a self-adaptive threshold and a self-adaptive fairness term (docs/method.md, "Peer methods").

State, all updated from the step's weak-view probabilities P = softmax(z_w) BEFORE the mask is taken:

    time_p      tau_t = m tau + (1 - m) mean_k max P[k]   (or the 0.8 quantile of max P[k] with
                use_quantile; with clip_thresh tau_t is then clipped to [0, 0.95] and kept clipped)
    p_model     p~ = m p~ + (1 - m) mean_k P[k]
    label_hist  h~ = m h~ + (1 - m) hist(argmax P) / N

Initial values: tau = 1/C, p~ = h~ = 1/C. The step, with c_k = argmax P[k], conf_k = max P[k]:

    mask_k = conf_k >= tau_t * p~[c_k] / max p~
    L_u    = mean_k mask_k CE(z_s[k], c_k)
    L_f    = sum_c SumNorm(p~ / h~)_c * log(SumNorm(pbar_s / hbar_s)_c + 1e-12)

where pbar_s and hbar_s are the mean strong-view probabilities and the normalised histogram of
the strong-view argmax over the masked rows, 1/h with its infinities set to 0 (no gradient
through either scaler), and L_f = 0 when no row is masked. total = L_x + wu L_u + ent_loss_ratio L_f.

Every batch statistic (the means, the quantile, the histograms, the masked-row means and counts
of L_f) is over the global batch through the collective, so data-parallel workers keep the
same state and the same loss as one process given the whole batch.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.losses import global_mean, labeled_loss, unlabeled_loss
from trainables.methods.base import Method, MethodOutput, hard_pseudo_labels
from trainables.options import Option

QUANTILE = 0.8
"""Which quantile of the batch's max probabilities tau follows with use_quantile."""
CLIP_HIGH = 0.95
"""clip_thresh keeps tau in [0, CLIP_HIGH]."""
LOG_EPS = 1e-12
"""Added inside the log of the fairness term."""


def inverse_or_zero(x: Tensor) -> Tensor:
    """1/x with the +infinities (x == 0) set to 0, without gradient."""
    inverse = 1 / x.detach()
    return torch.where(torch.isposinf(inverse), torch.zeros_like(inverse), inverse)


def sum_normalize(x: Tensor) -> Tensor:
    """x / sum(x) over the last dimension, the sum floored at the dtype's tiny (an all-zero x stays 0)."""
    return x / x.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


class FreeMatch(Method):
    name = "freematch"
    title = "FreeMatch"
    options = {
        "ema_m": Option(0.999, "momentum m of the threshold tau, the class model p_model and the label histogram",
                        low=0, high=1, high_open=True, search={"loguniform": [0.001, 0.1], "complement": True}),
        "ent_loss_ratio": Option(0.01, "weight of the self-adaptive fairness term L_f", low=0,
                                 search={"loguniform": [0.001, 0.1]}),
        "use_quantile": Option(False, "tau follows the batch's 0.8 quantile of the max probability, not its mean"),
        "clip_thresh": Option(False, "clip tau to [0, 0.95] after every update"),
    }

    def initial_state(self):
        uniform = torch.full((self.num_classes,), 1.0 / self.num_classes)
        return {"time_p": uniform.mean(), "p_model": uniform, "label_hist": uniform.clone()}

    def _update_state(self, probs: Tensor, confidences: Tensor, predictions: Tensor) -> None:
        """tau, p~ and h~ from the global batch's weak-view probabilities (no gradient)."""
        m, collective = self.config["ema_m"], self.collective
        if self.config["use_quantile"]:
            all_confidences, _ = collective.gather_rows(confidences)
            batch_tau = torch.quantile(all_confidences, QUANTILE)
        else:
            batch_tau = global_mean(confidences, collective)
        time_p = self.state["time_p"]
        time_p = m * time_p + (1 - m) * batch_tau.to(time_p.dtype)
        if self.config["clip_thresh"]:
            time_p = time_p.clamp(0.0, CLIP_HIGH)

        p_model = self.state["p_model"]
        p_model = m * p_model + (1 - m) * global_mean(probs, collective).to(p_model.dtype)

        counts = collective.sum(F.one_hot(predictions, self.num_classes).to(probs.dtype).sum(dim=0))
        label_hist = self.state["label_hist"]
        label_hist = m * label_hist + (1 - m) * (counts / counts.sum()).to(label_hist.dtype)

        self.state["time_p"], self.state["p_model"], self.state["label_hist"] = (
            time_p.detach(), p_model.detach(), label_hist.detach())

    def _fairness(self, logits_strong: Tensor, mask: Tensor, p_model: Tensor, label_hist: Tensor) -> Tensor:
        """L_f over the global batch's masked rows; 0 when no row is masked. The gradient flows
        only through the masked rows' strong-view probabilities."""
        collective, dtype = self.collective, logits_strong.dtype
        probs_strong = F.softmax(logits_strong, dim=1)
        predictions = probs_strong.detach().argmax(dim=1)
        count = collective.sum(mask.sum())
        present = count > 0
        safe_count = count.clamp_min(1)
        mean_probs = collective.sum((mask[:, None] * probs_strong).sum(dim=0)) / safe_count
        hist = collective.sum((mask[:, None] * F.one_hot(predictions, self.num_classes).to(dtype)).sum(dim=0))
        hist = hist / safe_count

        target = sum_normalize(p_model * inverse_or_zero(label_hist))
        prediction = sum_normalize(mean_probs * inverse_or_zero(hist))
        term = (target * torch.log(prediction + LOG_EPS)).sum()
        # No masked row: the term is 0. Every quantity above stays finite then (count floored,
        # sums floored), so the zero gradient does not turn into NaN.
        return torch.where(present, term, torch.zeros_like(term))

    def step_losses(self, logits_x, labels, logits_weak, logits_strong, unlabeled_index) -> MethodOutput:
        work_dtype = logits_x.dtype

        labeled = labeled_loss(logits_x, labels, collective=self.collective)

        probs, confidences, pseudo_labels = hard_pseudo_labels(logits_weak)
        self._update_state(probs, confidences, pseudo_labels)
        time_p, p_model, label_hist = (self.state[key].to(work_dtype) for key in ("time_p", "p_model", "label_hist"))

        modulation = p_model / p_model.max()
        mask = (confidences >= time_p * modulation[pseudo_labels]).to(work_dtype)
        unlabeled = unlabeled_loss(logits_strong, pseudo_labels, mask, self.collective)
        fairness = self._fairness(logits_strong, mask, p_model, label_hist)

        total = labeled + self.config["wu"] * unlabeled + self.config["ent_loss_ratio"] * fairness
        return MethodOutput(total=total, labeled=labeled, unlabeled=unlabeled, mask=mask,
                            stats={"loss/entropy": fairness.detach(),
                                   "freematch/tau": self.state["time_p"].detach().clone()})
