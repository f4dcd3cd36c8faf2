"""Target attention over behaviour sequences.

DIN: Zhou et al., "Deep Interest Network for Click-Through Rate Prediction" (KDD 2018), Sec. 4.3:
the activation unit scores each behaviour ``k_l`` against the target ``q`` with a small MLP on
``[q, k_l, q - k_l, q * k_l]`` and sum-pools the behaviours by those scores.

NOVA: Liu et al., "Noninvasive Self-attention for Side Information Fusion in Sequential
Recommendation" (AAAI 2021), Sec. "Non-invasive Self-attention": side information (an item's
category, its position) is fused into the queries and keys of self-attention only, so the values,
and hence what the layer outputs, stay in the item-id space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from prerank.layers.mlp import MLP


class DINAttention(nn.Module):
    """DIN activation unit and weighted sum pooling.

    Shapes: query ``[B, D]``, keys ``[B, L, D]``, mask ``[B, L]`` (True = real behaviour; None = all
    real) -> ``[B, D]``.
    The query may also be ``[B, M, D]`` (M targets per row, e.g. FIT's meta queries): the result is
    ``[B, M, D]``.

    :meth:`shared_queries` computes the same for M queries ``[M, D]`` shared by every row, faster.

    The paper keeps raw (unnormalised) weights to preserve the intensity of interest; with
    ``normalize=True`` the weights are softmax-normalised over valid behaviours instead, which is
    the common, numerically safer choice for short sequences. Rows without any behaviour pool to 0.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 32), *, normalize: bool = False):
        super().__init__()
        self.unit = MLP(4 * dim, hidden, out_dim=1, activation=nn.Sigmoid)
        self.normalize = normalize

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor | None = None) -> Tensor:
        single = query.dim() == 2
        q = query.unsqueeze(1) if single else query  # [B, M, D]
        q4 = q.unsqueeze(2).expand(-1, -1, keys.shape[1], -1)  # [B, M, L, D]
        k4 = keys.unsqueeze(1).expand(-1, q.shape[1], -1, -1)  # [B, M, L, D]
        w = self.unit(torch.cat([q4, k4, q4 - k4, q4 * k4], dim=-1)).squeeze(-1)  # [B, M, L]
        valid = None if mask is None else mask.unsqueeze(1)
        if self.normalize:
            if valid is not None:
                w = w.masked_fill(~valid, float("-inf"))
            w = torch.softmax(w, dim=-1).nan_to_num(0.0)
        elif valid is not None:
            w = w * valid.to(w.dtype)
        out = torch.einsum("bml,bld->bmd", w, keys)
        return out.squeeze(1) if single else out

    def fold_queries(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """The unit's first layer as an affine map of the key, one per query ``[M, D]``: ``[D, M*H]``, ``[M*H]``.

        With the first layer ``W = [W_q, W_k, W_d, W_p]`` ``[H, 4D]`` over ``[q, k, q - k, q * k]``:
        ``W [q, k, q - k, q * k] + b = (W_k - W_d + W_p diag(q)) k + (W_q + W_d) q + b``.
        """
        first = self.unit[0]
        w_q, w_k, w_d, w_p = first.weight.split(query.shape[-1], dim=1)  # [H, D] each
        weight = (w_k - w_d).T.unsqueeze(1) + query.T.unsqueeze(-1) * w_p.T.unsqueeze(1)  # [D, M, H]
        bias = torch.addmm(first.bias, query, (w_q + w_d).T)  # [M, H]
        return weight.flatten(1), bias.flatten()

    def shared_queries(self, query: Tensor, keys: Tensor, mask: Tensor | None = None) -> Tensor:
        """:meth:`forward` with the same queries ``[M, D]`` for every row: keys ``[B, L, D]`` -> ``[B, M, D]``.

        For a fixed query the first layer is an affine map of the key (:meth:`fold_queries`), so the first
        layer for every (key, query) pair is one ``[B*L, D] x [D, M*H]`` product, without building the
        ``[B, M, L, 4D]`` input.
        """
        b, n, d = keys.shape
        _, *rest = self.unit
        weight, bias = self.fold_queries(query)
        h = torch.addmm(bias, keys.reshape(b * n, d), weight).view(b, n, query.shape[0], -1)  # [B, L, M, H]
        for layer in rest:
            h = layer(h)
        w = h.squeeze(-1)  # [B, L, M]
        valid = None if mask is None else mask.unsqueeze(-1)
        if self.normalize:
            if valid is not None:
                w = w.masked_fill(~valid, float("-inf"))
            w = torch.softmax(w, dim=1).nan_to_num(0.0)
        elif valid is not None:
            w = w * valid.to(w.dtype)
        return torch.bmm(w.transpose(1, 2), keys)


class NOVAAttention(nn.Module):
    """Non-invasive self-attention over a behaviour sequence (NOVA, single head, additive fusor).

    With item embeddings ``E`` ``[B, L, D]`` and the summed side-information embeddings ``S``
    ``[B, L, D]`` (NOVA's fusion function ``F`` taken as the sum, one of the paper's fusors):

    ``Q = (E + S) W_Q``, ``K = (E + S) W_K``, ``V = E W_V``;
    ``A = softmax_l'(Q K^T / sqrt(D))`` over valid behaviours ``l'``; output ``A V`` ``[B, L, D]``.

    Side information changes only ``A`` (the weights), never ``V`` (:meth:`values` reads ``E`` alone):
    the "non-invasive" property. Padded keys get zero weight; padded query rows are left to the
    caller's pooling (:meth:`pooled` averages the valid rows only). No Python branch depends on the
    data, so the layer exports with a dynamic batch dimension.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.scale = dim**-0.5

    def weights(self, items: Tensor, side: Tensor, mask: Tensor) -> Tensor:
        """Attention weights ``[B, L, L]`` (rows: queries, columns: keys; padded keys get 0)."""
        fused = items + side
        logits = torch.matmul(self.query(fused), self.key(fused).transpose(-1, -2)) * self.scale
        # a finite floor instead of -inf: a row without any behaviour gives uniform weights, not NaN,
        # and is then dropped by the masked pooling
        logits = logits.masked_fill(~mask.unsqueeze(-2), torch.finfo(logits.dtype).min)
        return torch.softmax(logits, dim=-1)

    def values(self, items: Tensor) -> Tensor:
        """``V = E W_V`` ``[B, L, D]``: from the item embeddings only."""
        return self.value(items)

    def forward(self, items: Tensor, side: Tensor, mask: Tensor) -> Tensor:
        """``A V`` ``[B, L, D]``."""
        return torch.matmul(self.weights(items, side, mask), self.values(items))

    def pooled(self, items: Tensor, side: Tensor, mask: Tensor) -> Tensor:
        """The outputs of the valid positions averaged: ``[B, D]`` (0 for an empty sequence)."""
        m = mask.unsqueeze(-1).to(items.dtype)
        return (self(items, side, mask) * m).sum(-2) / m.sum(-2).clamp_min(1.0)
