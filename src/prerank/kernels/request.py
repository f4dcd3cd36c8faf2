"""A whole served RankTower request in one native call (``rank_tower_request.c``).

A request runs the user's field lookups, its multi-head gated network and the cross-attention kernel. Each is one
native call already (:class:`~prerank.kernels.fields.FieldsPlan`, :class:`~prerank.kernels.mlp.MlpPlan`,
:class:`~prerank.kernels.scorers.RankTowerKernel`), but the Python around the first two, and the check that the
kernel's packed parameters are current, cost about 0.15 ms per request at 5,000 candidates: more than a fifth of the
kernel, as their code and data come back from L3 after the kernel has streamed the item cache through L2.
:class:`RankTowerRequest` binds all three once and makes one call per request. It serves the parameters and the item
cache as they were when it was bound (:meth:`prerank.models.base.PreRanker.bind`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import Tensor

from prerank.data.batch import Batch
from prerank.kernels.fields import FieldsPlan
from prerank.kernels.mlp import MlpPlan
from prerank.kernels.native import function
from prerank.kernels.scorers import RankTowerKernel, row_error

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_HEADERS = ("vec.h", "rows.h", "fields.c", "mlp.c", "rank_tower.c")


class _Plan(ctypes.Structure):
    """``struct plan`` of ``rank_tower_request.c``."""

    _fields_ = [
        ("kind", _P),
        ("table_rows", _P),
        ("tables", _P),
        ("n_fields", _I),
        ("ints", _P),
        ("ptrs", _P),
        ("n_a", _I),
        ("n_b", _I),
        ("width", _I),
        ("fixed", _P),
        ("ri", _P),
        ("qi", _P),
        ("gi", _P),
        ("ki", _P),
        ("vi", _P),
        ("num_rows", _I),
        *((name, _F) for name in ("s_i", "s_u", "eps_i", "eps_u", "inv_tau", "bias")),
    ]


class RankTowerRequest:
    """One user's fields (``fields``) through the gated network (``tower``) into the cross-attention kernel
    (``kernel``), in one call. Built by :func:`rank_tower_request`; it holds the three, so every address it passes
    stays valid while it lives."""

    def __init__(self, fn: Callable[..., int], fields: FieldsPlan, tower: MlpPlan, kernel: RankTowerKernel):
        self._fn, self._parts = fn, (fields, tower, kernel)
        self.fields, self.num_rows = fields, kernel.num_rows
        self._plan = _Plan(
            ctypes.addressof(fields.c_kinds),
            ctypes.addressof(fields.c_rows),
            ctypes.addressof(fields.c_tables),
            len(fields.names),
            ctypes.addressof(tower.c_ints),
            ctypes.addressof(tower.c_ptrs),
            tower.n_a,
            tower.n_b,
            tower.width,
            *kernel.addresses,
            kernel.num_rows,
            *kernel.scalars,
        )

    def __call__(self, user: Batch, rows: Tensor) -> Tensor | None:
        """``[N]`` scores of cache ``rows`` (int64 ``[N]``) for the user of ``user`` (a batch of one row), or None
        where a user value is not of the kernel's form (:meth:`FieldsPlan.inputs`): the caller then runs PyTorch.
        An id outside its table or a row outside the cache raises IndexError naming it."""
        if rows.dim() != 1 or rows.dtype != torch.int64:
            raise ValueError(f"rows must be a 1-d int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
        args = self.fields.inputs(user)
        if args is None:
            return None
        rows = rows.contiguous()
        out = torch.empty(rows.shape[0])
        err = self._fn(ctypes.byref(self._plan), args[0], args[1], rows.data_ptr(), rows.shape[0], out.data_ptr())
        if err > 0:
            raise self.fields.id_error(err - 1)
        if err < 0:
            raise row_error(rows, -1 - err, self.num_rows)
        return out


def rank_tower_request(fields: FieldsPlan, tower: MlpPlan, kernel: RankTowerKernel) -> RankTowerRequest | None:
    """:class:`RankTowerRequest` of the three parts, or None where the native kernel is unavailable. The tower must map
    the fields' ``F * D`` values to the kernel's ``H_u * k`` (ValueError otherwise)."""
    n_in = len(fields.names) * fields.dim
    n_out = kernel.user_heads * kernel.dim
    if (tower.in_dim, tower.out_dim) != (n_in, n_out):
        raise ValueError(f"the user tower maps {tower.in_dim} -> {tower.out_dim} values, the request {n_in} -> {n_out}")
    defines = (*kernel.defines, ("D", fields.dim))
    fn = function("rank_tower_request", defines, (_P, _P, _P, _P, _I, _P), headers=_HEADERS)
    if fn is None:
        return None
    return RankTowerRequest(fn, fields, tower, kernel)
