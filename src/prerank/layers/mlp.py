"""Multi-layer perceptrons."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from prerank.kernels.mlp import NONE, RELU, SIGMOID, Layer, mlp_row


class MLP(nn.Sequential):
    """Linear -> [BatchNorm] -> activation -> dropout per hidden layer, then an optional linear output.

    Shapes: ``[..., in_dim]`` -> ``[..., hidden[-1]]`` (or ``[..., out_dim]``).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        *,
        out_dim: int | None = None,
        dropout: float = 0.0,
        activation: type[nn.Module] = nn.ReLU,
        batch_norm: bool = False,
    ):
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        super().__init__(*layers)
        self.out_dim = d

    def forward(self, x: Tensor) -> Tensor:
        """One row without autograd (a served request's user) takes one native call (:func:`mlp_row`) where it
        can: a small tower otherwise spends most of its time in the fixed cost of a few PyTorch calls per layer."""
        if x.dim() == 2 and x.shape[0] == 1 and not torch.is_grad_enabled():
            layers = self.affine_layers()
            out = mlp_row(x, layers) if layers is not None else None
            if out is not None:
                return out
        return super().forward(x)

    def affine_layers(self) -> list[Layer] | None:
        """The MLP as affine layers, each followed by no activation, a ReLU or a sigmoid (:func:`mlp_row`'s input);
        None where it has other layers (batch norm, another activation, dropout while training)."""
        layers: list[Layer] = []
        for m in self._modules.values():
            act = RELU if isinstance(m, nn.ReLU) else SIGMOID if isinstance(m, nn.Sigmoid) else None
            if type(m) is nn.Linear and m._parameters["bias"] is not None:
                layers.append((m._parameters["weight"], m._parameters["bias"], NONE))
            elif act is not None and layers and layers[-1][2] == NONE:
                layers[-1] = (*layers[-1][:2], act)
            elif not (isinstance(m, nn.Dropout) and not m.training):
                return None
        return layers
