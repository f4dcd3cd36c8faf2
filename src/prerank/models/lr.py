"""Logistic regression: the simplest pre-ranker, a sum of per-feature weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.layers.embedding import EmbeddingTables
from prerank.models.base import FeatureSelection, PreRanker, State
from prerank.schema import Schema


@dataclass(frozen=True)
class LRConfig:
    features: tuple[str, ...] | None = None
    use_cross: bool = True


class LR(PreRanker):
    """``logit = b + sum_j w_j(x_j)``: one scalar weight per id (or per unit of a dense value).

    Cached per user: the sum of user/context weights ``u`` ``[B, 1]``; per item: ``i`` ``[N, 1]``;
    per candidate: ``u + i + sum of cross weights + b``. No user-item interaction.
    """

    def __init__(self, schema: Schema, config: LRConfig = LRConfig()):
        super().__init__(schema)
        self.config = config
        self.sel = FeatureSelection.resolve(schema, config.features, use_cross=config.use_cross)
        self.weights = EmbeddingTables(schema, 1, self.sel.user + self.sel.item + self.sel.cross)
        self.bias = nn.Parameter(torch.zeros(()))

    def encode_user(self, batch: Batch) -> State:
        return {"u": self.weights.fields(batch, self.sel.user).sum(-2)}

    def encode_item(self, batch: Batch) -> State:
        return {"i": self.weights.fields(batch, self.sel.item).sum(-2)}

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        logit = (user["u"] + item["i"]).squeeze(-1) + self.bias
        if self.sel.cross:
            if pair is None:
                raise ValueError(f"LR needs the cross features {list(self.sel.cross)} per candidate")
            logit = logit + self.weights.fields(pair, self.sel.cross).sum((-2, -1))
        return logit
