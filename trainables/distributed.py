"""The data-parallel collective: batch-level loss quantities over all workers' rows.

Every method takes its means, batch statistics, CAP's pseudo-inverse and the propensity-weight
normalisation through a collective. Here `sum` is a differentiable all-reduce, so every worker
holds the identical global loss; backward through it sums the workers' upstream gradients (W
times the true partial), and DDP's averaging divides by W again. The result is the
single-process gradient of the global batch, exactly.
"""

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    """sum over workers of x; its gradient is the sum over workers of the upstream gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        total = x.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class DistributedCollective:
    """Sums and row gathers across the default process group (equal row counts per worker)."""

    def __init__(self, group=None):
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(x, self.group)

    def gather_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, slice]:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.detach().contiguous(), group=self.group)
        start = self.rank * x.shape[0]
        return torch.cat(parts), slice(start, start + x.shape[0])
