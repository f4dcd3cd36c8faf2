"""FSCD's interaction-focused ranking and pre-ranking networks (Ma et al., SIGIR 2021, Sec. 2 and 3.1).

Both are the same architecture: every used feature field embedded (``v``), concatenated and fed to an
MLP (``w``) with a sigmoid output (here: logits; the sigmoid lives in the loss). The ranking model
uses every field and hidden layers 1024-512-256; the pre-ranking model uses the ``K`` fields chosen by
FSCD (:mod:`prerank.selection.fscd`) and hidden layers 1024-256 (Sec. 3.1). The same module also
serves as the selection network: :meth:`FSCDNet.gated_logits` multiplies each field's embedding by a
gate ``z_j`` (Eq. 1 / Eq. 5), the form FSCD, Dropout-FR and DFS train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.layers.embedding import EmbeddingTables
from prerank.layers.field import FieldProjection
from prerank.layers.mlp import MLP
from prerank.models.base import ConfigError, FeatureSelection, PreRanker, State, cross_fields
from prerank.schema import Schema


@dataclass(frozen=True)
class FSCDConfig:
    """``hidden`` are the MLP widths (the first is the layer split between user, item and pair);
    ``features`` the fields used (``None``: all of them, as the ranking model)."""

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (1024, 256)
    dropout: float = 0.0
    features: tuple[str, ...] | None = None
    use_cross: bool = True


class FSCDNet(PreRanker):
    """``logit = MLP(relu(b_1 + sum_f W_{1,f} e_f))`` over the fields ``f`` of :attr:`names` (F = F_u + F_i + F_c).

    Serving split (DESIGN.md, first-layer split ``W [u; i; c] = W_u u + W_i i + W_c c``):
    ``encode_user`` computes the user and context fields' share ``W_u u`` ``[B, H1]`` once per request,
    ``encode_item`` the item fields' share ``W_i i`` ``[B, H1]`` (cached per item: ``H1`` floats), and
    ``score`` adds the cross fields' share ``W_c c`` per candidate, the bias, and runs the rest of the
    MLP. Exact: the sum equals the unsplit first layer on the concatenated fields.

    Selection (:meth:`gated_logits`): the embedding of field ``j`` is multiplied by a gate
    ``z_j`` ``[B, F]`` before the first layer (FSCD Fig. 2); since the first layer is linear per field,
    ``W_{1,j} (z_j e_j) = z_j (W_{1,j} e_j)``.
    """

    def __init__(self, schema: Schema, config: FSCDConfig = FSCDConfig()):
        super().__init__(schema)
        if not config.hidden or min(config.hidden) < 1:
            raise ConfigError(f"FSCD needs at least one positive hidden width, got hidden={config.hidden}")
        if not 0.0 <= config.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {config.dropout}")
        if config.embedding_dim < 1:
            raise ConfigError(f"embedding_dim must be >= 1, got {config.embedding_dim}")
        self.config = config
        self.sel = FeatureSelection.resolve(schema, config.features, use_cross=config.use_cross)
        self.names: tuple[str, ...] = self.sel.user + self.sel.item + self.sel.cross
        d, h1 = config.embedding_dim, config.hidden[0]
        self.emb = EmbeddingTables(schema, d, self.names)
        self.first = FieldProjection(len(self.names), d, h1)
        self.first_bias = nn.Parameter(torch.zeros(h1))
        self.dropout = nn.Dropout(config.dropout)
        self.head = MLP(h1, config.hidden[1:], out_dim=1, dropout=config.dropout)
        self._item_offset = len(self.sel.user)
        self._cross_offset = len(self.sel.user) + len(self.sel.item)

    def all_fields(self, batch: Batch) -> Tensor:
        """Every used field's embedding ``[B, F, D]``, in the order of :attr:`names`."""
        return self.emb.fields(batch, self.names)

    def encode_user(self, batch: Batch) -> State:
        return {"proj": self.first.summed(self.emb.fields(batch, self.sel.user), 0)}

    def encode_item(self, batch: Batch) -> State:
        return {"proj": self.first.summed(self.emb.fields(batch, self.sel.item), self._item_offset)}

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        """Logits ``[N]``; the user share ``[1 or N, H1]`` broadcasts over the item shares ``[N, H1]``."""
        h = item["proj"] + user["proj"] + self.first_bias
        if self.sel.cross:
            cross = cross_fields(self.emb, pair, self.sel.cross, h.shape[0], self.config.embedding_dim)
            h = h + self.first.summed(cross, self._cross_offset)
        return self._head(h)

    def _head(self, h: Tensor) -> Tensor:
        return self.head(self.dropout(torch.relu(h))).squeeze(-1)

    def gated_logits(self, batch: Batch, z: Tensor) -> Tensor:
        """Logits ``[B]`` with field ``j``'s embedding multiplied by ``z[..., j]`` (``z`` ``[B, F]`` or ``[F]``)."""
        fields = self.all_fields(batch) * z.unsqueeze(-1)
        return self._head(self.first.summed(fields, 0, self.first_bias))
