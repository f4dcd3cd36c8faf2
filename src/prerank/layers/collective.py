"""Collectives for in-batch loss terms under distributed training; the identity in a single process.

Under ``torchrun`` each rank holds its local slice of the global batch. A loss over the whole batch
(IntTower's in-batch contrastive loss) gathers the other ranks' rows with :func:`gather_rows`, whose
backward sums every rank's gradient for a rank's own rows, so that DistributedDataParallel's average of the
ranks' gradients is the gradient of the global-batch loss. Outside an initialised process group of more than
one rank, both functions return their input unchanged and cost nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        world = dist.get_world_size()
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        counts = [int(s) for s in sizes]
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        rank = dist.get_rank()
        ctx.start, ctx.n = sum(counts[:rank]), x.shape[0]
        offset = torch.tensor(ctx.start, device=x.device)
        ctx.mark_non_differentiable(offset)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]), offset

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _offset: Tensor) -> Tensor:  # type: ignore[override]
        # every rank's loss may depend on this rank's rows: their gradient is the sum over ranks
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.n]


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' ``x`` ``[B_r, ...]`` concatenated in rank order ``[sum_r B_r, ...]``, and where this rank's rows
    start. Differentiable; local batch sizes may differ. Every rank must call it (a collective)."""
    _, world = rank_and_world()
    if world == 1:
        return x, 0
    out, offset = _GatherRows.apply(x)
    return out, int(offset)


def sum_over_ranks(value: int) -> int:
    """``value`` summed over ranks (no gradient), e.g. the global number of positives of a batch."""
    _, world = rank_and_world()
    if world == 1:
        return value
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t)
