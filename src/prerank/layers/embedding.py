"""Embedding tables for every feature of a schema."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.schema import FeatureSpec, Schema


class EmbeddingTables(nn.Module):
    """One embedding table per categorical table of the schema, one affine map per dense feature.

    All features share one width ``D`` so that field-wise layers (SENET, bilinear, attention) can
    stack them. Id 0 is padding/unknown and maps to the zero vector. A sequence feature that
    ``shares`` a categorical feature (``hist_item_id`` -> ``item_id``) looks up that table, so a
    behaviour sequence and the target item live in one space (needed by DIN target attention and
    the FM cross of the distilled DSSM).

    Shapes: ``fields`` -> ``[B, F, D]``; ``sequence`` -> ``[B, L, D]`` and mask ``[B, L]``.
    """

    def __init__(self, schema: Schema, dim: int, names: Sequence[str] | None = None, init_std: float = 0.01):
        super().__init__()
        self.schema = schema
        self.dim = dim
        wanted = list(names) if names is not None else schema.names
        self.names = wanted
        tables: dict[str, nn.Embedding] = {}
        dense: dict[str, nn.Linear] = {}
        for name in wanted:
            f = schema[name]
            if f.kind == "dense":
                dense[name] = nn.Linear(1, dim)
            elif f.table not in tables:
                tables[f.table] = nn.Embedding(schema.vocab(name), dim, padding_idx=0)
        self.tables = nn.ModuleDict(tables)
        self.dense = nn.ModuleDict(dense)
        for t in self.tables.values():
            nn.init.normal_(t.weight, std=init_std)
            with torch.no_grad():
                t.weight[0].zero_()
        # dense values start as small as id embeddings: nn.Linear(1, D)'s default U(-1, 1) init would
        # give every dense feature a large random effect that the model must first unlearn
        for lin in self.dense.values():
            nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(lin.bias)
        # per feature, its spec and the module it reads
        self.lookups: dict[str, tuple[FeatureSpec, nn.Module]] = {
            name: (schema[name], self.dense[name] if name in self.dense else self.tables[schema[name].table])
            for name in wanted
        }

    def field(self, batch: Batch, name: str) -> Tensor:
        """One feature as ``[B, D]``; sequences are pooled by their schema ``pooling`` (mean if none).

        A dense value ``x`` maps to ``b + x w`` (its ``nn.Linear(1, D)``).
        """
        f, module = self.lookups[name]
        x = batch.features[name]
        if f.kind == "dense":
            return torch.addcmul(module.bias, x.unsqueeze(-1), module.weight.T)
        emb = F.embedding(x, module.weight, module.padding_idx)
        if f.kind == "categorical":
            return emb
        mask = (x > 0).unsqueeze(-1).to(emb.dtype)
        total = (emb * mask).sum(-2)
        if f.pooling == "sum":
            return total
        return total / mask.sum(-2).clamp_min(1.0)

    def fields(self, batch: Batch, names: Sequence[str]) -> Tensor:
        """Several features stacked as fields ``[B, F, D]``."""
        return torch.stack([self.field(batch, n) for n in names], dim=-2)

    def sequence(self, batch: Batch, name: str) -> tuple[Tensor, Tensor]:
        """An unpooled sequence: embeddings ``[B, L, D]`` and its validity mask ``[B, L]``."""
        x = batch.features[name]
        return self.lookups[name][1](x), x > 0

    def lookup(self, table: str, ids: Tensor) -> Tensor:
        """Raw lookup in a named table (``ids`` of any shape -> ``[..., D]``)."""
        return self.tables[table](ids)
