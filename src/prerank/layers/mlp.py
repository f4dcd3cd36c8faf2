"""Multi-layer perceptrons."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


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


class SplitMLP(nn.Module):
    """An MLP on ``[u; i]`` whose first layer is split between a user and an item part (DESIGN.md).

    ``W [u; i] + b = (W_u u + b) + W_i i``: :meth:`user_part` ``[B, D_u] -> [B, H1]`` runs once per
    request, :meth:`item_part` ``[N, D_i] -> [N, H1]`` once per item (the item cache), and
    :meth:`combine` ``([1 or N, H1], [N, H1]) -> [N]`` per candidate: one add, the activation and the
    layers after the first. :meth:`forward` is the same network unsplit, on the concatenation
    ``[B, D_u + D_i]``; both read the one ``first`` layer, so they are equal by construction.
    """

    def __init__(self, user_dim: int, item_dim: int, hidden: Sequence[int], *, dropout: float = 0.0):
        super().__init__()
        if not hidden:
            raise ValueError("SplitMLP needs at least one hidden layer (the one it splits)")
        self.user_dim = user_dim
        self.first = nn.Linear(user_dim + item_dim, hidden[0])
        self.after_first = nn.Sequential(nn.ReLU(), *([nn.Dropout(dropout)] if dropout > 0 else []))
        self.rest = MLP(hidden[0], hidden[1:], out_dim=1, dropout=dropout)

    def user_part(self, u: Tensor) -> Tensor:
        return F.linear(u, self.first.weight[:, : self.user_dim], self.first.bias)

    def item_part(self, i: Tensor) -> Tensor:
        return F.linear(i, self.first.weight[:, self.user_dim :])

    def combine(self, user_part: Tensor, item_part: Tensor) -> Tensor:
        return self.rest(self.after_first(user_part + item_part)).squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.rest(self.after_first(self.first(x))).squeeze(-1)
