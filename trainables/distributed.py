"""The data-parallel collective: batch-level loss quantities over all workers' rows.

`compute_losses` takes every mean, the batch class prior, the CAP pseudo-inverse and the
propensity-weight normalisation through a collective. Here `sum` is a differentiable all-reduce,
so every worker holds the identical global loss; backward through it sums the workers' upstream
gradients (W times the true partial), and DDP's averaging divides by W again. The result is the
single-process gradient of the global batch, exactly.
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


class DistributedCollective:
    """Sums and row gathers across the default process group (equal row counts per worker)."""

    def __init__(self, group=None):
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return dist_nn.all_reduce(x, group=self.group)

    def gather_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, slice]:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.detach().contiguous(), group=self.group)
        start = self.rank * x.shape[0]
        return torch.cat(parts), slice(start, start + x.shape[0])
