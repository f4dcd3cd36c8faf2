"""Target attention over behaviour sequences.

DIN: Zhou et al., "Deep Interest Network for Click-Through Rate Prediction" (KDD 2018), Sec. 4.3:
the activation unit scores each behaviour ``k_l`` against the target ``q`` with a small MLP on
``[q, k_l, q - k_l, q * k_l]`` and sum-pools the behaviours by those scores.
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
