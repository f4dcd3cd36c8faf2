"""The ranking teacher: an interaction-focused ranker over every feature.

It stands for the ranking stage of the cascade (DESIGN.md "The cascade"): it is trained on
impressions with all features and its logit becomes ``teacher_logit`` for distillation. Architecture
as the ranking model of the FSCD paper (Ma et al., SIGIR 2021, Sec. 3.1: every feature field
embedded, an MLP with a sigmoid output; there 1024-512-256), with DIN target attention (Zhou et al.,
KDD 2018, Sec. 4.3) over behaviour sequences, since a ranker sees the candidate when it reads the
user's history.

Switches for a teacher that must beat the pre-rankers on small logs (issue 21), each off by default in the
config and chosen on the valid split:

- ``cross_layers`` > 0: DCN-v2 cross layers (Wang et al., "DCN V2", WWW 2021, Eq. 1) on the concatenated fields
  ``x_0`` before the MLP (the paper's *stacked* structure, Fig. 2b): ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``;
  with ``cross_rank`` = r the matrix is low-rank, ``W_l = U_l V_l^T`` (Eq. 2, without the mixture of experts).
- ``wide``: a first-order term added to the logit (Wide & Deep, Cheng et al., DLRS 2016, Eq. 3): the logistic
  regression of :class:`~prerank.models.lr.LR` over the same features, trained jointly. On a small log the
  strongest signals are first-order (a user's or item's base rate, the past-only cross counts), which an MLP
  over 16-dim embeddings learns slowly. ``wide_only`` names fields that only the wide part reads (the deep part
  reads the rest of ``features``): the paper's split, where the wide part memorises sparse ids and the deep part
  generalises over dense embeddings (Sec. 3). E.g. ``wide_only=(user_id, item_id, hist_item_id)``: an id seen in
  a few requests then fits one weight, not (through the MLP) a vector that can memorise each request's labels
  (docs/results.md, "Ranking teacher", synthetic default).
- ``target_attention=False``: every behaviour sequence is pooled by its schema ``pooling`` (as COLD reads it)
  instead of DIN; on a log whose behaviours are mostly items seen once, attention over their embeddings can fit noise.
- ``embedding_dropout``: dropout on the embedded fields (every field vector), a regulariser for id embeddings
  most of whose rows are seen once or twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.layers.attention import DINAttention
from prerank.layers.embedding import EmbeddingTables
from prerank.layers.mlp import MLP
from prerank.models.base import ConfigError, FeatureSelection, PreRanker, State, broadcast_rows, cross_fields
from prerank.models.lr import LR, LRConfig
from prerank.schema import Schema


@dataclass(frozen=True)
class RankerConfig:
    """``attention_hidden`` is DIN's activation unit. The defaults (``hidden`` 512-256, 3 full-rank cross layers)
    were chosen on the valid split of ML-1M ``paper`` (docs/results.md, "Ranking teacher (issue 21, part 1)"); the
    FSCD paper's ranking model is ``hidden=(1024, 512, 256), cross_layers=0``.

    ``cross_layers``, ``cross_rank``, ``wide``, ``wide_only``, ``target_attention`` and ``embedding_dropout``: see
    the module docstring.
    """

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (512, 256)
    dropout: float = 0.0
    attention_hidden: tuple[int, ...] = (64, 32)
    features: tuple[str, ...] | None = None
    use_cross: bool = True
    cross_layers: int = 3
    cross_rank: int | None = None
    wide: bool = False
    wide_only: tuple[str, ...] = ()
    target_attention: bool = True
    embedding_dropout: float = 0.0

    #: Values of options added after a release, for checkpoints that predate them (their stored config lacks the
    #: key, and today's default would change the model): rankers saved before cross layers existed had none.
    LEGACY: ClassVar[dict[str, Any]] = {"cross_layers": 0}


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer (Wang et al. 2021, Eq. 1; Eq. 2 when ``rank`` is given).

    ``forward(x0, x) = x0 * (W x + b) + x`` with ``W`` ``[K, K]``, or ``W = U V^T`` with ``U, V`` ``[K, r]``.
    Shapes: ``x0``, ``x`` ``[B, K]`` -> ``[B, K]``. ``W`` starts at zero scale (small normal), so the layer starts
    near the identity and the MLP first sees the plain fields.
    """

    def __init__(self, dim: int, rank: int | None = None):
        super().__init__()
        self.down = None if rank is None else nn.Linear(dim, rank, bias=False)  # V^T
        self.up = nn.Linear(dim if rank is None else rank, dim)  # W (or U) and b
        for lin in (self.down, self.up):
            if lin is not None:
                nn.init.normal_(lin.weight, std=0.01)
        nn.init.zeros_(self.up.bias)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        h = x if self.down is None else self.down(x)
        return torch.addcmul(x, x0, self.up(h))


class Ranker(PreRanker):
    """``logit = MLP(Cross^L(x_0)) [+ LR]``, ``x_0 = [user fields; DIN(target, seq) per sequence; item fields;
    cross fields]`` (``Cross^0`` is the identity; ``LR`` only with ``wide``).

    A user-side sequence whose ids share the table of a used item feature (``hist_item_id`` shares
    ``item_id``) is read by DIN target attention with that item feature's embedding as the query;
    every other sequence is pooled by its schema ``pooling`` and becomes an ordinary field.

    It keeps the contract but is not meant to be cheap: cached per user ``fields`` ``[F_u, D]`` and
    each attended sequence ``seq:<name>`` ``[L, D]`` with its mask; per item ``fields`` ``[F_i, D]``;
    per candidate the DIN activation unit over every behaviour, the cross layers and the whole MLP; with ``wide``
    also LR's states under ``wide:`` keys.
    """

    def __init__(self, schema: Schema, config: RankerConfig = RankerConfig()):
        super().__init__(schema)
        if not config.hidden or min(config.hidden) < 1:
            raise ConfigError(f"ranker needs at least one positive hidden width, got hidden={config.hidden}")
        if not 0.0 <= config.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {config.dropout}")
        if not 0.0 <= config.embedding_dropout < 1.0:
            raise ConfigError(f"embedding_dropout must be in [0, 1), got {config.embedding_dropout}")
        if config.cross_layers < 0:
            raise ConfigError(f"cross_layers must be >= 0, got {config.cross_layers}")
        if config.cross_rank is not None and config.cross_rank < 1:
            raise ConfigError(f"cross_rank must be a positive integer or None (full rank), got {config.cross_rank}")
        if config.wide_only and not config.wide:
            raise ConfigError("wide_only needs wide=true (it names fields that only the wide part reads)")
        self.config = config
        every = FeatureSelection.resolve(schema, config.features, use_cross=config.use_cross)
        missing = set(config.wide_only) - set(every.user + every.item + every.cross)
        if missing:
            raise ConfigError(f"wide_only names fields the model does not read: {sorted(missing)}")
        deep = tuple(n for n in every.user + every.item + every.cross if n not in config.wide_only)
        self.sel = FeatureSelection.resolve(schema, deep, use_cross=config.use_cross)
        item_by_table = {schema[n].table: i for i, n in enumerate(self.sel.item) if schema[n].kind == "categorical"}
        #: attended sequence name -> index of its query among the item fields
        self.attended = {
            n: item_by_table[schema[n].table]
            for n in self.sel.user
            if config.target_attention and schema[n].kind == "sequence" and schema[n].table in item_by_table
        }
        self.user_fields = tuple(n for n in self.sel.user if n not in self.attended)
        d = config.embedding_dim
        self.emb = EmbeddingTables(schema, d, self.sel.user + self.sel.item + self.sel.cross)
        self.attention = nn.ModuleDict({n: DINAttention(d, config.attention_hidden) for n in self.attended})
        n_fields = len(self.user_fields) + len(self.attended) + len(self.sel.item) + len(self.sel.cross)
        self.cross = nn.ModuleList(CrossLayer(n_fields * d, config.cross_rank) for _ in range(config.cross_layers))
        self.mlp = MLP(n_fields * d, config.hidden, out_dim=1, dropout=config.dropout)
        self.field_dropout = nn.Dropout(config.embedding_dropout)
        self.wide = LR(schema, LRConfig(config.features, config.use_cross)) if config.wide else None

    def encode_user(self, batch: Batch) -> State:
        state: State = {}
        if self.user_fields:
            state["fields"] = self.emb.fields(batch, self.user_fields)
        for name in self.attended:
            seq, mask = self.emb.sequence(batch, name)
            state[f"seq:{name}"], state[f"mask:{name}"] = seq, mask
        if self.wide is not None:
            state |= {f"wide:{k}": v for k, v in self.wide.encode_user(batch).items()}
        return state

    def encode_item(self, batch: Batch) -> State:
        state = {"fields": self.emb.fields(batch, self.sel.item)}
        if self.wide is not None:
            state |= {f"wide:{k}": v for k, v in self.wide.encode_item(batch).items()}
        return state

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        items = item["fields"]  # [N, F_i, D]
        n, d = items.shape[0], self.config.embedding_dim
        parts = [broadcast_rows(user["fields"], n)] if self.user_fields else []
        for name, query in self.attended.items():
            keys, mask = broadcast_rows(user[f"seq:{name}"], n), broadcast_rows(user[f"mask:{name}"], n)
            parts.append(self.attention[name](items[:, query], keys, mask).unsqueeze(1))
        parts += [items, cross_fields(self.emb, pair, self.sel.cross, n, d)]
        x0 = self.field_dropout(torch.cat(parts, dim=1)).flatten(1)  # [N, F*D]
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        logit = self.mlp(x).squeeze(-1)
        if self.wide is not None:
            logit = logit + self.wide.score(_prefixed(user, "wide:"), _prefixed(item, "wide:"), pair)
        return logit


def _prefixed(state: State, prefix: str) -> State:
    """The entries of ``state`` under ``prefix``, without it."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
