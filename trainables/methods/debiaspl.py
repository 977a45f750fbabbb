"""DebiasPL: FixMatch with debiased pseudo-labels and an adaptive marginal loss (docs/method.md,
"Peer methods").

State: `qhat` (C,), a moving average of the model's predicted class distribution on the
unlabeled data, 1/C at first. One step:

1. Pseudo-labels from the debiased weak probabilities softmax(z_w - tau log qhat), with the qhat
   of before this step and no gradient: c_k = argmax, mask_k = max >= confidence.
2. qhat <- qhat_m qhat + (1 - qhat_m) mean_k softmax(z_w)[k] (the plain weak probabilities of the
   global batch, no gradient).
3. Adaptive marginal loss: L_u = mean_k mask_k CE(z_s[k] + tau log qhat, c_k) with the updated
   qhat (a constant: no gradient reaches it).
4. L_x = mean_i CE(z_l[i], y_i), total = L_x + wu L_u.

tau = 0 gives FixMatch. Every mean is over the global batch (through the collective), so all
data-parallel workers keep the same qhat.
"""

import torch

from trainables.losses import global_mean, labeled_loss, safe_log, unlabeled_loss
from trainables.methods.base import Method, MethodOutput, hard_pseudo_labels
from trainables.options import Option


class DebiasPL(Method):
    name = "debiaspl"
    title = "DebiasPL"
    options = {
        "tau": Option(0.4, "debiasing strength: pseudo-labels from softmax(z_w - tau log qhat), strong logits "
                      "z_s + tau log qhat (0: FixMatch)", low=0, search={"uniform": [0.1, 1.0]}),
        "qhat_m": Option(0.999, "momentum of qhat, the moving average of the weak predictions", low=0, high=1,
                         high_open=True, search={"loguniform": [0.001, 0.1], "complement": True}),
        "confidence": Option(0.95, "pseudo-label threshold on the debiased probabilities", low=0, high=1,
                             low_open=True, search={"uniform": [0.7, 0.99]}),
    }

    def initial_state(self):
        return {"qhat": torch.full((self.num_classes,), 1.0 / self.num_classes)}

    def step_losses(self, logits_x, labels, logits_weak, logits_strong, unlabeled_index) -> MethodOutput:
        tau, momentum = self.config["tau"], self.config["qhat_m"]
        work_dtype = logits_x.dtype
        qhat = self.state["qhat"].detach()

        # 1. Debiased pseudo-labels, with qhat from before this step.
        _, max_probs, pseudo_labels = hard_pseudo_labels(logits_weak - tau * safe_log(qhat.to(work_dtype)))
        mask = (max_probs >= self.config["confidence"]).to(work_dtype)

        # 2. qhat follows the plain (not debiased) weak probabilities of the global batch.
        probs_weak = torch.softmax(logits_weak.detach(), dim=1)
        qhat = momentum * qhat + (1 - momentum) * global_mean(probs_weak, self.collective).detach().to(qhat.dtype)
        self.state["qhat"] = qhat

        # 3. The adaptive marginal loss adds tau log qhat, the updated qhat, to the strong logits.
        adjusted_strong = logits_strong + tau * safe_log(qhat.to(work_dtype))
        unlabeled = unlabeled_loss(adjusted_strong, pseudo_labels, mask, self.collective)
        labeled = labeled_loss(logits_x, labels, collective=self.collective)
        total = labeled + self.config["wu"] * unlabeled
        return MethodOutput(total=total, labeled=labeled, unlabeled=unlabeled, mask=mask)
