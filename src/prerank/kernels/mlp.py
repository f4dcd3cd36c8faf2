"""One row through an MLP, or through RankTower's gated pair of MLPs, in one native call (``mlp.c``).

A served request encodes one user, and a small tower spends most of its time in the fixed cost of its PyTorch
operator calls (a few per layer), not in arithmetic. :func:`mlp_row` runs the whole tower at once. The weights are
read in place, so the result always follows the module's current parameters. Float32 only, no autograd (it runs
only where gradients are off); None where the native kernel is unavailable.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from prerank.kernels.native import function

Layer = tuple[Tensor, Tensor, bool]  # weight [out, in], bias [out], and whether a ReLU follows
_P, _I = ctypes.c_void_p, ctypes.c_int64


def mlp_row(x: Tensor, chain: Sequence[Layer], gate: Sequence[Layer] = ()) -> Tensor | None:
    """``[1, out]``: ``chain(x)`` for one row ``x`` ``[1, in]``, or ``chain(x) * sigmoid(gate(x))`` with a gate.

    None where only PyTorch can run it (autograd on, a tensor that is not float32 or not contiguous, or no native
    kernel). Widths that do not chain raise ValueError naming the layer.
    """
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"mlp_row takes one row [1, in], got shape {tuple(x.shape)}")
    if not chain or torch.is_grad_enabled() or x.dtype != torch.float32:
        return None
    ints: list[int] = []
    ptrs: list[int] = []
    for part in (chain, gate):
        width = x.shape[1]
        for i, (w, b, relu) in enumerate(part):
            if w.dtype != torch.float32 or b.dtype != torch.float32 or not (w.is_contiguous() and b.is_contiguous()):
                return None
            out, inputs = w.shape
            if inputs != width or b.shape != (out,):
                raise ValueError(
                    f"layer {i}: weight {tuple(w.shape)} and bias {tuple(b.shape)} do not take {width} inputs"
                )
            ints += (inputs, out, relu)
            ptrs += (w.data_ptr(), b.data_ptr())
            width = out
    out = ints[len(chain) * 3 - 2]
    if gate and width != out:
        raise ValueError(f"the gate has {width} outputs, the MLP {out}")
    fn = function("mlp", (("W", 16),), (_P, _I, _I, _P, _P, _I, _P, _P), headers=("vec.h", "rows.h"))
    if fn is None:
        return None
    x = x.contiguous()
    width = max(ints[1::3])
    scratch, y = torch.empty(3 * width), torch.empty(1, out)
    n = len(ptrs) // 2
    fn(
        x.data_ptr(),
        len(chain),
        len(gate),
        (_I * (3 * n))(*ints),
        (_P * (2 * n))(*ptrs),
        width,
        scratch.data_ptr(),
        y.data_ptr(),
    )
    return y
