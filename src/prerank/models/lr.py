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
    per candidate: ``i + (u + b)`` (``u + b`` once per request) plus the cross features' weights.
    No user-item interaction.
    """

    def __init__(self, schema: Schema, config: LRConfig = LRConfig()):
        super().__init__(schema)
        self.config = config
        self.sel = FeatureSelection.resolve(schema, config.features, use_cross=config.use_cross)
        self.weights = EmbeddingTables(schema, 1, self.sel.user + self.sel.item + self.sel.cross)
        self.bias = nn.Parameter(torch.zeros(()))
        # each side's features split into looked-up ones (ids, sequences) and dense ones
        self._split = {
            side: (
                tuple(n for n in names if schema[n].kind != "dense"),
                tuple(n for n in names if schema[n].kind == "dense"),
            )
            for side, names in (("user", self.sel.user), ("item", self.sel.item), ("cross", self.sel.cross))
        }

    def _weight_sum(self, batch: Batch, side: str) -> Tensor:
        """``sum_j w_j(x_j)`` over the features of ``side``, ``[B]``.

        A dense feature's weight is ``a_j x_j + c_j`` (its width-1 ``nn.Linear``).
        """
        ids, dense = self._split[side]
        terms = [self.weights.fields(batch, ids).sum((-2, -1))] if ids else []
        for name in dense:
            lin = self.weights.dense[name]
            terms.append(torch.addcmul(lin.bias, batch.features[name], lin.weight[0]))
        return torch.stack(terms).sum(0)

    def encode_user(self, batch: Batch) -> State:
        return {"u": self._weight_sum(batch, "user").unsqueeze(-1)}

    def encode_item(self, batch: Batch) -> State:
        return {"i": self._weight_sum(batch, "item").unsqueeze(-1)}

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        # the per-request constant u + b is added to the [N] item weights once
        logit = item["i"].squeeze(-1) + (user["u"] + self.bias).squeeze(-1)
        if self.sel.cross:
            if pair is None:
                raise ValueError(f"LR needs the cross features {list(self.sel.cross)} per candidate")
            logit = logit + self._weight_sum(pair, "cross")
        return logit
