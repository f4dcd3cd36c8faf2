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

from prerank.kernels.mlp import mlp_row
from prerank.kernels.scorers import RankTowerKernel, rank_tower_kernel
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
        if x.dim() == 2 and x.shape[0] == 1 and not torch.is_grad_enabled():  # a served user: one native call
            mlp, gate = self.mlp.affine_layers(), self.gate.affine_layers()
            out = mlp_row(x, mlp, gate) if mlp is not None and gate is not None else None
            if out is not None:
                return out.view(1, self.heads, self.head_dim)
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
        """Eq. 6-7 up to ``W_O``: ``U o softmax(Q K^T / sqrt(d_k)) V`` -> ``[B, Hq, d_v]``.

        einsum contracts a side with leading dim 1 against all B rows in one matmul, without the
        expanded copy a broadcasting ``torch.matmul`` makes.
        """
        a = torch.softmax(torch.einsum("bqd,bkd->bqk", q, k) * self.scale, dim=-1)
        return u * torch.einsum("bqk,bkv->bqv", a, v)

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
        """The pair-dependent rest of Eq. 3-4: ``(E_u' [B, H_u, k], E_i' [B, H_i, k])``.

        One user against N items without autograd (serving) takes :meth:`_cross_one_user`;
        anything else (training, B users) runs the equations as written.
        """
        if user["r"].shape[0] == 1 and not torch.is_grad_enabled():
            return self._cross_one_user(user, item)
        ug, ig = self.user_gau, self.item_gau
        o_u = F.linear(ug.gated_values(user["q"], user["g"], item["k"], item["v"]), ug.w_o.weight)
        o_i = F.linear(ig.gated_values(item["q"], item["g"], user["k"], user["v"]), ig.w_o.weight)
        return self.user_norm(user["r"] + o_u), self.item_norm(item["r"] + o_i)

    def _cross_one_user(self, user: CrossState, item: CrossState) -> tuple[Tensor, Tensor]:
        """:meth:`cross` for one user (``[1, H_u, .]``) and N items, as few large ops as possible.

        Profiling showed the time goes to per-op work over tiny axes (softmax over H, LayerNorm over
        k, N small bmm), not to FLOPs. So: the attention scores are laid out ``[H, ..., N]`` (the
        softmax reduces over a leading axis), ``Q K^T``, ``A V`` of the item branch and both ``W_O``
        are single GEMMs against user-side matrices (the user's gate folded into its ``W_O``), the
        ``W_O`` products come out centred (``W_O`` centred once per call; ``r`` is centred already),
        and the LayerNorms run in place. Only the user branch's ``A V`` (both factors per candidate)
        is an H_i-term multiply-add over ``[H_u, N, d_v]``.
        """
        ug, ig = self.user_gau, self.item_gau
        n, h_i, dim = item["r"].shape
        rows = n * h_i
        # item branch: each item head attends over the user's heads
        a_i = _softmax_((user["k"][0] * ig.scale) @ item["q"].reshape(rows, -1).T, dim=0)  # [H_u, N H_i]
        o_i = (a_i.T @ user["v"][0]).mul_(item["g"].reshape(rows, -1))  # [N H_i, d_v]
        x_i = torch.addmm(item["r"].reshape(rows, dim), o_i, _centred(ig.w_o.weight.T))
        e_i = _layer_norm_(x_i, self.item_norm).view(n, h_i, dim)
        # user branch: each user head attends over the item's heads
        a_u = _softmax_(torch.matmul(user["q"][0] * ug.scale, item["k"].permute(1, 2, 0)), dim=0)  # [H_i, H_u, N]
        v = item["v"]
        o_u = a_u[0, :, :, None] * v[:, 0]  # [H_u, N, d_v]
        for q in range(1, h_i):
            o_u.addcmul_(a_u[q, :, :, None], v[:, q])
        w_o = _centred(ug.w_o.weight.T) * user["g"][0][:, :, None]  # [H_u, d_v, k]: gate U folded into W_O
        e_u = _layer_norm_(torch.baddbmm(user["r"][0][:, None, :], o_u, w_o), self.user_norm)  # [H_u, N, k]
        return e_u.transpose(0, 1), e_i

    def native(self, cache: CrossState, inv_tau: float, bias: float, user_heads: int) -> RankTowerKernel | None:
        """RankTower's serving kernel for this layer over the item ``cache``: it maps one user's ``E_u``
        ``[H_u, k]`` and cache rows to ``bias + inv_tau * max_similarity(*cross(prepare_user(E_u), cache rows))``
        (RankTower Eq. 3-8), reading the rows straight from the cache
        (:class:`prerank.kernels.scorers.RankTowerKernel`); None where the native kernel is unavailable. The kernel
        prepares the user itself (a few thousand multiply-adds, cheaper than the PyTorch calls that would do it),
        from the user-independent parameters packed here: both centred ``W_O^T``, the LayerNorms' affine maps and
        the projections that prepare a user. It holds a copy of them: build it again after they change
        (:meth:`prerank.models.rank_tower.RankTower.score_cached` does)."""
        ug, ig = self.user_gau, self.item_gau
        weights = (
            self.item_norm.weight,
            self.item_norm.bias,
            self.user_norm.weight,
            self.user_norm.bias,
            *(p for lin in (ug.w_q, ug.w_u, ig.w_k, ig.w_v) for p in (lin.weight, lin.bias)),
            ug.w_o.bias,
        )
        with torch.no_grad():
            parts = (_centred(ig.w_o.weight.T), _centred(ug.w_o.weight.T), *weights)
            fixed = torch.cat([t.reshape(-1).float() for t in parts])
        scalars = (ig.scale, ug.scale, self.item_norm.eps, self.user_norm.eps, inv_tau, bias)
        return rank_tower_kernel(fixed, cache, scalars, user_heads)

    def forward(self, e_u: Tensor, e_i: Tensor) -> tuple[Tensor, Tensor]:
        return self.cross(self.prepare_user(e_u), self.prepare_item(e_i))


def _centred(x: Tensor) -> Tensor:
    """``x`` minus its mean over the last axis."""
    return x - x.mean(-1, keepdim=True)


def _softmax_(s: Tensor, dim: int) -> Tensor:
    """``torch.softmax`` in place (``s`` is a fresh temporary)."""
    s = s.sub_(s.amax(dim, keepdim=True)).exp_()
    return s.div_(s.sum(dim, keepdim=True))


def _layer_norm_(c: Tensor, norm: nn.LayerNorm) -> Tensor:
    """``norm(c)`` in place for rows ``c`` that are already centred (a fresh temporary)."""
    var = torch.linalg.vector_norm(c, dim=-1, keepdim=True).square_().div_(c.shape[-1])
    return c.mul_(var.add_(norm.eps).rsqrt_()).mul_(norm.weight).add_(norm.bias)


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
