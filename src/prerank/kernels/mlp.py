"""One row through an MLP, or through RankTower's gated pair of MLPs, in one native call (``mlp.c``).

A served request encodes one user, and a small tower spends most of its time in the fixed cost of its PyTorch
operator calls (a few per layer), not in arithmetic. :func:`mlp_row` runs the whole tower at once. The weights are
read in place, so the result always follows the module's current parameters. Float32 only, no autograd (it runs
only where gradients are off); None where the native kernel is unavailable.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prerank.kernels.native import function

NONE, RELU, SIGMOID = 0, 1, 2  # the activation after a layer (mlp.c)
Layer = tuple[Tensor, Tensor, int]  # weight [out, in], bias [out], and the activation that follows
_P, _I = ctypes.c_void_p, ctypes.c_int64
ARGTYPES = (_P, _I, _I, _P, _P, _I, _P, _P)


@dataclass(frozen=True)
class MlpPlan:
    """The layers of :func:`mlp_row` checked and bound for ``mlp.c``: ``c_ints`` holds each layer's in and out widths
    and activation, ``c_ptrs`` its weight's and bias's addresses (of the storages in ``held``, kept alive); ``n_a``,
    ``n_b`` the layers of the chain and of the gate; ``in_dim``, ``out_dim`` the row's widths and ``width`` the widest
    layer. Values changed in place are seen; replaced weights are not (build a new plan)."""

    n_a: int
    n_b: int
    in_dim: int
    out_dim: int
    width: int
    held: tuple[Tensor, ...]
    c_ints: ctypes.Array
    c_ptrs: ctypes.Array

    @classmethod
    def build(cls, in_dim: int, chain: Sequence[Layer], gate: Sequence[Layer] = ()) -> MlpPlan | None:
        """The plan of ``chain`` (and ``gate``) for rows of ``in_dim``, or None where a weight or bias is not a
        contiguous float32 tensor or there are no layers. Widths that do not chain raise ValueError naming the
        layer."""
        if not chain:
            return None
        widths = [check_chain(in_dim, part) for part in (chain, gate)]
        out = chain[-1][0].shape[0]
        if gate and widths[1] != out:
            raise ValueError(f"the gate has {widths[1]} outputs, the MLP {out}")
        arrays = affine_arrays([*chain, *gate])
        if arrays is None:
            return None
        width = max(w.shape[0] for w, _, _ in (*chain, *gate))
        return cls(len(chain), len(gate), in_dim, out, width, *arrays)

    def run(self, x: Tensor) -> Tensor | None:
        """``[1, out_dim]`` of one contiguous float32 row ``x`` ``[1, in_dim]``, or None (no native kernel)."""
        fn = function("mlp", (("W", 16),), ARGTYPES, headers=("vec.h", "rows.h"))
        if fn is None:
            return None
        scratch, y = torch.empty(3 * self.width), torch.empty(1, self.out_dim)
        fn(x.data_ptr(), self.n_a, self.n_b, self.c_ints, self.c_ptrs, self.width, scratch.data_ptr(), y.data_ptr())
        return y


def mlp_row(x: Tensor, chain: Sequence[Layer], gate: Sequence[Layer] = ()) -> Tensor | None:
    """``[1, out]``: ``chain(x)`` for one row ``x`` ``[1, in]``, or ``chain(x) * sigmoid(gate(x))`` with a gate.

    None where only PyTorch can run it (autograd on, a tensor that is not float32 or not contiguous, or no native
    kernel). Widths that do not chain raise ValueError naming the layer.
    """
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"mlp_row takes one row [1, in], got shape {tuple(x.shape)}")
    if not chain or torch.is_grad_enabled() or x.dtype != torch.float32:
        return None
    plan = MlpPlan.build(x.shape[1], chain, gate)
    return plan.run(x.contiguous()) if plan is not None else None


def check_chain(in_dim: int, layers: Sequence[Layer]) -> int:
    """The output width of ``layers`` applied one after the other to rows of ``in_dim``; widths that do not chain
    raise ValueError naming the layer."""
    width = in_dim
    for i, (w, b, _) in enumerate(layers):
        out, inputs = w.shape
        if inputs != width or b.shape != (out,):
            raise ValueError(f"layer {i}: weight {tuple(w.shape)} and bias {tuple(b.shape)} do not take {width} inputs")
        width = out
    return width


def affine_arrays(layers: Sequence[Layer]) -> tuple[tuple[Tensor, ...], ctypes.Array, ctypes.Array] | None:
    """``mlp.c``'s description of ``layers``: the storages it reads (kept alive by the caller), each layer's in and out
    widths and activation, and its weight's and bias's addresses; None where a weight or bias is not a contiguous
    float32 tensor."""
    if any(t.dtype != torch.float32 or not t.is_contiguous() for w, b, _ in layers for t in (w, b)):
        return None
    held = tuple(t.detach() for w, b, _ in layers for t in (w, b))  # the storages: `w.data = ...` must not free them
    ints = [x for w, _, act in layers for x in (w.shape[1], w.shape[0], int(act))]
    return held, (_I * len(ints))(*ints), (_P * len(held))(*(t.data_ptr() for t in held))
