"""A model's affine layers, read from its PyTorch modules into ``mlp.c``'s layout: weights ``[out, in]`` and biases
``[out]``, each followed by no activation, a ReLU or a sigmoid.

Float32 contiguous CPU parameters only; where a module is anything else (batch norm, another activation, dropout
while training, a linear layer without bias) the readers return None and the request has no native form.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

NONE, RELU, SIGMOID = 0, 1, 2  # the activation after a layer (mlp.c)
Layer = tuple[Tensor, Tensor, int]  # weight [out, in], bias [out], and the activation that follows
_P, _I = ctypes.c_void_p, ctypes.c_int64


def linear_layer(m: nn.Module, act: int = NONE) -> Layer | None:
    """``m`` as one affine layer followed by ``act``, or None where it is not an ``nn.Linear`` with a bias."""
    if type(m) is not nn.Linear or m.bias is None:
        return None
    return (m.weight, m.bias, act)


def sequential_layers(seq: nn.Module) -> list[Layer] | None:
    """An ``nn.Sequential`` of linear layers, each optionally followed by a ReLU or a sigmoid (and by dropout in eval
    mode, which is the identity), as affine layers; None where it has any other module or no layer."""
    if not isinstance(seq, nn.Sequential):
        return None
    layers: list[Layer] = []
    for m in seq:
        act = RELU if type(m) is nn.ReLU else SIGMOID if type(m) is nn.Sigmoid else None
        layer = linear_layer(m)
        if layer is not None:
            layers.append(layer)
        elif act is not None and layers and layers[-1][2] == NONE:
            layers[-1] = (*layers[-1][:2], act)
        elif not (isinstance(m, nn.Dropout) and not m.training):
            return None
    return layers or None


def check_chain(in_dim: int, layers: Sequence[Layer]) -> int | None:
    """The output width of ``layers`` applied one after the other to rows of ``in_dim``, or None where the widths
    do not chain."""
    width = in_dim
    for w, b, _ in layers:
        if w.dim() != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
            return None
        width = w.shape[0]
    return width


@dataclass(frozen=True, eq=False)
class AffineArrays:
    """``mlp.c``'s description of affine layers: ``c_ints`` holds each layer's in and out widths and activation,
    ``c_ptrs`` its weight's and bias's addresses, of the tensors in ``held`` (detached aliases of the parameters'
    storages, kept alive here). Values changed in place are seen; replaced parameters are not."""

    held: tuple[Tensor, ...]
    c_ints: ctypes.Array
    c_ptrs: ctypes.Array
    width: int  # the widest layer's output

    @property
    def addresses(self) -> tuple[int, int]:
        return ctypes.addressof(self.c_ints), ctypes.addressof(self.c_ptrs)


def affine_arrays(layers: Sequence[Layer]) -> AffineArrays | None:
    """:class:`AffineArrays` of ``layers``; None where there are none or a weight or bias is not a contiguous float32
    CPU tensor."""
    tensors = [t for w, b, _ in layers for t in (w, b)]
    if not layers or any(t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
        return None
    held = tuple(t.detach() for t in tensors)  # the storages: a later `w.data = ...` must not free them
    ints = [x for w, _, act in layers for x in (w.shape[1], w.shape[0], int(act))]
    c_ints, c_ptrs = (_I * len(ints))(*ints), (_P * len(held))(*(t.data_ptr() for t in held))
    return AffineArrays(held, c_ints, c_ptrs, max(w.shape[0] for w, _, _ in layers))
