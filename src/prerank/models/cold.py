"""COLD: an interaction-focused pre-ranker, an SE block over every field followed by an MLP.

Wang et al., "COLD: Towards the Next Generation of Pre-Ranking System" (DLP-KDD 2020, arXiv:2007.16122),
Sec. 4.1 "Design of the deep pre-ranking model": the embeddings of all feature groups (user, ad and
user-ad cross features) are re-weighted by an SE block, whose weights also rank the feature groups
for feature selection, and fed to fully connected layers; Sec. 4.2 makes it fast enough to serve.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.layers.embedding import EmbeddingTables
from prerank.layers.field import SENET, FieldProjection, squeeze
from prerank.layers.mlp import MLP
from prerank.models.base import ConfigError, FeatureSelection, PreRanker, State, broadcast_rows, cross_fields
from prerank.schema import Schema


@dataclass(frozen=True)
class COLDConfig:
    """``hidden`` are the MLP widths; the first one is the layer split between user, item and pair.

    The paper's online model is a 7-layer MLP over hundreds of feature groups on GPUs; the default
    here is three layers sized for CPU, configurable. ``se_block`` picks the SE reading (see :class:`COLD`).
    """

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.0
    se_block: Literal["linear", "squeeze"] = "linear"
    reduction_ratio: int = 3
    features: tuple[str, ...] | None = None
    use_cross: bool = True


class COLD(PreRanker):
    """``logit = MLP(relu(sum_f s_f W_f e_f + b_1))`` with SE field weights ``s`` ``[B, F]``.

    SE block (paper Sec. 4.1: ``s = sigmoid(W [e_1, ..., e_M] + b)``, ``v_i = s_i e_i``). The paper gives
    ``W`` the shape ``k x M`` (k the embedding width, M the number of feature groups) and says each
    ``e_i`` is compressed to the scalar ``s_i``, while writing ``W`` against the concatenation of all
    groups. ``se_block="linear"`` (default) takes the formula literally: one linear map from all
    concatenated field embeddings ``[B, F*D]`` to ``F`` gates and a sigmoid, so every gate sees every
    field. ``se_block="squeeze"`` is the squeeze-and-excitation of Hu et al. that COLD names
    (mean over D, FC, ReLU, FC, sigmoid; the form the public IntTower repository uses for its COLD
    baseline). Both give one weight per field in (0, 1) and both split exactly as below.

    Serving split (DESIGN.md, first-layer split). With ``v_f = s_f e_f`` the first layer is
    ``W_1 [v_1; ...; v_F] = sum_f s_f (W_{1,f} e_f)``. The user fields' projections ``W_{1,f} e_f`` do
    not depend on the gates, so they are computed once per request and the user part is one
    ``[N, F_u] x [F_u, H1]`` matmul over all candidates. The item and cross fields are re-weighted per
    candidate and go through their block of ``W_1`` as one ``[N, (F_i + F_c) D] x [(F_i + F_c) D, H1]``
    matmul (the item fields are cached as ``D``-wide embeddings, not as their ``F_i x H1`` projections,
    which would be ``H1 / D`` times larger). The gates are split too: the linear SE is a sum of
    per-field terms (user part, item part, pair part), the squeeze SE needs only the ``F`` squeezed
    scalars. This is exact: ``score(encode_user, encode_item)`` equals scoring the concatenated
    re-weighted fields with the unsplit first layer.

    Cached per user (state ``[1, ...]``): ``proj`` ``[F_u, H1]`` and ``gate`` (``[F]`` partial SE
    pre-activation, or ``[F_u]`` squeezed scalars). Per item: ``fields`` ``[F_i, D]`` and ``gate``
    (``[F]`` or ``[F_i]``). Per candidate: embed the cross fields and add their SE part, the ``F``
    gates, the re-weighted item and cross fields through the first layer (``(F_i + F_c) x D x H1``),
    the user part (``F_u x H1``) and the MLP after the first layer.
    Cross features take part (they come per candidate in ``pair``); F = F_u + F_i + F_c.
    """

    def __init__(self, schema: Schema, config: COLDConfig = COLDConfig()):
        super().__init__(schema)
        if not config.hidden or min(config.hidden) < 1:
            raise ConfigError(f"COLD needs at least one positive hidden width, got hidden={config.hidden}")
        if config.se_block not in ("linear", "squeeze"):
            raise ConfigError(f"se_block must be 'linear' or 'squeeze', got {config.se_block!r}")
        if not 0.0 <= config.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {config.dropout}")
        self.config = config
        self.sel = FeatureSelection.resolve(schema, config.features, use_cross=config.use_cross)
        self.names = self.sel.user + self.sel.item + self.sel.cross
        d, h1, n_fields = config.embedding_dim, config.hidden[0], len(self.names)
        self.emb = EmbeddingTables(schema, d, self.names)
        if config.se_block == "linear":
            self.gate = FieldProjection(n_fields, d, n_fields)
            self.gate_bias = nn.Parameter(torch.zeros(n_fields))
        else:
            self.senet = SENET(n_fields, config.reduction_ratio)
        self.first = FieldProjection(n_fields, d, h1)
        self.first_bias = nn.Parameter(torch.zeros(h1))
        self.dropout = nn.Dropout(config.dropout)
        self.head = MLP(h1, config.hidden[1:], out_dim=1, dropout=config.dropout, activation=nn.ReLU)
        self._offsets = {"user": 0, "item": len(self.sel.user), "cross": len(self.sel.user) + len(self.sel.item)}

    def _gate_part(self, fields: Tensor, side: str) -> Tensor:
        """The side's part of the SE input: linear SE its partial pre-activation ``[B, F]``, squeeze SE
        its squeezed fields ``[B, F_s]``."""
        if self.config.se_block == "linear":
            return self.gate.summed(fields, self._offsets[side])
        return squeeze(fields)

    def encode_user(self, batch: Batch) -> State:
        fields = self.emb.fields(batch, self.sel.user)
        return {"proj": self.first(fields), "gate": self._gate_part(fields, "user")}

    def encode_item(self, batch: Batch) -> State:
        fields = self.emb.fields(batch, self.sel.item)
        return {"fields": fields, "gate": self._gate_part(fields, "item")}

    def _cross(self, pair: Batch | None, n: int) -> Tensor:
        return cross_fields(self.emb, pair, self.sel.cross, n, self.config.embedding_dim)

    def _weights(self, user: State, item: State, cross: Tensor) -> Tensor:
        """SE field weights ``[N, F]`` in (0, 1), fields in the order user, item, cross."""
        if self.config.se_block == "linear":
            cached = user["gate"] + item["gate"] + self.gate_bias
            if not self.sel.cross:  # a [N, 0] reshape is no valid ONNX Reshape: skip the empty cross part
                return torch.sigmoid(cached)
            return torch.sigmoid(self.gate.summed(cross, self._offsets["cross"], cached))
        z = torch.cat([broadcast_rows(user["gate"], cross.shape[0]), item["gate"], squeeze(cross)], dim=-1)
        return self.senet.excite(z)

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        """Logits ``[N]``: ``MLP(relu(b_1 + sum_f s_f W_{1,f} e_f))`` with the user fields' ``W_{1,f} e_f``
        (``proj`` ``[1 or N, F_u, H1]``) taken from the user state."""
        fields = item["fields"]
        cross = self._cross(pair, fields.shape[0])
        s = self._weights(user, item, cross)  # [N, F]
        proj = user["proj"]
        f_u = proj.shape[1]
        # b_1 + sum_f s_f W_{1,f} e_f over the item and cross fields
        v = torch.cat([fields, cross], dim=1) * s[:, f_u:, None]
        h = self.first.summed(v, f_u, self.first_bias)
        # + sum_f s_f P_f over the user fields (one user state broadcasts over the N candidates)
        s_u = s[:, :f_u]
        h = h + (s_u @ proj[0] if proj.shape[0] == 1 else torch.einsum("nf,nfh->nh", s_u, proj))
        h = self.dropout(torch.relu(h))
        return self.head(h).squeeze(-1)

    def field_weights(self, batch: Batch) -> Tensor:
        """SE weights ``[B, F]`` of a row batch, fields in the order of :attr:`names`."""
        return self._weights(self.encode_user(batch), self.encode_item(batch), self._cross(batch, len(batch)))

    @torch.no_grad()
    def feature_importance(self, batches: Batch | Iterable[Batch]) -> dict[str, float]:
        """Mean SE weight per feature over the rows of a batch or of every batch of a loader.

        COLD ranks feature groups by this to choose the online feature set (paper Sec. 4.1).
        """
        total = torch.zeros(len(self.names), dtype=torch.float64)
        rows = 0
        for batch in [batches] if isinstance(batches, Batch) else batches:
            w = self.field_weights(batch)
            total += w.sum(0).double()
            rows += w.shape[0]
        if rows == 0:
            raise ValueError("feature_importance needs at least one row")
        return {name: float(v) for name, v in zip(self.names, total / rows, strict=True)}
