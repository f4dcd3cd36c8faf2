"""FIT: the learnable Fully Interacted Two-Tower model.

Xiong, Yu, Xu, Cheng, Yuan, Mo, "A Learnable Fully Interacted Two-Tower Model for Pre-Ranking
System" (Ant Group, 2025). The slides (``../shared/papers/fit-fully-interacted-two-tower.txt``) are
the source cited here: "Meta Query Module (MQM)" with Figure 2 (training vs inference phase),
"Lightweight Similarity Scorer (LSS)", and "Component Effectiveness Analysis" (the ablations).
No public implementation exists; where the slides are silent the choice is written down below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.layers.attention import DINAttention
from prerank.layers.embedding import EmbeddingTables
from prerank.layers.fit_parts import (
    DotScorer,
    FCScorer,
    LightweightSimilarityScorer,
    MetaQuerySelector,
    Scorer,
    SumMaxScorer,
)
from prerank.layers.mlp import MLP
from prerank.models.base import ConfigError, FeatureSelection, PreRanker, State, broadcast_rows
from prerank.schema import Schema

SCORERS: tuple[str, ...] = ("lss", "dot", "summax", "fc")


@dataclass(frozen=True)
class FITConfig:
    """FIT options; the defaults are sized for CPU training on ML-1M-scale data.

    Attributes:
        embedding_dim: ``D``, the width of every feature embedding, of the meta vectors and of the DIN.
        num_meta: ``M``, rows of the meta matrix (MQM slide, point 1); the user state holds M
            representations per user, so M trades early-interaction resolution for user-side cost.
        hidden: hidden widths of the user and item tower MLPs.
        rep_dim: ``D'``, width of the user and item representations fed to the scorer.
        din_hidden: hidden widths of the DIN activation unit (MQM slide, point 3).
        scorer: ``lss`` (FIT), ``dot`` ("w/o LSS"), ``summax`` ("w SumMax") or ``fc`` ("w FC").
        user_heads, item_heads, head_dim: ``H_u``, ``H_v``, ``d`` of the LSS / sum-max sub-spaces.
        fc_hidden: hidden width ``h`` of the ``fc`` scorer.
        use_mqm: False gives "w/o MQM": a plain user MLP, no meta matrix, no DIN.
        temperature: ``tau`` of the straight-through softmax over cosine similarities to the meta vectors.
        cluster_weight: weight of the clustering (VQ) loss added by ``auxiliary_loss``; 0 disables it.
        commitment: ``beta`` of the commitment term inside the clustering loss (VQ-VAE's 0.25).
        restart_threshold: in training, a meta vector chosen by fewer than ``restart_threshold / num_meta`` of the
            items (moving average) restarts at a random item key (:class:`MetaQuerySelector`); 0 disables it.
        dropout: dropout of the tower MLPs.
        features: restrict to these schema features (None = all user/context and item features).
    """

    embedding_dim: int = 16
    num_meta: int = 16
    hidden: tuple[int, ...] = (128,)
    rep_dim: int = 32
    din_hidden: tuple[int, ...] = (32, 16)
    scorer: Literal["lss", "dot", "summax", "fc"] = "lss"
    user_heads: int = 4
    item_heads: int = 4
    head_dim: int = 8
    fc_hidden: int = 32
    use_mqm: bool = True
    temperature: float = 0.1
    cluster_weight: float = 0.1
    commitment: float = 0.25
    restart_threshold: float = 0.1
    dropout: float = 0.0
    features: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        positive = ("embedding_dim", "num_meta", "rep_dim", "user_heads", "item_heads", "head_dim", "fc_hidden")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"fit option {name} must be a positive integer, got {value!r}")
        if self.scorer not in SCORERS:
            raise ConfigError(f"fit option scorer must be one of {SCORERS}, got {self.scorer!r}")
        if not self.temperature > 0:
            raise ConfigError(f"fit option temperature must be > 0, got {self.temperature!r}")
        for name in ("cluster_weight", "commitment", "restart_threshold"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"fit option {name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"fit option dropout must be in [0, 1), got {self.dropout!r}")


def make_scorer(config: FITConfig) -> Scorer:
    d = config.rep_dim
    if config.scorer == "lss":
        return LightweightSimilarityScorer(d, config.user_heads, config.item_heads, config.head_dim)
    if config.scorer == "summax":
        return SumMaxScorer(d, config.user_heads, config.item_heads, config.head_dim)
    if config.scorer == "fc":
        return FCScorer(d, config.fc_hidden)
    return DotScorer()


class FIT(PreRanker):
    """FIT = item tower + MQM user tower (meta matrix, attention unit, DIN interaction unit) + LSS.

    **Item tower.** The item's field embeddings ``[N, F_i, D]`` go through an MLP to ``v`` ``[N, D']``.
    The attention unit (MQM slide, point 2: "similarity scores between the meta matrix and item
    features") scores the meta vectors against the key ``k = W_k [e_1; ...; e_F]`` ``[N, D]``, a
    bias-free linear map of the item's categorical and sequence field embeddings, and
    :class:`MetaQuerySelector` keeps the most similar meta vector; the item embeddings are trained
    through that choice as well as through the scorer. Why not a map of ``v`` or of the dense fields:
    the selection is by cosine, and what all items share (the MLP's biases; a dense value's
    embedding ``w x + b``, one direction for every item) dominates those vectors at initialisation,
    sends every item to the same meta vector (seen in testing) and the clustering loss then keeps
    them there; id embeddings start as independent random vectors per item. Dense item features
    enter the key only if the item side has nothing else.

    **MQM interaction unit** (MQM slide, point 3). For a query ``q`` ``[.., D]`` (a meta vector) the
    DIN activation unit (Zhou et al., KDD 2018, Sec. 4.3) attends over the user's *keys*: one key
    per non-sequence user/context feature (its field embedding: explicit feature-level crossing of
    the meta item with each user feature) plus every element of each user-side sequence (the
    behaviour items, which share the ``item_id`` table, the DIN target-attention of the slides).
    The user MLP then reads ``[pooled user fields; DIN(q, keys); q]`` and gives ``u(q)`` ``[.., D']``:
    the meta item is an input of the user tower (early fusion), so ``u`` is an arbitrary function
    of the user features and the item's cluster.

    **Two paths** (Figure 2). *Training* ("retains only the most similar meta vector"): each row's
    item selects one meta query, and DIN + MLP run once per row with that query. This is
    :meth:`forward` in every mode, and ``encode_user`` / ``encode_item`` / ``score`` in training mode
    (``encode_user`` then returns the per-row DIN inputs and ``encode_item`` the selected query),
    so a trainer that calls the contract methods trains the same path at the same cost.
    *Inference* ("all meta vectors ... generate multiple intermediate user representations"; "the
    output layer selects the final representation solely through the index"): in eval mode
    ``encode_user`` runs the MQM once per meta vector and stores the scorer's user part for each;
    ``encode_item`` stores the item's scorer part and its meta index; ``score`` gathers the user
    part by that index and runs only the scorer. Both paths give the same scores in eval mode;
    ``forward`` keeps the one-query path there too because offline evaluation has one user per
    row, where it costs one DIN pass per row instead of M.

    **Scorer** (LSS slide): see :class:`~prerank.layers.fit_parts.LightweightSimilarityScorer`.

    States (eval mode, default LSS): user ``{"user": [B, M, H_u, d]}`` (the user heads per meta
    vector); item ``{"item": [N, H_u, d], "meta_index": [N] int64}`` (the item heads already mixed
    by LSS's row FC, which is linear in the item); per candidate: one gather of the user heads by
    meta index, ``H_u`` dot products of width ``d``, the PReLU and the column FC. With
    ``use_mqm=False`` ("w/o MQM") the user state is ``{"user": [B, H_u, d]}`` and the item state has
    no meta index.

    Training adds, through :meth:`auxiliary_loss`, the clustering loss of
    :meth:`MetaQuerySelector.cluster_loss` weighted by ``cluster_weight``.

    Cross features are not used: like every two-tower model, neither tower can see per-pair features.
    """

    def __init__(self, schema: Schema, config: FITConfig = FITConfig()):
        super().__init__(schema)
        self.config = config
        self.sel = FeatureSelection.resolve(schema, config.features, use_cross=False)
        d, rep = config.embedding_dim, config.rep_dim
        self.user_sequences = tuple(n for n in self.sel.user if schema[n].kind == "sequence")
        self.user_singles = tuple(n for n in self.sel.user if schema[n].kind != "sequence")
        singles = [i for i, n in enumerate(self.sel.user) if schema[n].kind != "sequence"]
        self.register_buffer("single_fields", torch.tensor(singles, dtype=torch.long), persistent=False)
        self.emb = EmbeddingTables(schema, d, self.sel.user + self.sel.item)
        self.item_tower = MLP(len(self.sel.item) * d, config.hidden, out_dim=rep, dropout=config.dropout)
        user_in = len(self.sel.user) * d
        if config.use_mqm:
            ids = [i for i, n in enumerate(self.sel.item) if schema[n].kind != "dense"]
            self.register_buffer("key_fields", torch.tensor(ids or list(range(len(self.sel.item)))), persistent=False)
            self.key_proj = nn.Linear(len(self.key_fields) * d, d, bias=False)
            self.selector = MetaQuerySelector(
                config.num_meta, d, temperature=config.temperature, restart_threshold=config.restart_threshold
            )
            self.din = DINAttention(d, config.din_hidden)
            user_in += 2 * d
        self.user_tower = MLP(user_in, config.hidden, out_dim=rep, dropout=config.dropout)
        self.scorer = make_scorer(config)

    def user_inputs(self, batch: Batch) -> State:
        """Per-row inputs of the training path: pooled fields ``[B, F_u*D]`` and DIN keys ``[B, K, D]``,
        with their mask ``key_mask`` ``[B, K]`` when the user side has sequences (else every key is real).

        ``K`` = number of non-sequence user/context features + the lengths of the user sequences.
        """
        fields = self.emb.fields(batch, self.sel.user)  # [B, F_u, D]
        if not self.user_sequences:
            return {"fields": fields.flatten(-2), "keys": fields}
        keys, masks = [], []
        if self.user_singles:
            singles = fields[:, self.single_fields]
            keys.append(singles)
            masks.append(torch.ones(singles.shape[:2], dtype=torch.bool, device=singles.device))
        for name in self.user_sequences:
            seq, mask = self.emb.sequence(batch, name)
            keys.append(seq)
            masks.append(mask)
        return {"fields": fields.flatten(-2), "keys": torch.cat(keys, 1), "key_mask": torch.cat(masks, 1)}

    def _interact(self, inputs: State, query: Tensor) -> Tensor:
        """MQM interaction unit, one query per row: query ``[B, D]`` -> user representation ``[B, D']``."""
        interest = self.din(query, inputs["keys"], inputs.get("key_mask"))
        return self.user_tower(torch.cat([inputs["fields"], interest, query], -1))

    def _interact_meta(self, inputs: State) -> Tensor:
        """MQM interaction unit for every meta vector of every row: ``[B, M, D']``."""
        meta = self.selector.meta
        interest = self.din.shared_queries(meta, inputs["keys"], inputs.get("key_mask"))  # [B, M, D]
        b, m = interest.shape[:2]
        fields = inputs["fields"].unsqueeze(1).expand(-1, m, -1)
        return self.user_tower(torch.cat([fields, interest, meta.expand(b, -1, -1)], -1))

    def user_per_meta(self, batch: Batch) -> State:
        """The inference-phase user state: the scorer's user part for every meta vector, ``[B, M, *U]``."""
        if not self.config.use_mqm:
            return {"user": self.scorer.user_part(self.user_tower(self.emb.fields(batch, self.sel.user).flatten(-2)))}
        return {"user": self.scorer.user_part(self._interact_meta(self.user_inputs(batch)))}

    def encode_user(self, batch: Batch) -> State:
        """Training mode (with MQM): :meth:`user_inputs`; otherwise :meth:`user_per_meta`."""
        if self.training and self.config.use_mqm:
            return self.user_inputs(batch)
        return self.user_per_meta(batch)

    def _item_key(self, fields: Tensor) -> Tensor:
        """Attention-unit key ``[N, D]`` from the item field embeddings ``[N, F_i, D]``."""
        return self.key_proj(fields[:, self.key_fields].flatten(-2))

    def _encode_item(self, batch: Batch, *, with_query: bool) -> State:
        fields = self.emb.fields(batch, self.sel.item)
        state = {"item": self.scorer.item_part(self.item_tower(fields.flatten(-2)))}
        if not self.config.use_mqm:
            return state
        if with_query and self.training:
            self.selector.restart_dead()  # before the meta matrix enters this step's graph
        key = self._item_key(fields)
        if with_query:
            state["query"], state["meta_index"] = self.selector.select(key)
            state["key"] = key
            if self.training:
                self.selector.observe(key, state["meta_index"])
        else:
            state["meta_index"] = self.selector.index(key)
        return state

    def encode_item(self, batch: Batch) -> State:
        """``{"item": [N, *V], "meta_index": [N]}``; in training mode also ``query`` and ``key`` ``[N, D]``."""
        return self._encode_item(batch, with_query=self.training)

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        """Logits ``[N]`` from a precomputed (``"user"``) or a per-row (``"fields"``) user state."""
        if "item" not in item:
            raise ValueError("FIT item state lacks 'item'; build it with FIT.encode_item")
        n = item["item"].shape[0]
        if "user" in user:
            rows, index = self._pick(user["user"], item, n)
            return self.scorer(rows, item["item"], index)
        if "query" not in item:
            raise ValueError(
                "a per-row FIT user state (training path) needs the item's selected meta 'query': "
                "encode the items in training mode, or encode the user in eval mode"
            )
        inputs = {k: broadcast_rows(v, n) for k, v in user.items()}
        return self.scorer(self.scorer.user_part(self._interact(inputs, item["query"])), item["item"])

    def _pick(self, user: Tensor, item: State, n: int) -> tuple[Tensor, Tensor | None]:
        """The user part for each candidate from ``[B_u, M, *U]`` (B_u in {1, N}): ``[N, *U]`` and no index, or,
        for one user, its rows ``[M, *U]`` and the meta index ``[N]`` that the scorer gathers them by."""
        if not self.config.use_mqm:
            return broadcast_rows(user, n), None
        if "meta_index" not in item:
            raise ValueError("FIT item state lacks 'meta_index'; build it with FIT.encode_item")
        index = item["meta_index"]
        if user.shape[0] == 1:
            return user[0], index
        return user[torch.arange(n, device=index.device), index], None

    def forward(self, batch: Batch) -> Tensor:
        """The training path of Figure 2 (one selected meta query per row, then DIN), in every mode."""
        if not self.config.use_mqm:
            return super().forward(batch)
        return self.score(self.user_inputs(batch), self._encode_item(batch, with_query=True), batch)

    @torch.no_grad()
    def meta_report(self, batch: Batch) -> dict[str, float]:
        """How distinct the meta queries are, on ``batch``'s users and items (eval mode; empty without MQM).

        ``meta_mean_cosine``: mean pairwise cosine of the meta vectors; ``meta_used``: how many of them the batch's
        items choose; ``meta_user_spread``: per user, the mean distance of its M user representations from their
        mean, relative to the mean's norm, averaged over users (0: every meta query gives the same user state).
        """
        if not self.config.use_mqm:
            return {}
        was_training = self.training
        self.eval()
        try:
            reps = self._interact_meta(self.user_inputs(batch))  # [B, M, D']
            index = self.selector.index(self._item_key(self.emb.fields(batch, self.sel.item)))
        finally:
            self.train(was_training)
        center = reps.mean(1, keepdim=True)
        spread = (reps - center).norm(dim=-1).mean(1) / center.squeeze(1).norm(dim=-1).clamp_min(1e-12)
        return {
            "meta_mean_cosine": self.selector.mean_pairwise_cosine(),
            "meta_used": float(index.unique().numel()),
            "meta_user_spread": float(spread.mean()),
        }

    def auxiliary_loss(self, batch: Batch, user: State, item: State) -> Tensor | None:
        """``cluster_weight`` x the meta matrix's clustering loss (see :class:`MetaQuerySelector`)."""
        if not self.config.use_mqm or self.config.cluster_weight == 0:
            return None
        key = item["key"] if "key" in item else self._item_key(self.emb.fields(batch, self.sel.item))
        index = item["meta_index"] if "meta_index" in item else self.selector.index(key)
        return self.config.cluster_weight * self.selector.cluster_loss(key, index, self.config.commitment)
