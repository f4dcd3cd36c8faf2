"""Two-Tower (DSSM): independent user and item MLP towers joined by a dot product or a cosine.

Huang et al., "Learning Deep Structured Semantic Models for Web Search using Clickthrough Data"
(CIKM 2013); the pre-ranking baseline of every seed paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.layers.embedding import EmbeddingTables
from prerank.layers.mlp import MLP
from prerank.models.base import ConfigError, FeatureSelection, PreRanker, State
from prerank.schema import Schema


@dataclass(frozen=True)
class TwoTowerConfig:
    embedding_dim: int = 16
    hidden: tuple[int, ...] = (256, 128)
    out_dim: int = 64
    dropout: float = 0.0
    similarity: Literal["dot", "cosine"] = "dot"
    temperature: float = 0.1
    features: tuple[str, ...] | None = None


class TwoTower(PreRanker):
    """``logit = <f_u(x_u), f_i(x_i)> + b`` (dot) or ``cos(f_u, f_i) / tau + b`` (cosine, tau learnable).

    Cached per user: ``u`` ``[B, D]``; per item: ``i`` ``[N, D]`` (D = ``out_dim``);
    per candidate: one D-dim dot product. Cross features are not used (no tower can see them).
    """

    def __init__(self, schema: Schema, config: TwoTowerConfig = TwoTowerConfig()):
        super().__init__(schema)
        if config.similarity not in ("dot", "cosine"):
            raise ConfigError(f"similarity must be 'dot' or 'cosine', got {config.similarity!r}")
        if config.temperature <= 0:
            raise ConfigError("temperature must be > 0")
        self.config = config
        self.sel = FeatureSelection.resolve(schema, config.features, use_cross=False)
        d = config.embedding_dim
        self.emb = EmbeddingTables(schema, d, self.sel.user + self.sel.item)
        self.user_tower = MLP(len(self.sel.user) * d, config.hidden, out_dim=config.out_dim, dropout=config.dropout)
        self.item_tower = MLP(len(self.sel.item) * d, config.hidden, out_dim=config.out_dim, dropout=config.dropout)
        # learnable temperature only where it has an effect (a dot product is already unbounded)
        cosine = config.similarity == "cosine"
        self.log_inv_temperature = nn.Parameter(torch.tensor(-math.log(config.temperature))) if cosine else None
        self.bias = nn.Parameter(torch.zeros(()))

    def _tower(self, tower: MLP, batch: Batch, names: tuple[str, ...]) -> Tensor:
        v = tower(self.emb.fields(batch, names).flatten(-2))
        return F.normalize(v, dim=-1) if self.config.similarity == "cosine" else v

    def encode_user(self, batch: Batch) -> State:
        return {"u": self._tower(self.user_tower, batch, self.sel.user)}

    def encode_item(self, batch: Batch) -> State:
        return {"i": self._tower(self.item_tower, batch, self.sel.item)}

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        # a user state [1, D] broadcasts over the N items
        sim = (user["u"] * item["i"]).sum(-1)
        if self.log_inv_temperature is not None:
            sim = sim * self.log_inv_temperature.exp()
        return sim + self.bias
