"""Data-parallel training over processes and machines, on PyTorch's DistributedDataParallel.

``torchrun --nproc-per-node N -m prerank train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment; :func:`setup` joins them into one
process group (``gloo`` on CPU, ``nccl`` on GPU, one GPU per local rank). The semantics, chosen so that the
same command trains the same model on any number of ranks:

- ``batch_size`` (and ``requests_per_batch``, ``shuffle_buffer_rows``) are *global*: each rank takes
  ``1/N`` of them, so N ranks of ``B/N`` rows step like one process of ``B`` rows (DDP averages gradients).
- Each rank reads its own shard of the training row groups (:class:`~prerank.data.parquet.BatchStream`).
  Shards may differ by a row group, so ranks run in lock step (:func:`lockstep`): an epoch ends on every rank
  when the first rank runs out of batches; the few rows left over on the others (at most about a row group a
  rank, different ones each epoch since the row-group order is reshuffled) are not seen that epoch. Without it
  the rank with more batches would wait forever for the others' gradients.
- Validation: each rank scores its shard of the valid split, rank 0 gathers the predictions, computes the
  metrics and sends them to every rank, so all ranks take the same early-stopping decisions.
- Rank 0 alone writes ``metrics.jsonl``, ``last.pt`` and ``best.pt`` (atomically) and logs; the others wait at a
  barrier. Checkpoints hold the unwrapped model and the global options, so a run resumes on any number of ranks
  (the run directory must be on a filesystem every rank sees).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from prerank.layers.collective import rank_and_world
from prerank.models.base import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` processes, and its rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str) -> tuple[Context, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (once per process).

    Returns the context and the device this rank computes on (``cuda`` becomes ``cuda:LOCAL_RANK``).
    Without ``WORLD_SIZE`` > 1 in the environment this is a single process and nothing is initialised.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return Context(), torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = device.startswith("cuda")
    if not dist.is_initialized():
        if gpu and not dist.is_nccl_available():
            raise ConfigError("distributed training on cuda needs the nccl backend, which this torch lacks")
        if gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = rank_and_world()
    ctx = Context(rank, world, local_rank)
    return ctx, torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)


def current() -> Context:
    """The context of an already-initialised process group (a single process otherwise)."""
    rank, world = rank_and_world()
    return Context(rank, world, int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0)


def local_share(value: int, ctx: Context, what: str) -> int:
    """This rank's share of a global ``value`` (batch rows, requests); it must divide evenly."""
    if value % ctx.world_size:
        raise ConfigError(f"{what} {value} must be a multiple of the number of ranks ({ctx.world_size})")
    return value // ctx.world_size


def wrap(module: nn.Module, ctx: Context) -> nn.Module:
    """``module`` in DistributedDataParallel when there are several ranks (its gradients averaged over ranks).

    ``find_unused_parameters``: a step may leave parameters unused (a feature absent from the batch, a model's
    branch that a batch does not reach); DDP must then not wait for their gradients.
    """
    if not ctx.enabled:
        return module
    return nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)


def _flag_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def lockstep(batches: Iterable[T], ctx: Context) -> Iterator[T]:
    """Batches while *every* rank still has one (one tiny all-reduce a step); all of them in one process."""
    if not ctx.enabled:
        yield from batches
        return
    it = iter(batches)
    flag = torch.zeros(1, dtype=torch.int64, device=_flag_device())
    while True:
        batch = next(it, None)
        flag.fill_(batch is not None)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not int(flag):
            return
        yield batch  # type: ignore[misc]


def sum_float(value: float, ctx: Context) -> float:
    """``value`` summed over ranks."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t)


def gather_to_main(obj: Any, ctx: Context) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the others."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def from_main(obj: T, ctx: Context) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()


def teardown(wait: bool = True) -> None:
    """Leave the process group (at the end of a ``torchrun`` process).

    ``wait``: first wait until every rank gets here. A rank that finishes first (the others still evaluating or
    writing) would otherwise tear its connections down while a peer may still use them, and the peer's
    communication thread can abort that process at exit. A failing rank leaves without waiting, since its peers
    may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
