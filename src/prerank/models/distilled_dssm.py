"""Distilled DSSM: the Taobao New-Product coarse ranker (two towers plus cheap, cacheable crossings).

Source: "Deep Ranking Optimization for E-commerce Recommendation" (Taobao New-Product team, 2021;
``../shared/papers/taobao-coarse-ranking-distillation.txt``), "Model improvements" 2-5 on top of
the "user-attention interaction DSSM": the user tower runs online once per request, the item tower
offline. Improvement 1 (multi-task label distillation) and the two-stage schedule are training
recipes, not parts of the network. The report gives no equations; every reading is written below.

Every improvement is a switch of :class:`DistilledDSSMConfig`, so each row of the report's ablation
("Offline experiments": MLP, FM, then NOVA, SENET, FiBiNET-style interaction) is one config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.layers.attention import NOVAAttention
from prerank.layers.embedding import EmbeddingTables
from prerank.layers.field import BILINEAR_TYPES, SENET, BilinearInteraction
from prerank.layers.mlp import MLP, SplitMLP
from prerank.models.base import ConfigError, FeatureSelection, PreRanker, State
from prerank.schema import Schema

HEADS: tuple[str, ...] = ("dot", "mlp")


@dataclass(frozen=True)
class DistilledDSSMConfig:
    """Options of :class:`DistilledDSSM`; the defaults are the full model (every improvement on).

    Attributes:
        embedding_dim: ``D``, the width of every feature embedding.
        hidden: hidden widths of both tower MLPs.
        out_dim: ``D'``, width of the user and item tower outputs ``u`` and ``i``.
        head: ``dot`` (``<u, i> + b``, plain DSSM) or ``mlp`` (improvement 5: an MLP on ``[u; i]``
            whose first layer is split between the towers).
        head_hidden: widths of the MLP head; the first is the split layer (``H1``).
        use_fm: improvement 2, the FM cross ``<sum_l e_{s_l}, e_t>`` of the behaviour sequence and the
            target item, added to the logit.
        use_nova: improvement 3, NOVA self-attention over the behaviour sequence in the user tower.
        use_senet: improvement 4a, SENET re-weighting of the item fields.
        use_bilinear: improvement 4b, FiBiNET bilinear interaction of the item fields.
        bilinear_type: ``field_all``, ``field_each`` or ``field_interaction`` (FiBiNET's three).
        reduction_ratio: SENET's ``r``.
        history: the behaviour sequence (a user-side sequence sharing an item feature's table);
            None picks the first such sequence of the schema.
        side_info: sequences aligned with ``history`` whose embeddings enter NOVA's queries and keys
            (e.g. ``hist_category_id``); None picks every user-side sequence with the history's
            ``max_len`` that shares an item feature's table. The recency position is always used.
        dropout: dropout of the tower MLPs and of the MLP head.
        features: restrict to these schema features (None = all user/context and item features).
    """

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (128,)
    out_dim: int = 32
    head: Literal["dot", "mlp"] = "mlp"
    head_hidden: tuple[int, ...] = (64, 32)
    use_fm: bool = True
    use_nova: bool = True
    use_senet: bool = True
    use_bilinear: bool = True
    bilinear_type: Literal["field_all", "field_each", "field_interaction"] = "field_interaction"
    reduction_ratio: int = 3
    history: str | None = None
    side_info: tuple[str, ...] | None = None
    dropout: float = 0.0
    features: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "out_dim", "reduction_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"distilled_dssm option {name} must be a positive integer, got {value!r}")
        for name in ("use_fm", "use_nova", "use_senet", "use_bilinear"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"distilled_dssm option {name} must be true or false, got {getattr(self, name)!r}")
        if self.head not in HEADS:
            raise ConfigError(f"distilled_dssm option head must be one of {HEADS}, got {self.head!r}")
        if self.head == "mlp" and (not self.head_hidden or min(self.head_hidden) < 1):
            raise ConfigError(f"the mlp head needs positive widths, got head_hidden={self.head_hidden}")
        if self.bilinear_type not in BILINEAR_TYPES:
            raise ConfigError(f"bilinear_type must be one of {BILINEAR_TYPES}, got {self.bilinear_type!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


class DistilledDSSM(PreRanker):
    """DSSM with the report's four network improvements, each cacheable on its own side.

    **User tower** (online, once per request). The user/context fields ``[B, F_u, D]`` (sequences
    mean-pooled) are flattened into an MLP giving ``u`` ``[B, D']``. With ``use_nova`` the behaviour
    sequence's field is replaced by its NOVA-denoised pooling (improvement 3; Liu et al., AAAI 2021):
    :class:`~prerank.layers.attention.NOVAAttention` with values = the history's item embeddings
    ``[B, L, D]`` and, in queries and keys only, side information ``[B, L, D]`` = the sum of the
    aligned side-info sequences' embeddings (``hist_category_id`` in the synthetic schema) and a
    learned *recency* position embedding (0 = most recent behaviour; the batches keep the last
    ``max_len`` ids left-aligned, so recency is ``length - 1 - l``). Reading: where the schema has no
    side-info sequence (the tiny test schema), the recency position is the only side information,
    which is NOVA's own positional side information. The outputs of the valid positions are averaged.

    **Item tower** (offline, the item cache). The item fields ``E`` ``[N, F_i, D]``. With
    ``use_senet``, ``E' = SENET(E)`` (FiBiNET's squeeze-excitation) replaces ``E``. With
    ``use_bilinear``, FiBiNET's combination is appended: ``p = Bilinear(E)`` ``[N, P, D]`` and, when
    SENET is on too, ``q = Bilinear(E')``. Reading: the first-order fields stay in the tower input
    (FiBiNET keeps them through its linear part, which a DSSM tower does not have). The MLP gives
    ``i`` ``[N, D']``.

    **Head.** ``dot``: ``<u, i> + b``. ``mlp`` (improvement 5): ``MLP([u; i])`` with the first layer
    split (:class:`~prerank.layers.mlp.SplitMLP`): the user state holds ``W_u u + b_1`` ``[B, H1]``,
    the item cache ``W_i i`` ``[N, H1]``; per candidate one add, a ReLU and the layers after the first.

    **FM cross** (improvement 2, ``use_fm``): ``sum_l <e_{s_l}, e_t> = <sum_l e_{s_l}, e_t>`` over the
    valid behaviours ``s_l`` and the target item ``t``, both looked up in the one shared item-id table.
    The identity decouples the cross: the user state adds ``fm = sum_l e_{s_l}`` ``[B, D]`` (once per
    request), the item cache adds ``fm = e_t`` ``[N, D]``, and the cross costs one ``D``-wide dot product
    per candidate, added to the logit. It stays cacheable because the pairwise FM term is bilinear in
    the two sides and the sum over the sequence moves inside it; a cross that needed a non-linearity
    per (behaviour, target) pair (DIN's target attention) could not be split this way. It uses the
    raw history embeddings, not NOVA's denoised ones, so that it is exactly the FM over the sequence.

    States: user ``u`` ``[B, D']`` (dot) or ``head`` ``[B, H1]`` (mlp), plus ``fm`` ``[B, D]``; item
    ``i`` ``[N, D']`` or ``head`` ``[N, H1]``, plus ``fm`` ``[N, D]``. Cross features are not used.

    Cost per candidate (``prerank.bench.cost.score_cost``, default widths ``D' = 32``, ``H1, H2 = 64, 32``):
    dot head 65 FLOPs and 128 cached bytes per item; mlp head 4,320 FLOPs and 256 bytes; the FM cross
    adds 33 FLOPs and 64 bytes. NOVA, SENET and bilinear cost nothing per candidate (user tower and
    item cache).
    """

    def __init__(self, schema: Schema, config: DistilledDSSMConfig = DistilledDSSMConfig()):
        super().__init__(schema)
        self.config = config
        self.sel = FeatureSelection.resolve(schema, config.features, use_cross=False)
        d, out = config.embedding_dim, config.out_dim
        self.history = self._resolve_history(schema) if (config.use_fm or config.use_nova) else None
        self.target = self._resolve_target(schema) if self.history is not None else None
        self.side_info = self._resolve_side_info(schema) if config.use_nova else ()
        self.emb = EmbeddingTables(schema, d, self.sel.user + self.sel.item)
        if config.use_nova:
            self.position = nn.Embedding(schema[self.history].max_len, d)
            nn.init.normal_(self.position.weight, std=0.01)
            self.nova = NOVAAttention(d)
        n_item = len(self.sel.item)
        if config.use_senet:
            self.senet = SENET(n_item, config.reduction_ratio)
        item_in = n_item * d
        if config.use_bilinear:
            if n_item < 2:
                raise ConfigError("use_bilinear needs at least two item-side features")
            self.bilinear = BilinearInteraction(n_item, d, config.bilinear_type)
            item_in += self.bilinear.num_pairs * d * (2 if config.use_senet else 1)
        self.user_tower = MLP(len(self.sel.user) * d, config.hidden, out_dim=out, dropout=config.dropout)
        self.item_tower = MLP(item_in, config.hidden, out_dim=out, dropout=config.dropout)
        if config.head == "mlp":
            self.head = SplitMLP(out, out, config.head_hidden, dropout=config.dropout)
        else:
            self.bias = nn.Parameter(torch.zeros(()))

    def _resolve_history(self, schema: Schema) -> str:
        item_tables = {schema[n].table for n in self.sel.item if schema[n].kind == "categorical"}
        candidates = [
            n
            for n in self.sel.user
            if schema[n].kind == "sequence" and schema[n].shares is not None and schema[n].table in item_tables
        ]
        name = self.config.history
        if name is None:
            if not candidates:
                raise ConfigError(
                    "use_fm / use_nova need a user-side behaviour sequence that shares an item feature's "
                    "embedding table (e.g. hist_item_id -> item_id); the schema has none"
                )
            # prefer the sequence of item ids over e.g. a sequence of categories
            return next((n for n in candidates if schema[n].shares == "item_id"), candidates[0])
        if name not in candidates:
            raise ConfigError(f"history {name!r} is not a user-side sequence sharing an item feature's table")
        return name

    def _resolve_target(self, schema: Schema) -> str:
        """The item feature in the history's table (``item_id`` for ``hist_item_id``): FM's ``e_t``."""
        table = schema[self.history].table
        return next(n for n in self.sel.item if schema[n].kind == "categorical" and schema[n].table == table)

    def _resolve_side_info(self, schema: Schema) -> tuple[str, ...]:
        history = schema[self.history]
        item_tables = {schema[n].table for n in self.sel.item if schema[n].kind == "categorical"}
        if self.config.side_info is not None:
            for name in self.config.side_info:
                f = schema[name] if name in schema.names else None
                if f is None or name not in self.sel.user or f.kind != "sequence" or name == self.history:
                    raise ConfigError(f"side_info {name!r} is not a selected user-side sequence other than the history")
                if f.max_len != history.max_len:
                    raise ConfigError(f"side_info {name!r} has max_len {f.max_len}, the history {history.max_len}")
            return tuple(self.config.side_info)
        return tuple(
            n
            for n in self.sel.user
            if n != self.history
            and schema[n].kind == "sequence"
            and schema[n].max_len == history.max_len
            and schema[n].shares is not None
            and schema[n].table in item_tables
        )

    def _nova_history(self, batch: Batch) -> Tensor:
        """The NOVA-denoised, pooled behaviour sequence ``[B, D]``."""
        items, mask = self.emb.sequence(batch, self.history)  # [B, L, D], [B, L]
        length = mask.sum(-1, keepdim=True)  # [B, 1]
        steps = torch.arange(mask.shape[-1], device=mask.device)
        recency = (length - 1 - steps).clamp_min(0)  # [B, L], 0 = most recent
        side = self.position(recency)
        for name in self.side_info:
            side = side + self.emb.sequence(batch, name)[0]
        return self.nova.pooled(items, side, mask)

    def user_vector(self, batch: Batch) -> Tensor:
        """The user tower's output ``u`` ``[B, D']``."""
        fields = [
            self._nova_history(batch) if self.config.use_nova and n == self.history else self.emb.field(batch, n)
            for n in self.sel.user
        ]
        return self.user_tower(torch.stack(fields, dim=-2).flatten(-2))

    def item_vector(self, batch: Batch) -> Tensor:
        """The item tower's output ``i`` ``[N, D']``."""
        e = self.emb.fields(batch, self.sel.item)  # [N, F_i, D]
        first = self.senet(e) if self.config.use_senet else e
        parts = [first.flatten(-2)]
        if self.config.use_bilinear:
            parts.append(self.bilinear(e).flatten(-2))
            if self.config.use_senet:
                parts.append(self.bilinear(first).flatten(-2))
        return self.item_tower(torch.cat(parts, dim=-1))

    def encode_user(self, batch: Batch) -> State:
        u = self.user_vector(batch)
        state = {"head": self.head.user_part(u)} if self.config.head == "mlp" else {"u": u}
        if self.config.use_fm:
            seq, mask = self.emb.sequence(batch, self.history)
            state["fm"] = (seq * mask.unsqueeze(-1).to(seq.dtype)).sum(-2)
        return state

    def encode_item(self, batch: Batch) -> State:
        i = self.item_vector(batch)
        state = {"head": self.head.item_part(i)} if self.config.head == "mlp" else {"i": i}
        if self.config.use_fm:
            state["fm"] = self.emb.field(batch, self.target)
        return state

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        """Logits ``[N]``; a user state with leading dim 1 broadcasts over the N candidates."""
        if self.config.head == "mlp":
            logit = self.head.combine(user["head"], item["head"])
        else:
            logit = (user["u"] * item["i"]).sum(-1) + self.bias
        if self.config.use_fm:
            logit = logit + self.fm(user, item)
        return logit

    def fm(self, user: State, item: State) -> Tensor:
        """The FM cross ``<sum_l e_{s_l}, e_t>`` ``[N]`` from the cached vectors."""
        return (user["fm"] * item["fm"]).sum(-1)
