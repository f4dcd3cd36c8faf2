"""RankTower: Yan & Li, "RankTower: A Synergistic Framework for Enhancing Two-Tower Pre-Ranking Model" (2024).

Multi-Head Gated Network towers (Eq. 1-2), bi-directional Gated Cross-Attention (Eq. 3-7) and a
Maximum Similarity scorer with a learnable temperature (Eq. 8). Its training objective, the hybrid
loss of Eq. 9-15, lives in :mod:`prerank.losses.hybrid` (``--loss hybrid``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.layers.embedding import EmbeddingTables
from prerank.layers.gau import GatedCrossAttention, MultiHeadGatedNetwork
from prerank.models.base import ConfigError, FeatureSelection, PreRanker, State
from prerank.schema import Schema


@dataclass(frozen=True)
class RankTowerConfig:
    """RankTower hyper-parameters.

    The paper reports none of its sizes (heads, sub-space width, MLP widths, layers, initial
    temperature), so these are ours, moderate for CPU: 16-dim feature embeddings, tower MLP
    (128,) -> ``H * k``, ``H_u = H_i = 4`` sub-spaces of ``k = 16``, a 64-unit gate MLP, one cross
    layer (the paper's Eq. 3-4 describe one) with ``d_k = d_v = 16``, initial ``tau = 0.5``.

    ``bias`` adds a learnable scalar to the logit, which Eq. 8 does not have: the paper trains only
    with shift-invariant listwise losses, where it changes nothing; under pointwise BCE (the
    trainer's default) it carries the base rate, which Eq. 8 alone could only express by making
    most cosines negative.
    """

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (128,)
    user_heads: int = 4
    item_heads: int = 4
    head_dim: int = 16
    gate_hidden: int = 64
    attention_dim: int = 16
    value_dim: int = 16
    cross_layers: int = 1
    dropout: float = 0.0
    temperature: float = 0.5
    bias: bool = True
    features: tuple[str, ...] | None = None


def max_similarity(e_u: Tensor, e_i: Tensor) -> Tensor:
    """Eq. 8 without the temperature: ``sum_p max_q cos(E_u^p, E_i^q)``.

    Shapes: ``e_u`` ``[B, H_u, k]``, ``e_i`` ``[B, H_i, k]`` (either may have leading dim 1) -> ``[B]``.
    """
    cos = torch.matmul(F.normalize(e_u, dim=-1), F.normalize(e_i, dim=-1).transpose(-1, -2))  # [B, H_u, H_i]
    return cos.amax(-1).sum(-1)


class RankTower(PreRanker):
    """RankTower on the prerank contract.

    ``X_U`` = concatenated user + context field embeddings, ``X_I`` = item field embeddings
    (sequences mean-pooled). Cross features are not used: the paper's towers see user and item
    features only, and a pair feature would break the user-item decoupling.

    Per user (``encode_user``, once per request): ``E_u = MHGN_u(X_U)`` (Eq. 1), key ``e`` ``[B, H_u, k]``.
    Its first-layer projections (user-branch query ``Q`` and gate ``U``, Eq. 5, from ``GAU_u``; the keys and
    values the item branch reads, from ``GAU_i``) are user-only too; ``score`` computes them, once per call
    and not per candidate.

    Cached per item (``encode_item``, offline): the same for ``E_i = MHGN_i(X_I)`` (Eq. 2), each key
    ``[N, H_i, .]``; ``H_i * (k + 2 d_k + 2 d_v)`` floats per item (1280 bytes with the defaults).

    Per candidate (``score``): what needs both sides, which cross-attention makes real work rather
    than a dot product. Both attention branches: ``softmax(Q K^T / sqrt(d_k))`` (``H_u x H_i``
    scores), ``A V``, the gate ``U o``, ``W_O``, residual and LayerNorm (Eq. 3-4, 6-7); any
    further cross layers in full; then the ``H_u x H_i`` cosine matrix, max, sum and ``/ tau``
    (Eq. 8). This is O(H_u H_i (d_k + d_v + k) + (H_u + H_i) d_v k) per candidate, independent of the
    number of features; the paper's claim that serving needs only the cross-attention layers holds,
    and their input projections run once per user or are cached per item.
    """

    def __init__(self, schema: Schema, config: RankTowerConfig = RankTowerConfig()):
        super().__init__(schema)
        sizes = ("embedding_dim", "user_heads", "item_heads", "head_dim", "gate_hidden", "attention_dim", "value_dim")
        for name in (*sizes, "cross_layers"):
            if getattr(config, name) < 1:
                raise ConfigError(f"RankTowerConfig.{name} must be >= 1, got {getattr(config, name)}")
        if any(h < 1 for h in config.hidden):
            raise ConfigError(f"RankTowerConfig.hidden sizes must be >= 1, got {config.hidden}")
        if not 0 <= config.dropout < 1:
            raise ConfigError(f"RankTowerConfig.dropout must be in [0, 1), got {config.dropout}")
        if not config.temperature > 0:
            raise ConfigError(f"RankTowerConfig.temperature must be > 0, got {config.temperature}")
        self.config = config
        self.sel = FeatureSelection.resolve(schema, config.features, use_cross=False)
        d = config.embedding_dim
        self.emb = EmbeddingTables(schema, d, self.sel.user + self.sel.item)

        def tower(n_fields: int, heads: int) -> MultiHeadGatedNetwork:
            return MultiHeadGatedNetwork(
                n_fields * d, config.hidden, heads, config.head_dim, config.gate_hidden, dropout=config.dropout
            )

        self.user_tower = tower(len(self.sel.user), config.user_heads)
        self.item_tower = tower(len(self.sel.item), config.item_heads)
        self.cross = GatedCrossAttention(config.head_dim, config.attention_dim, config.value_dim, config.cross_layers)
        # tau = exp(log_temperature) stays positive while learned freely
        self.log_temperature = nn.Parameter(torch.tensor(math.log(config.temperature)))
        self.bias = nn.Parameter(torch.zeros(())) if config.bias else None

    @property
    def temperature(self) -> Tensor:
        """The current learnable ``tau`` of Eq. 8 (a scalar tensor)."""
        return self.log_temperature.exp()

    def encode_user(self, batch: Batch) -> State:
        return {"e": self.user_tower(self.emb.fields(batch, self.sel.user).flatten(-2))}

    def encode_item(self, batch: Batch) -> State:
        e_i = self.item_tower(self.emb.fields(batch, self.sel.item).flatten(-2))
        return self.cross.prepare_item(e_i)

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        e_u, e_i = self.cross.cross(self.cross.prepare_user(user["e"]), item)
        logit = max_similarity(e_u, e_i) * torch.exp(-self.log_temperature)
        return logit + self.bias if self.bias is not None else logit
