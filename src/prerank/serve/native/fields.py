"""A request's user fields, read from a model's :class:`~prerank.layers.embedding.EmbeddingTables` into
``fields.c``'s layout: one row of :meth:`EmbeddingTables.fields` in C.

Float32 contiguous tables; the user's values as the signature gives them (a categorical int64 ``[1]``, a sequence
int64 ``[1, L]``, a dense float32 ``[1]``, contiguous), else no native form.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prerank.layers.embedding import EmbeddingTables
from prerank.schema import FeatureSpec

CATEGORICAL, SEQUENCE_MEAN, SEQUENCE_SUM, DENSE = 0, 1, 2, 3  # fields.c's kinds
_P, _I = ctypes.c_void_p, ctypes.c_int64


def kind(f: FeatureSpec) -> int:
    """The kind of ``fields.c`` that computes :meth:`EmbeddingTables.field` of ``f`` (a sequence pooled by anything
    but ``sum`` is mean-pooled there)."""
    if f.kind == "dense":
        return DENSE
    if f.kind == "categorical":
        return CATEGORICAL
    return SEQUENCE_SUM if f.pooling == "sum" else SEQUENCE_MEAN


@dataclass(frozen=True, eq=False)
class FieldsPlan:
    """The fields ``names`` bound to their tables for ``fields.c``.

    ``positions``: where each field is in the request's user feature list; ``kinds``, ``rows``: each field's kind and
    table rows (0 for dense). The C arrays ``c_kinds``, ``c_rows`` hold the same, and ``c_tables`` two addresses per
    field, its table (or dense weight) and its dense bias (or 0), of the tensors in ``held`` (detached aliases of the
    parameters' storages, kept alive by the plan). Values changed in place are seen; a replaced table is not.
    """

    names: tuple[str, ...]
    positions: tuple[int, ...]
    kinds: tuple[int, ...]
    rows: tuple[int, ...]
    dim: int
    held: tuple[Tensor, ...]
    c_kinds: ctypes.Array
    c_rows: ctypes.Array
    c_tables: ctypes.Array

    @property
    def args(self) -> tuple[int, int, int, int]:
        """The leading members of every request's ``struct plan``: the C arrays' addresses and the field count."""
        return (*(ctypes.addressof(a) for a in (self.c_kinds, self.c_rows, self.c_tables)), len(self.names))

    def inputs(self, user: Sequence[Tensor]) -> tuple[ctypes.Array, ctypes.Array] | None:
        """The addresses and lengths of the fields' values in ``user`` (one request's user features), or None where
        a value is not what ``fields.c`` reads."""
        inputs: list[int] = []
        lengths: list[int] = []
        for i, k in zip(self.positions, self.kinds, strict=True):
            v = user[i]
            sequence = k in (SEQUENCE_MEAN, SEQUENCE_SUM)
            want = torch.float32 if k == DENSE else torch.int64
            if v.dtype != want or v.dim() != 1 + sequence or v.shape[0] != 1 or not v.is_contiguous():
                return None
            if v.requires_grad or v.device.type != "cpu":
                return None
            inputs.append(v.data_ptr())
            lengths.append(v.shape[-1])
        n = len(inputs)
        return (_P * n)(*inputs), (_I * n)(*lengths)

    def id_error(self, f: int) -> IndexError:
        """The error of an id of field ``f`` outside its table."""
        return IndexError(f"feature {self.names[f]!r}: an id is outside its table [0, {self.rows[f]})")


def fields_plan(emb: EmbeddingTables, names: Sequence[str], user_features: Sequence[str]) -> FieldsPlan | None:
    """The plan of ``emb``'s fields ``names`` (in that order: the model's ``[F, D]`` layout), whose values a request
    passes in ``user_features`` order; None where there are none, one is not in ``user_features``, or a table is not
    a contiguous float32 CPU tensor."""
    if not names or not hasattr(emb, "lookups"):
        return None
    held: list[Tensor] = []
    tables: list[int] = []
    rows: list[int] = []
    kinds: list[int] = []
    for name in names:
        if name not in emb.lookups or name not in user_features:
            return None
        spec, module = emb.lookups[name]
        k = kind(spec)
        weight = module.weight
        bias = module.bias if k == DENSE else None
        if k == DENSE and (not isinstance(module, nn.Linear) or bias is None or weight.shape != (emb.dim, 1)):
            return None
        if k != DENSE and (not isinstance(module, nn.Embedding) or weight.shape[1] != emb.dim):
            return None
        for t in (weight,) if bias is None else (weight, bias):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
                return None
            held.append(t.detach())  # the storage itself: a later `weight.data = ...` must not free it
        tables += (weight.data_ptr(), bias.data_ptr() if bias is not None else 0)
        rows.append(0 if k == DENSE else weight.shape[0])
        kinds.append(k)
    n = len(names)
    positions = tuple(list(user_features).index(name) for name in names)
    c_kinds, c_rows, c_tables = (_I * n)(*kinds), (_I * n)(*rows), (_P * (2 * n))(*tables)
    return FieldsPlan(
        tuple(names), positions, tuple(kinds), tuple(rows), emb.dim, tuple(held), c_kinds, c_rows, c_tables
    )
