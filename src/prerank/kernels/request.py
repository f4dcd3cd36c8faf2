"""A whole served request in one native call: RankTower's (``rank_tower_request.c``) and IntTower's
(``int_tower_request.c``); and FIT's user side in one (``fit_user.c``, :class:`FitUser`).

A request runs the user's field lookups, its user tower and the kernel over the cached items. Each of RankTower's is
one native call already (:class:`~prerank.kernels.fields.FieldsPlan`, :class:`~prerank.kernels.mlp.MlpPlan`,
:class:`~prerank.kernels.scorers.RankTowerKernel`), but the Python around the first two, and the check that the
kernel's packed parameters are current, cost about 0.15 ms per request at 5,000 candidates: a quarter of the kernel, as
their code and data come back from L3 after the kernel has streamed the item cache through L2. IntTower's tower
(Light-SE, three layers and a head projection per layer) is about 50 small PyTorch calls, and FIT's (DIN of 16 meta
vectors, the user tower and the scorer's user part for each) about 25. :class:`NativeRequest` and :class:`FitUser`
bind everything once and make one call per request. They serve the parameters and the item cache as they were when
they were bound (:meth:`prerank.models.base.PreRanker.bind`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from prerank.data.batch import Batch
from prerank.kernels.fields import FieldsPlan
from prerank.kernels.mlp import RELU, Layer, MlpPlan, affine_arrays, check_chain
from prerank.kernels.native import function
from prerank.kernels.scorers import RankTowerKernel, row_error, sum_max_block_defines

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_ARGTYPES = (_P, _P, _P, _P, _I, _P)  # plan, inputs, lengths, rows, n, out
_FIELDS = [("kind", _P), ("table_rows", _P), ("tables", _P), ("n_fields", _I)]  # every plan starts with these


class _RankTowerPlan(ctypes.Structure):
    """``struct plan`` of ``rank_tower_request.c``."""

    _fields_ = [
        *_FIELDS,
        *((name, _P) for name in ("ints", "ptrs")),
        *((name, _I) for name in ("n_a", "n_b", "width")),
        *((name, _P) for name in ("fixed", "ri", "qi", "gi", "ki", "vi")),
        ("num_rows", _I),
        *((name, _F) for name in ("s_i", "s_u", "eps_i", "eps_u", "inv_tau", "bias")),
    ]


class _IntTowerPlan(ctypes.Structure):
    """``struct plan`` of ``int_tower_request.c``."""

    _fields_ = [
        *_FIELDS,
        *((name, _P) for name in ("se_w", "se_b", "ints", "ptrs")),
        *((name, _I) for name in ("n_layers", "width")),
        ("cache", _P),
        ("num_rows", _I),
        ("bias", _F),
    ]


class _FitUserPlan(ctypes.Structure):
    """``struct plan`` of ``fit_user.c``."""

    _fields_ = [
        *_FIELDS,
        *((name, _P) for name in ("fold_w", "fold_b", "meta")),
        *((name, _I) for name in ("m", "h1", "normalize")),
        *((name, _P) for name in ("unit_ints", "unit_ptrs")),
        ("n_unit", _I),
        *((name, _P) for name in ("tower_ints", "tower_ptrs")),
        *((name, _I) for name in ("n_tower", "width", "out_dim")),
    ]


class NativeRequest:
    """One user's fields (``fields``) through a user tower into a kernel over the cached items, in one call of ``fn``
    with ``plan`` (a ``struct plan``). It holds ``parts``, every tensor whose address the plan holds, so those stay
    valid while it lives. Built by :func:`rank_tower_request` and :func:`int_tower_request`."""

    def __init__(
        self,
        fn: Callable[..., int],
        fields: FieldsPlan,
        plan: ctypes.Structure,
        num_rows: int,
        parts: tuple[object, ...],
    ) -> None:
        self._fn, self._plan, self._parts = fn, plan, parts
        self.fields, self.num_rows = fields, num_rows

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


def _fields_args(fields: FieldsPlan) -> tuple[int, ...]:
    """The leading ``struct plan`` members: the fields' C arrays and count."""
    arrays = (fields.c_kinds, fields.c_rows, fields.c_tables)
    return (*(ctypes.addressof(a) for a in arrays), len(fields.names))


def rank_tower_request(fields: FieldsPlan, tower: MlpPlan, kernel: RankTowerKernel) -> NativeRequest | None:
    """RankTower's request: ``fields`` (the user's), ``tower`` (its multi-head gated network, Eq. 1) and ``kernel``
    (Eq. 3-8 over the item cache); None where the native kernel is unavailable. The tower must map the fields'
    ``F * D`` values to the kernel's ``H_u * k`` (ValueError otherwise)."""
    n_in, n_out = len(fields.names) * fields.dim, kernel.user_heads * kernel.dim
    if (tower.in_dim, tower.out_dim) != (n_in, n_out):
        raise ValueError(f"the user tower maps {tower.in_dim} -> {tower.out_dim} values, the request {n_in} -> {n_out}")
    defines = (*kernel.defines, ("EMB", fields.dim))
    headers = ("vec.h", "rows.h", "fields.c", "mlp.c", "rank_tower.c")
    fn = function("rank_tower_request", defines, _ARGTYPES, headers=headers)
    if fn is None:
        return None
    plan = _RankTowerPlan(
        *_fields_args(fields),
        *(ctypes.addressof(a) for a in (tower.c_ints, tower.c_ptrs)),
        tower.n_a,
        tower.n_b,
        tower.width,
        *kernel.addresses,
        kernel.num_rows,
        *kernel.scalars,
    )
    return NativeRequest(fn, fields, plan, kernel.num_rows, (fields, tower, kernel))


def int_tower_request(
    fields: FieldsPlan,
    se: tuple[Tensor, Tensor],
    layers: Sequence[Layer],
    projections: Sequence[Layer],
    cache: Tensor,
    bias: float,
) -> NativeRequest | None:
    """IntTower's request: ``fields`` (the user's) through Light-SE (``se``: its linear map's ``[F, F]`` weight and
    ``[F]`` bias), the tower's ``layers`` (ReLU each), each layer's output through its head projection (``projections``,
    to ``H_u * d`` each), and the sum-max kernel of those ``L * H_u`` heads against the item heads ``cache``
    ``[R, H_i, d]`` plus ``bias``. None where a part has no native form (not float32, item rows too wide for
    ``sum_max_block.c``) or the native kernel is unavailable; widths that do not fit raise ValueError."""
    n_fields, dim = len(fields.names), cache.shape[2]
    if se[0].shape != (n_fields, n_fields) or se[1].shape != (n_fields,):
        got = [tuple(t.shape) for t in se]
        raise ValueError(f"Light-SE must be [{n_fields}, {n_fields}] and [{n_fields}], got {got}")
    if not layers or len(projections) != len(layers):
        raise ValueError(f"one projection per tower layer, got {len(projections)} for {len(layers)}")
    check_chain(n_fields * fields.dim, layers)
    for layer, proj in zip(layers, projections, strict=True):
        check_chain(layer[0].shape[0], [proj])
    sizes = {proj[0].shape[0] for proj in projections}
    if len(sizes) != 1 or next(iter(sizes)) % dim:
        raise ValueError(f"every projection must give the same whole heads of {dim} values, got widths {sorted(sizes)}")
    heads = len(layers) * projections[0][0].shape[0] // dim
    defines = sum_max_block_defines(heads, cache)
    arrays = affine_arrays([*((w, b, RELU) for w, b, _ in layers), *projections])
    se = tuple(t.detach().contiguous() for t in se)
    if defines is None or arrays is None or any(t.dtype != torch.float32 for t in se):
        return None
    headers = ("vec.h", "rows.h", "fields.c", "mlp.c", "sum_max_block.c")
    fn = function("int_tower_request", (*defines, ("EMB", fields.dim)), _ARGTYPES, headers=headers)
    if fn is None:
        return None
    held, c_ints, c_ptrs = arrays
    cache = cache.detach().contiguous()
    width = max(w.shape[0] for w, _, _ in layers)
    plan = _IntTowerPlan(
        *_fields_args(fields),
        *(t.data_ptr() for t in se),
        *(ctypes.addressof(a) for a in (c_ints, c_ptrs)),
        len(layers),
        width,
        cache.data_ptr(),
        cache.shape[0],
        bias,
    )
    return NativeRequest(fn, fields, plan, cache.shape[0], (fields, se, held, c_ints, c_ptrs, cache))


class FitUser:
    """FIT's user state for every meta vector, ``[M, out_dim]``, of one user in one call (``fit_user.c``). Built by
    :func:`fit_user`; it holds every tensor whose address its plan holds."""

    def __init__(self, fn: Callable[..., int], fields: FieldsPlan, plan: ctypes.Structure, parts: tuple[object, ...]):
        self._fn, self._plan, self._parts, self.fields = fn, plan, parts, fields
        self.shape = (plan.m, plan.out_dim)

    def __call__(self, user: Batch) -> Tensor | None:
        """The state of the user of ``user`` (a batch of one row), or None where a user value is not of the kernel's
        form (:meth:`FieldsPlan.inputs`). An id outside its table raises IndexError naming the feature."""
        args = self.fields.inputs(user)
        if args is None:
            return None
        out = torch.empty(self.shape)
        err = self._fn(ctypes.byref(self._plan), args[0], args[1], out.data_ptr())
        if err:
            raise self.fields.id_error(err - 1)
        return out


def fit_user(
    fields: FieldsPlan,
    fold: tuple[Tensor, Tensor],
    meta: Tensor,
    unit: Sequence[Layer],
    normalize: bool,
    tower: Sequence[Layer],
) -> FitUser | None:
    """FIT's user side with the MQM for a user whose DIN keys are its fields: DIN's activation unit, its first layer
    folded with the meta vectors ``meta`` ``[M, D]`` (``fold``: ``[D, M * H1]`` and ``[M * H1]``,
    :meth:`prerank.layers.attention.DINAttention.fold_queries`) and followed by a sigmoid, then ``unit`` (the unit's
    other layers, down to one weight), softmax-normalised over the keys if ``normalize``; then ``tower`` (the user MLP
    and the scorer's user part) for each meta vector. None where a part is not float32 or the native kernel is
    unavailable; widths that do not fit raise ValueError."""
    n_fields, dim = len(fields.names), fields.dim
    m = meta.shape[0]
    if meta.shape != (m, dim) or fold[0].dim() != 2 or fold[0].shape[0] != dim or fold[0].shape[1] % max(m, 1):
        raise ValueError(
            f"meta [M, {dim}] and a folded layer [{dim}, M * H1] do not fit: {tuple(meta.shape)}, "
            f"{tuple(fold[0].shape)}"
        )
    h1 = fold[0].shape[1] // m
    if fold[1].shape != (m * h1,):
        raise ValueError(f"the folded bias must be [{m * h1}], got {tuple(fold[1].shape)}")
    if check_chain(h1, unit) != 1 or not tower:
        raise ValueError("DIN's activation unit must end in one weight, and the tower needs a layer")
    out_dim = check_chain((n_fields + 2) * dim, tower)
    unit_arrays, tower_arrays = affine_arrays(unit), affine_arrays(tower)
    dense = tuple(t.detach().contiguous() for t in (*fold, meta))
    if unit_arrays is None or tower_arrays is None or any(t.dtype != torch.float32 for t in dense):
        return None
    fn = function(
        "fit_user", (("EMB", dim), ("W", 16)), (_P, _P, _P, _P), headers=("vec.h", "rows.h", "fields.c", "mlp.c")
    )
    if fn is None:
        return None
    width = max(h1, *(w.shape[0] for w, _, _ in (*unit, *tower)))
    plan = _FitUserPlan(
        *_fields_args(fields),
        *(t.data_ptr() for t in dense),
        m,
        h1,
        int(normalize),
        *(ctypes.addressof(a) for a in unit_arrays[1:]),
        len(unit),
        *(ctypes.addressof(a) for a in tower_arrays[1:]),
        len(tower),
        width,
        out_dim,
    )
    return FitUser(fn, fields, plan, (fields, dense, unit_arrays, tower_arrays))
