"""RankTower's building blocks (Yan & Li 2024, Sec. 2.2-2.3): multi-head gated network, gated attention
unit and the bi-directional gated cross-attention built from it.

The attention runs over *sub-space tokens*: a user is ``H_u`` vectors of width k, an item ``H_i``.
Every projection that reads only one side is exposed separately (``query``, ``key_value``,
``prepare_user``, ``prepare_item``) so a pre-ranker can compute it once per user or once per item and
run only the pair-dependent part per candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.layers.mlp import MLP

CrossState = dict[str, Tensor]


class MultiHeadGatedNetwork(nn.Module):
    """Multi-Head Gated Network, RankTower Eq. 1-2: ``e^h = MLP(X)^h o sigmoid(gMLP(X))^h``.

    ``MLP`` maps the concatenated input embeddings ``X`` ``[B, in_dim]`` to ``H * k`` values; the gate
    ``gMLP`` is a two-layer MLP (one hidden layer) of the same output width. As the paper says, the
    input embedding receives no gradient from the gate: the gate reads ``X.detach()``.
    Shapes: ``[B, in_dim]`` -> ``[B, H, k]``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        heads: int,
        head_dim: int,
        gate_hidden: int,
        *,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.mlp = MLP(in_dim, hidden, out_dim=heads * head_dim, dropout=dropout)
        self.gate = MLP(in_dim, (gate_hidden,), out_dim=heads * head_dim)

    def forward(self, x: Tensor) -> Tensor:
        gated = self.mlp(x) * torch.sigmoid(self.gate(x.detach()))
        return gated.unflatten(-1, (self.heads, self.head_dim))


class GatedAttentionUnit(nn.Module):
    """Gated Attention Unit, RankTower Eq. 5-7 (after Hua et al., "Transformer Quality in Linear Time", 2022).

    ``Q = phi(X_Q W_Q)``, ``K = phi(X_K W_K)``, ``V = phi(X_V W_V)``, ``U = sigmoid(X_Q W_U)``,
    ``A = softmax(Q K^T / sqrt(d_k))``, ``O = (U o A V) W_O``, with ``phi`` = SiLU (GAU's choice; the
    paper only says "non-linear activation") and affine projections. Single-head attention over
    the sub-space tokens. Shapes: ``x_q`` ``[B, Hq, k]``, ``x_kv`` ``[B, Hk, k]`` -> ``[B, Hq, k]``;
    either side may have leading dim 1 and is broadcast.
    """

    def __init__(self, dim: int, attention_dim: int, value_dim: int):
        super().__init__()
        self.w_q = nn.Linear(dim, attention_dim)
        self.w_k = nn.Linear(dim, attention_dim)
        self.w_v = nn.Linear(dim, value_dim)
        self.w_u = nn.Linear(dim, value_dim)
        self.w_o = nn.Linear(value_dim, dim)
        self.act = nn.SiLU()
        self.scale = 1.0 / math.sqrt(attention_dim)

    def query(self, x_q: Tensor) -> tuple[Tensor, Tensor]:
        """Query-side part of Eq. 5: ``Q`` ``[B, Hq, d_k]`` and gate ``U`` ``[B, Hq, d_v]``."""
        return self.act(self.w_q(x_q)), torch.sigmoid(self.w_u(x_q))

    def key_value(self, x_kv: Tensor) -> tuple[Tensor, Tensor]:
        """Key/value part of Eq. 5: ``K`` ``[B, Hk, d_k]`` and ``V`` ``[B, Hk, d_v]``."""
        return self.act(self.w_k(x_kv)), self.act(self.w_v(x_kv))

    def gated_values(self, q: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Eq. 6-7 up to ``W_O``: ``U o softmax(Q K^T / sqrt(d_k)) V`` -> ``[B, Hq, d_v]`` (a side with
        leading dim 1 broadcasts over the B rows)."""
        a = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.scale, dim=-1)
        return u * torch.matmul(a, v)

    def attend(self, q: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Eq. 6-7 from projected inputs: ``(U o softmax(Q K^T / sqrt(d_k)) V) W_O`` -> ``[B, Hq, k]``."""
        return self.w_o(self.gated_values(q, u, k, v))

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        return self.attend(*self.query(x_q), *self.key_value(x_kv))


class GatedCrossAttentionLayer(nn.Module):
    """One bi-directional gated cross-attention layer, RankTower Eq. 3-4.

    ``E_u' = LN(E_u + GAU_u(Q=E_u, K=E_i, V=E_i))`` and ``E_i' = LN(E_i + GAU_i(Q=E_i, K=E_u, V=E_u))``,
    two branches with their own parameters. A side's *prepared state* holds everything of the
    layer that depends on that side alone: ``r`` (its residual plus its branch's ``W_O`` bias,
    centred: LayerNorm removes the mean anyway, so the mean is taken once here), ``q``/``g``
    (query and gate of its own branch) and ``k``/``v`` (the keys/values the other branch reads).
    """

    def __init__(self, dim: int, attention_dim: int, value_dim: int):
        super().__init__()
        self.user_gau = GatedAttentionUnit(dim, attention_dim, value_dim)
        self.item_gau = GatedAttentionUnit(dim, attention_dim, value_dim)
        self.user_norm = nn.LayerNorm(dim)
        self.item_norm = nn.LayerNorm(dim)

    @staticmethod
    def _prepare(e: Tensor, own: GatedAttentionUnit, other: GatedAttentionUnit) -> CrossState:
        q, g = own.query(e)
        k, v = other.key_value(e)
        return {"r": _centred(e + own.w_o.bias), "q": q, "g": g, "k": k, "v": v}

    def prepare_user(self, e_u: Tensor) -> CrossState:
        """``E_u`` ``[B, H_u, k]`` -> its prepared state (``q``/``g`` from ``GAU_u``, ``k``/``v`` from ``GAU_i``)."""
        return self._prepare(e_u, self.user_gau, self.item_gau)

    def prepare_item(self, e_i: Tensor) -> CrossState:
        """``E_i`` ``[B, H_i, k]`` -> its prepared state (``q``/``g`` from ``GAU_i``, ``k``/``v`` from ``GAU_u``)."""
        return self._prepare(e_i, self.item_gau, self.user_gau)

    def cross(self, user: CrossState, item: CrossState) -> tuple[Tensor, Tensor]:
        """The pair-dependent rest of Eq. 3-4: ``(E_u' [B, H_u, k], E_i' [B, H_i, k])``; either side may have
        leading dim 1 (one user against N items)."""
        ug, ig = self.user_gau, self.item_gau
        o_u = F.linear(ug.gated_values(user["q"], user["g"], item["k"], item["v"]), ug.w_o.weight)
        o_i = F.linear(ig.gated_values(item["q"], item["g"], user["k"], user["v"]), ig.w_o.weight)
        return self.user_norm(user["r"] + o_u), self.item_norm(item["r"] + o_i)

    def forward(self, e_u: Tensor, e_i: Tensor) -> tuple[Tensor, Tensor]:
        return self.cross(self.prepare_user(e_u), self.prepare_item(e_i))


def _centred(x: Tensor) -> Tensor:
    """``x`` minus its mean over the last axis."""
    return x - x.mean(-1, keepdim=True)


class GatedCrossAttention(nn.Module):
    """Gated Cross-Attention Network: ``num_layers`` stacked :class:`GatedCrossAttentionLayer`.

    Only the first layer's projections are pair-independent; every later layer reads attended
    embeddings of the pair and runs entirely per (user, item) pair.
    """

    def __init__(self, dim: int, attention_dim: int, value_dim: int, num_layers: int = 1):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(GatedCrossAttentionLayer(dim, attention_dim, value_dim) for _ in range(num_layers))

    def prepare_user(self, e_u: Tensor) -> CrossState:
        return self.layers[0].prepare_user(e_u)

    def prepare_item(self, e_i: Tensor) -> CrossState:
        return self.layers[0].prepare_item(e_i)

    def cross(self, user: CrossState, item: CrossState) -> tuple[Tensor, Tensor]:
        e_u, e_i = self.layers[0].cross(user, item)
        for layer in self.layers[1:]:
            e_u, e_i = layer(e_u, e_i)
        return e_u, e_i

    def forward(self, e_u: Tensor, e_i: Tensor) -> tuple[Tensor, Tensor]:
        return self.cross(self.prepare_user(e_u), self.prepare_item(e_i))


__all__ = ["GatedAttentionUnit", "GatedCrossAttention", "GatedCrossAttentionLayer", "MultiHeadGatedNetwork"]
