"""The ranking teacher: an interaction-focused ranker over every feature.

It stands for the ranking stage of the cascade (DESIGN.md "The cascade"): it is trained on
impressions with all features and its logit becomes ``teacher_logit`` for distillation. Architecture
as the ranking model of the FSCD paper (Ma et al., SIGIR 2021, Sec. 3.1: every feature field
embedded, hidden layers 1024-512-256, a sigmoid output), with DIN target attention (Zhou et al.,
KDD 2018, Sec. 4.3) over behaviour sequences, since a ranker sees the candidate when it reads the
user's history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.layers.attention import DINAttention
from prerank.layers.embedding import EmbeddingTables
from prerank.layers.mlp import MLP
from prerank.models.base import ConfigError, FeatureSelection, PreRanker, State, broadcast_rows, cross_fields
from prerank.schema import Schema


@dataclass(frozen=True)
class RankerConfig:
    """``hidden`` defaults to the FSCD paper's ranking model; ``attention_hidden`` is DIN's activation unit."""

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (1024, 512, 256)
    dropout: float = 0.0
    attention_hidden: tuple[int, ...] = (64, 32)
    features: tuple[str, ...] | None = None
    use_cross: bool = True


class Ranker(PreRanker):
    """``logit = MLP([user fields; DIN(target, seq) per sequence; item fields; cross fields])``.

    A user-side sequence whose ids share the table of a used item feature (``hist_item_id`` shares
    ``item_id``) is read by DIN target attention with that item feature's embedding as the query;
    every other sequence is pooled by its schema ``pooling`` and becomes an ordinary field.

    It keeps the contract but is not meant to be cheap: cached per user ``fields`` ``[F_u, D]`` and
    each attended sequence ``seq:<name>`` ``[L, D]`` with its mask; per item ``fields`` ``[F_i, D]``;
    per candidate the DIN activation unit over every behaviour and the whole MLP.
    """

    def __init__(self, schema: Schema, config: RankerConfig = RankerConfig()):
        super().__init__(schema)
        if not config.hidden or min(config.hidden) < 1:
            raise ConfigError(f"ranker needs at least one positive hidden width, got hidden={config.hidden}")
        if not 0.0 <= config.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {config.dropout}")
        self.config = config
        self.sel = FeatureSelection.resolve(schema, config.features, use_cross=config.use_cross)
        item_by_table = {schema[n].table: i for i, n in enumerate(self.sel.item) if schema[n].kind == "categorical"}
        #: attended sequence name -> index of its query among the item fields
        self.attended = {
            n: item_by_table[schema[n].table]
            for n in self.sel.user
            if schema[n].kind == "sequence" and schema[n].table in item_by_table
        }
        self.user_fields = tuple(n for n in self.sel.user if n not in self.attended)
        d = config.embedding_dim
        self.emb = EmbeddingTables(schema, d, self.sel.user + self.sel.item + self.sel.cross)
        self.attention = nn.ModuleDict({n: DINAttention(d, config.attention_hidden) for n in self.attended})
        n_fields = len(self.user_fields) + len(self.attended) + len(self.sel.item) + len(self.sel.cross)
        self.mlp = MLP(n_fields * d, config.hidden, out_dim=1, dropout=config.dropout)

    def encode_user(self, batch: Batch) -> State:
        state: State = {}
        if self.user_fields:
            state["fields"] = self.emb.fields(batch, self.user_fields)
        for name in self.attended:
            seq, mask = self.emb.sequence(batch, name)
            state[f"seq:{name}"], state[f"mask:{name}"] = seq, mask
        return state

    def encode_item(self, batch: Batch) -> State:
        return {"fields": self.emb.fields(batch, self.sel.item)}

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        items = item["fields"]  # [N, F_i, D]
        n, d = items.shape[0], self.config.embedding_dim
        parts = [broadcast_rows(user["fields"], n)] if self.user_fields else []
        for name, query in self.attended.items():
            keys, mask = broadcast_rows(user[f"seq:{name}"], n), broadcast_rows(user[f"mask:{name}"], n)
            parts.append(self.attention[name](items[:, query], keys, mask).unsqueeze(1))
        parts += [items, cross_fields(self.emb, pair, self.sel.cross, n, d)]
        return self.mlp(torch.cat(parts, dim=1).flatten(1)).squeeze(-1)
