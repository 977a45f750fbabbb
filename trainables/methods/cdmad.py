"""CDMAD: class-distribution-mismatch-aware debiasing (docs/method.md, "Frontier methods"; Lee and
Kim, CVPR 2024, the authors' fixmatchcdmad.py).

The classifier's bias is measured as its logits on a solid image, which shows no class: `solid`,
the training model's logits on one white image (without gradient). One step, with `step` the
steps taken so far and an epoch of `epoch_steps` steps:

1. Soft pseudo-labels P = softmax(z_w - solid) once the epoch passes `debiasstart`
   (step >= (debiasstart + 1) epoch_steps), softmax(z_w) before; without gradient.
   mask_k = max P[k] >= confidence (the reference's tau, 0: every row).
2. L_x = -mean_i log(softmax(z_l[i])[y_i] + 1e-8).
3. L_u = -mean over both strong views of mask_k sum_c P[k, c] log(softmax(z_s[k])[c] + 1e-8).

total = L_x + wu L_u. At evaluation the prediction is argmax(z - z(white)), both from the
evaluated model in eval mode (`test_logits`). State: `step`. Every mean is over the global batch.
"""

import torch
from torch import Tensor

from trainables.losses import global_mean
from trainables.methods.base import Method, MethodOutput
from trainables.options import Option

LOG_EPS = 1e-8
"""Added to the softmax inside the log of both losses, as the reference's SemiLoss does."""


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """-sum_c targets[c] log(softmax(logits)[c] + 1e-8) per row: the reference's SemiLoss."""
    return -(torch.log(torch.softmax(logits, dim=1) + LOG_EPS) * targets).sum(dim=1)


class CDMAD(Method):
    name = "cdmad"
    title = "CDMAD"
    views = ("strong2",)
    solid_probe = True
    options = {
        "confidence": Option(0.0, "pseudo-label threshold on the (debiased) weak probabilities (the reference's "
                             "tau; 0: every row)", low=0, high=1, search={"uniform": [0.0, 0.95]}),
        "debiasstart": Option(100, "the epoch after which pseudo-labels are debiased: from step (debiasstart + 1) "
                              "* epoch_steps (-1: from the first step)", low=-1,
                              search={"choice": [-1, 0, 2, 10, 100]}),
        "epoch_steps": Option(500, "steps per epoch (the reference's val_iteration)", low=1),
    }

    def initial_state(self):
        return {"step": torch.zeros((), dtype=torch.int64)}

    def debiasing(self) -> Tensor:
        """Whether this step's pseudo-labels are debiased: the epoch is past debiasstart (0-d bool)."""
        epoch = torch.div(self.state["step"], self.config["epoch_steps"], rounding_mode="floor")
        return epoch > self.config["debiasstart"]

    def step_losses(self, logits_x, labels, logits_weak, logits_strong, unlabeled_index, extras) -> MethodOutput:
        debiasing = self.debiasing()
        bias = torch.where(debiasing, extras["solid"].detach(), torch.zeros_like(extras["solid"]))
        pseudo_labels = torch.softmax(logits_weak.detach() - bias, dim=1)
        mask = (pseudo_labels.max(dim=1).values >= self.config["confidence"]).to(logits_x.dtype)

        one_hot = torch.nn.functional.one_hot(labels, self.num_classes).to(logits_x.dtype)
        labeled = global_mean(soft_cross_entropy(logits_x, one_hot), self.collective)
        strong_views = torch.cat([logits_strong, extras["strong2"]])
        unlabeled_ce = soft_cross_entropy(strong_views, torch.cat([pseudo_labels, pseudo_labels]))
        unlabeled = global_mean(torch.cat([mask, mask]) * unlabeled_ce, self.collective)

        self.state["step"] = self.state["step"] + 1
        total = labeled + self.config["wu"] * unlabeled
        return MethodOutput(total=total, labeled=labeled, unlabeled=unlabeled, mask=mask,
                            stats={"cdmad/debiasing": debiasing.to(logits_x.dtype)})

    def test_logits(self, logits: Tensor, solid: Tensor | None = None) -> Tensor:
        """The logits less those of the white image: the classifier's bias removed at test time too."""
        return (logits - solid)[:, :self.num_classes]
