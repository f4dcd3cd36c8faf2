"""One row of :meth:`prerank.layers.embedding.EmbeddingTables.fields` in one native call (``fields.c``).

A served request encodes one user, and a small user tower spends most of its time in the fixed cost of the
PyTorch calls that look up its fields (several per field), not in arithmetic. :func:`fields_row` does all of
them at once. Float32 tables, contiguous int64 ids, no autograd; None where the native kernel is unavailable.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from prerank.kernels.native import function

CATEGORICAL, SEQUENCE_MEAN, SEQUENCE_SUM, DENSE = 0, 1, 2, 3
_P, _I = ctypes.c_void_p, ctypes.c_int64


def fields_row(
    names: tuple[str, ...],
    kinds: Tensor,
    rows: Tensor,
    lengths: list[int],
    tables: list[int],
    inputs: list[int],
    dim: int,
) -> Tensor | None:
    """``[1, F, dim]`` embeddings of the fields ``names`` of one row, or None (no native kernel).

    ``kinds``, ``rows`` (int64 ``[F]``): each field's kind (this module's constants) and table rows; ``lengths``:
    each field's number of ids (1 for categorical); ``tables``: two addresses per field, its table (or dense
    weight) and its dense bias (or 0); ``inputs``: each field's contiguous int64 ids, or its float32 dense value.
    An id outside its table raises IndexError naming the feature.
    """
    fn = function("fields", (("D", dim),), (_P, _P, _P, _P, _P, _I, _P), headers=())
    if fn is None:
        return None
    n = len(names)
    out = torch.empty(1, n, dim)
    args = (_I * n)(*lengths), (_P * (2 * n))(*tables), (_P * n)(*inputs)
    err = fn(kinds.data_ptr(), rows.data_ptr(), *args, n, out.data_ptr())
    if err:
        f = -1 - err
        raise IndexError(f"feature {names[f]!r}: an id is outside its table [0, {int(rows[f])})")
    return out
