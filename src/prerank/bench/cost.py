"""Counted costs of a model on the contract: FLOPs per candidate of ``score`` and item-cache bytes per item."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from prerank.data.batch import Batch
from prerank.models.base import PreRanker, State


def state_bytes_per_row(state: State) -> int:
    """Bytes one row of a state occupies (sum over its tensors of elements per row x element size)."""
    total = 0
    for t in state.values():
        per_row = t[0].numel() if t.dim() > 0 and t.shape[0] > 0 else t.numel()
        total += per_row * t.element_size()
    return total


_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "logsumexp", "prod", "norm", "linalg_vector_norm"}
_NORMALISED = {"_softmax": 5, "_log_softmax": 5, "native_layer_norm": 8, "native_batch_norm": 4}


class FlopCounter(TorchDispatchMode):
    """Count FLOPs of every aten op run inside it.

    Matrix products and convolutions use torch's own FLOP formulas (2 per multiply-add);
    element-wise ops count one FLOP per output element, reductions one per input element,
    softmax / layer norm a few per element. Pure data movement (views, gathers, copies) counts 0.
    torch's FlopCounterMode alone would count a dot product written as ``(u * i).sum(-1)`` as 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        name = packet.__name__
        if packet in flop_registry:
            self.flops += int(flop_registry[packet](*args, **kwargs, out_val=out))
        elif name in _REDUCTIONS:
            self.flops += _numel(args)
        elif name in _NORMALISED:
            self.flops += _NORMALISED[name] * _numel(args)
        elif torch.Tag.pointwise in func.tags:
            self.flops += _numel(out)
        return out


def _numel(tree: Any) -> int:
    return max((t.numel() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)), default=0)


def score_cost(model: PreRanker, request: Batch) -> dict[str, float]:
    """Count FLOPs of the per-candidate part (``score``) for one user over the rows of ``request``.

    ``request`` holds N rows of one request (its user features are read from row 0). Returns
    ``score_flops_per_candidate`` (counted by :class:`FlopCounter`) and ``item_cache_bytes_per_item``.
    """
    model.eval()
    n = len(request)
    with torch.no_grad():
        user = model.encode_user(request.select(slice(0, 1)))
        item = model.encode_item(request)
        with FlopCounter() as counter:
            model.score(user, item, request)
        flops = counter.flops
    return {
        "score_flops_per_candidate": flops / max(n, 1),
        "item_cache_bytes_per_item": float(state_bytes_per_row(item)),
    }
