"""One row of :meth:`prerank.layers.embedding.EmbeddingTables.fields` in one native call (``fields.c``).

A served request encodes one user, and a small user tower spends most of its time in the fixed cost of the
PyTorch calls that look up its fields (several per field), not in arithmetic. :class:`FieldsPlan` does all of
them at once. Float32 tables, contiguous int64 ids, no autograd; None where the native kernel is unavailable.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prerank.data.batch import Batch
from prerank.kernels.native import function

CATEGORICAL, SEQUENCE_MEAN, SEQUENCE_SUM, DENSE = 0, 1, 2, 3
_P, _I = ctypes.c_void_p, ctypes.c_int64
ARGTYPES = (_P, _P, _P, _P, _P, _I, _P)


@dataclass(frozen=True)
class FieldsPlan:
    """The fields ``names`` of one row, bound to their tables for ``fields.c``.

    ``kinds``, ``rows``: each field's kind (this module's constants) and table rows (0 for dense). The C arrays
    ``c_kinds``, ``c_rows`` hold the same, and ``c_tables`` two addresses per field: its table (or dense weight) and
    its dense bias (or 0), of the storages in ``held``, which the plan keeps alive. Values changed in place are seen; a
    replaced table is not (build a new plan).
    """

    names: tuple[str, ...]
    kinds: tuple[int, ...]
    rows: tuple[int, ...]
    dim: int
    held: tuple[Tensor, ...]
    c_kinds: ctypes.Array
    c_rows: ctypes.Array
    c_tables: ctypes.Array

    @classmethod
    def build(
        cls,
        names: Sequence[str],
        kinds: Sequence[int],
        modules: Sequence[torch.nn.Module],
        dim: int,
        *,
        keep: bool = True,
    ) -> FieldsPlan | None:
        """The plan of these fields (``modules``: each field's ``nn.Embedding`` or dense ``nn.Linear(1, dim)``), or
        None where there are none or a table is not a contiguous float32 tensor.

        ``keep``: hold each table's storage (a detached alias), so that a plan kept across requests stays valid after
        ``weight.data = ...``. A plan used at once and dropped (``keep=False``) holds the parameters themselves,
        which spares a detach per table on every request."""
        held: list[Tensor] = []
        tables: list[int] = []
        rows: list[int] = []
        for kind, module in zip(kinds, modules, strict=True):
            params = module._parameters  # not the module's attributes: several times faster
            weight = params["weight"]
            if weight.dtype != torch.float32 or not weight.is_contiguous():
                return None
            held += (weight, params["bias"]) if kind == DENSE else (weight,)
            tables += (weight.data_ptr(), params["bias"].data_ptr() if kind == DENSE else 0)
            rows.append(0 if kind == DENSE else weight.shape[0])
        n = len(rows)
        if n == 0:
            return None
        if keep:  # the storages themselves: a later `weight.data = ...` must not free them
            held = [t.detach() for t in held]
        c_kinds, c_rows, c_tables = (_I * n)(*kinds), (_I * n)(*rows), (_P * (2 * n))(*tables)
        return cls(tuple(names), tuple(kinds), tuple(rows), dim, tuple(held), c_kinds, c_rows, c_tables)

    def inputs(self, batch: Batch) -> tuple[ctypes.Array, ctypes.Array] | None:
        """The addresses and lengths of ``batch``'s values of the fields (a batch of one row), or None where a value
        is not what ``fields.c`` reads (a categorical int64 ``[1]``, a sequence int64 ``[1, L]``, a dense float32
        ``[1]``; contiguous)."""
        inputs: list[int] = []
        lengths: list[int] = []
        for name, kind in zip(self.names, self.kinds, strict=True):
            v = batch.features[name]
            sequence = kind in (SEQUENCE_MEAN, SEQUENCE_SUM)
            want = torch.float32 if kind == DENSE else torch.int64
            if v.dtype != want or v.dim() != 1 + sequence or v.shape[0] != 1 or not v.is_contiguous():
                return None
            inputs.append(v.data_ptr())
            lengths.append(v.shape[-1])
        n = len(inputs)
        return (_P * n)(*inputs), (_I * n)(*lengths)

    def run(self, batch: Batch) -> Tensor | None:
        """``[1, F, dim]`` embeddings of the fields of ``batch`` (one row), or None (no native kernel, or a value
        :meth:`inputs` does not take). An id outside its table raises IndexError naming the feature."""
        args = self.inputs(batch)
        fn = function("fields", (("EMB", self.dim),), ARGTYPES, headers=()) if args is not None else None
        if args is None or fn is None:
            return None
        n = len(self.names)
        out = torch.empty(1, n, self.dim)
        err = fn(self.c_kinds, self.c_rows, args[1], self.c_tables, args[0], n, out.data_ptr())
        if err:
            raise self.id_error(-1 - err)
        return out

    def id_error(self, f: int) -> IndexError:
        """The error of an id of field ``f`` outside its table."""
        return IndexError(f"feature {self.names[f]!r}: an id is outside its table [0, {self.rows[f]})")
