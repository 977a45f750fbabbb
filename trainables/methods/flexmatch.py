"""FlexMatch: FixMatch with class-wise thresholds from curriculum pseudo-labeling (docs/method.md,
"Peer methods").

State: `selected_label` (num_unlabeled,) int64, the last confident pseudo-label of every unlabeled
row (-1 until one passes `confidence`), and `classwise_acc` (C,), the learning effects sigma_c
derived from it. One step:

1. P = softmax(z_w) without gradient; c_k = argmax P[k], conf_k = max P[k].
2. mask_k = conf_k >= confidence * M(sigma[c_k]) with M(x) = x / (2 - x), sigma from before this
   step (at first all 0, so every row counts).
3. Rows with conf_k >= confidence write c_k into `selected_label` at their position.
4. counts = how many memory entries hold each value (-1 included); unless one value fills the
   whole memory, sigma_c = counts[c] / max(counts), the maximum over all values with
   `thresh_warmup`, over the classes only without it.
5. L_x = mean_i CE(z_l[i], y_i), L_u = mean_k mask_k CE(z_s[k], c_k), total = L_x + wu L_u.

Data parallelism: the positions, pseudo-labels and selections of all workers' rows are gathered,
so every worker writes the same entries (a position seen twice in one global batch keeps the
last in rank order) and keeps the same memory and sigma as one process given the whole batch.
"""

import torch

from trainables.losses import labeled_loss, unlabeled_loss
from trainables.methods.base import Method, MethodOutput, hard_pseudo_labels
from trainables.options import Option

UNUSED = -1
"""The memory's entry for a row that has not yet had a confident prediction."""


def nonlinear_mapping(sigma: torch.Tensor) -> torch.Tensor:
    """FlexMatch's convex mapping M(x) = x / (2 - x) of the learning effects: M(0) = 0, M(1) = 1."""
    return sigma / (2.0 - sigma)


class FlexMatch(Method):
    name = "flexmatch"
    title = "FlexMatch"
    options = {
        "confidence": Option(0.95, "pseudo-label threshold tau: class c needs max p >= tau * M(sigma_c), and a row "
                             "enters the memory when max p >= tau", low=0, high=1, low_open=True,
                             search={"uniform": [0.7, 0.99]}),
        "thresh_warmup": Option(True, "threshold warm-up: normalise the class counts by the largest count including "
                                "the rows not yet selected (false: by the largest class count)",
                                search={"choice": [True, False]}),
    }
    needs_index = True

    def initial_state(self):
        return {
            "selected_label": torch.full((self.num_unlabeled,), UNUSED, dtype=torch.long),
            "classwise_acc": torch.zeros(self.num_classes),
        }

    def step_losses(self, logits_x, labels, logits_weak, logits_strong, unlabeled_index) -> MethodOutput:
        confidence = self.config["confidence"]
        work_dtype = logits_x.dtype

        _, max_probs, pseudo_labels = hard_pseudo_labels(logits_weak)
        sigma = self.state["classwise_acc"].to(work_dtype)
        thresholds = confidence * nonlinear_mapping(sigma)  # the learning effects of before this step
        mask = (max_probs >= thresholds[pseudo_labels]).to(work_dtype)
        self._update_memory(unlabeled_index, pseudo_labels, max_probs >= confidence)

        labeled = labeled_loss(logits_x, labels, collective=self.collective)
        unlabeled = unlabeled_loss(logits_strong, pseudo_labels, mask, self.collective)
        total = labeled + self.config["wu"] * unlabeled
        unused = (self.state["selected_label"] == UNUSED).float().mean()
        return MethodOutput(total=total, labeled=labeled, unlabeled=unlabeled, mask=mask,
                            stats={"flexmatch/unused": unused})

    @torch.no_grad()
    def _update_memory(self, positions, pseudo_labels, selected) -> None:
        """Write the selected rows of the global batch into the memory, then recompute sigma."""
        memory = self.state["selected_label"]
        rows, _ = self.collective.gather_rows(
            torch.stack([positions.to(memory.device, torch.long), pseudo_labels.to(memory.device, torch.long),
                         selected.to(memory.device, torch.long)], dim=1))
        all_positions, all_labels, all_selected = rows.unbind(dim=1)
        # For each position, the last selected row (in rank order) that names it, or -1: a
        # deterministic choice even when a position occurs twice, with no host synchronisation.
        order = torch.arange(len(rows), device=memory.device)
        writer = torch.full_like(memory, -1).scatter_reduce(
            0, all_positions, torch.where(all_selected.bool(), order, -1), reduce="amax")
        memory = torch.where(writer >= 0, all_labels[writer.clamp_min(0)], memory)
        self.state["selected_label"] = memory

        counts = torch.bincount(memory + 1, minlength=self.num_classes + 1)  # counts[0]: the unused rows
        class_counts = counts[1:]
        largest = counts.max() if self.config["thresh_warmup"] else class_counts.max()
        sigma = self.state["classwise_acc"]
        work = torch.promote_types(sigma.dtype, torch.float32)
        learned = class_counts.to(work) / largest.clamp_min(1).to(work)
        # Only once the memory holds more than one value (docs/method.md).
        self.state["classwise_acc"] = torch.where(counts.max() < len(memory), learned, sigma.to(work)).to(sigma.dtype)
