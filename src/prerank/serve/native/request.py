"""IntTower's and RankTower's whole served request in one native call (``int_tower_request.c``,
``rank_tower_request.c``), bound from the pure-PyTorch model's modules and parameters.

A request runs the user's field lookups (``fields.c``), the user tower (``mlp.c``) and a kernel over the cached item
rows (``sum_max_block.c`` for IntTower's FE-Block, ``rank_tower.c`` for RankTower's gated cross-attention and
maximum similarity), one candidate per vector lane. In PyTorch the user's side alone is 25-50 small operator calls.

Binding has two steps. :func:`int_tower_plan` / :func:`rank_tower_plan` read the model (None where a part's
structure is not what the kernels compute: the caller serves the model in PyTorch); :meth:`ModelPlan.bind` then
binds that plan to one item cache (None where the cache is not of the kernel's form) and compiles the kernel for its
shapes (:class:`~prerank.serve.native.build.NativeUnavailable` where it cannot).

What is read, and when: the embedding tables and tower weights are read in place (detached aliases of their
storages, so in-place changes are seen and replaced parameters are not); the biases, the temperature and RankTower's
packed cross-attention parameters are copies made when the plan is read; the item cache is read in place.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prerank.serve.native.build import Defines, block_lanes, function
from prerank.serve.native.fields import FieldsPlan, fields_plan
from prerank.serve.native.mlp import NONE, RELU, AffineArrays, Layer, affine_arrays, check_chain, linear_layer
from prerank.serve.native.mlp import sequential_layers as _sequential

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
ARGTYPES = (_P, _P, _P, _P, _I, _P)  # plan, inputs, lengths, rows, n, out
_FIELDS = [("kind", _P), ("table_rows", _P), ("tables", _P), ("n_fields", _I)]  # every plan starts with these
CACHE_DTYPES = (torch.float32, torch.bfloat16)  # what the block kernels read (vec.h's elem_t)
MAX_ITEM_HEADS = 16  # sum_max_block.c keeps HB x HV accumulators in registers
MAX_ITEM_ROW = 512  # floats per item row: a transposed block of 16 rows then takes 32 KiB of L1
MIN_CHUNK = 1024  # candidates per thread below which a request is not split (measured: a split paid from 2-5k)


class _RankTowerStruct(ctypes.Structure):
    """``struct plan`` of ``rank_tower_request.c``."""

    _fields_ = [
        *_FIELDS,
        *((name, _P) for name in ("ints", "ptrs")),
        *((name, _I) for name in ("n_a", "n_b", "width")),
        *((name, _P) for name in ("fixed", "ri", "qi", "gi", "ki", "vi")),
        ("num_rows", _I),
        *((name, _F) for name in ("s_i", "s_u", "eps_i", "eps_u", "inv_tau", "bias")),
    ]


class _IntTowerStruct(ctypes.Structure):
    """``struct plan`` of ``int_tower_request.c``."""

    _fields_ = [
        *_FIELDS,
        *((name, _P) for name in ("se_w", "se_b", "ints", "ptrs")),
        *((name, _I) for name in ("n_layers", "width")),
        ("cache", _P),
        ("num_rows", _I),
        ("bias", _F),
    ]


class BoundRequest:
    """One model's request bound to one item cache: ``fn`` (the compiled ``<model>_request``) with ``plan`` (its
    ``struct plan``). It holds ``parts``, every object whose address the plan holds, so those stay valid while it
    lives."""

    def __init__(
        self, fn: Callable[..., int], fields: FieldsPlan, plan: ctypes.Structure, num_rows: int, parts: tuple
    ) -> None:
        self._fn, self._plan, self._parts = fn, plan, parts
        self.fields, self.num_rows = fields, num_rows

    def __call__(
        self, user: Sequence[Tensor], rows: Tensor, pool: Executor | None = None, threads: int = 1
    ) -> Tensor | None:
        """``[N]`` logits of cache ``rows`` (int64 ``[N]``) for one request's user features ``user`` (signature
        order), or None where an input is not of the kernel's form (the caller then runs PyTorch). With ``pool``,
        requests of at least ``2 * MIN_CHUNK`` candidates are split over up to ``threads`` concurrent calls.
        An id outside its table or a row outside the cache raises IndexError naming it."""
        if rows.dim() != 1 or rows.dtype != torch.int64 or rows.device.type != "cpu" or rows.requires_grad:
            return None
        args = self.fields.inputs(user)
        if args is None:
            return None
        rows = rows.contiguous()
        n = rows.shape[0]
        out = torch.empty(n)
        plan, r0, o0 = ctypes.byref(self._plan), rows.data_ptr(), out.data_ptr()
        parts = min(threads, n // MIN_CHUNK) if pool is not None else 1
        if parts <= 1:
            self._check(self._fn(plan, args[0], args[1], r0, n, o0), rows, 0)
            return out
        step = (-(-n // parts) + 15) // 16 * 16  # whole blocks of 16 candidates per call
        starts = range(step, n, step)  # the calling thread scores the first part itself
        futures = [
            pool.submit(self._fn, plan, args[0], args[1], r0 + 8 * s, min(step, n - s), o0 + 4 * s) for s in starts
        ]
        first = self._fn(plan, args[0], args[1], r0, step, o0)
        errors = [(first, 0), *((f.result(), s) for s, f in zip(starts, futures, strict=True))]  # all done first
        for err, s in errors:
            self._check(err, rows, s)
        return out

    def _check(self, err: int, rows: Tensor, start: int) -> None:
        """Raise the error a call reported (``start``: its first candidate)."""
        if err > 0:
            raise self.fields.id_error(err - 1)
        if err < 0:
            i = start - 1 - err
            raise IndexError(f"candidate {i}: row {int(rows[i])} outside [0, {self.num_rows})")


def _item_tensor(t: Tensor | None) -> Tensor | None:
    """A cache tensor the kernels can read (a contiguous CPU float32 or bfloat16 one), or None."""
    if not isinstance(t, Tensor) or t.dtype not in CACHE_DTYPES or t.device.type != "cpu":
        return None
    return t.detach().contiguous()


class ModelPlan:
    """A model's parameters read for its native request; :meth:`bind` ties them to an item cache."""

    kernel: str
    item_keys: tuple[str, ...]

    def bind(self, cache: dict[str, Tensor]) -> BoundRequest | None:
        raise NotImplementedError

    def warm(self) -> None:
        """Compile (or load) the kernel for a float32 cache of the model's configured shape; NativeUnavailable where
        that fails."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class IntTowerPlan(ModelPlan):
    """IntTower (:mod:`prerank.models.int_tower`): the user's fields, Light-SE (``se``: its linear map's ``[F, F]``
    weight and ``[F]`` bias), the tower's ``L`` layers (a ReLU each) and each layer's head projection to
    ``user_heads`` heads of ``head_dim`` (``arrays``: the tower's layers, then the projections), and the logit's
    ``bias``."""

    fields: FieldsPlan
    se: tuple[Tensor, Tensor]
    arrays: AffineArrays
    n_layers: int
    heads: int  # L * user_heads
    head_dim: int
    item_heads: int
    bias: float

    kernel = "int_tower_request"
    item_keys = ("heads",)

    def defines(self, item_heads: int, dtype: torch.dtype) -> Defines | None:
        if item_heads > MAX_ITEM_HEADS or item_heads * self.head_dim > MAX_ITEM_ROW or dtype not in CACHE_DTYPES:
            return None
        per_pass = 2 if self.heads % 2 == 0 and item_heads <= 8 else 1
        shape = (("H", self.heads), ("HV", item_heads), ("D", self.head_dim), ("W", block_lanes()), ("HB", per_pass))
        return (*shape, ("BF16", int(dtype == torch.bfloat16)), ("EMB", self.fields.dim))

    def _function(self, defines: Defines) -> Callable[..., int]:
        headers = ("vec.h", "rows.h", "fields.c", "mlp.c", "sum_max_block.c")
        return function(self.kernel, defines, ARGTYPES, headers)

    def warm(self) -> None:
        self._function(self.defines(self.item_heads, torch.float32))

    def bind(self, cache: dict[str, Tensor]) -> BoundRequest | None:
        heads = _item_tensor(cache.get("heads"))
        if heads is None or heads.dim() != 3 or heads.shape[2] != self.head_dim:
            return None
        defines = self.defines(heads.shape[1], heads.dtype)
        if defines is None:
            return None
        fn = self._function(defines)
        plan = _IntTowerStruct(
            *self.fields.args,
            *(t.data_ptr() for t in self.se),
            *self.arrays.addresses,
            self.n_layers,
            self.arrays.width,
            heads.data_ptr(),
            heads.shape[0],
            self.bias,
        )
        return BoundRequest(fn, self.fields, plan, heads.shape[0], (self, heads))


@dataclass(frozen=True, eq=False)
class RankTowerPlan(ModelPlan):
    """RankTower (:mod:`prerank.models.rank_tower`) with one cross layer: the user's fields, its multi-head gated
    network (``arrays``: ``n_a`` layers of the MLP, then ``n_b`` of the gate) and ``rank_tower.c``'s
    user-independent parameters (``fixed``, packed) and six scalars."""

    fields: FieldsPlan
    arrays: AffineArrays
    n_a: int
    n_b: int
    fixed: Tensor
    scalars: tuple[float, ...]  # s_i, s_u, eps_i, eps_u, inv_tau, bias
    user_heads: int
    item_heads: int
    dim: int  # k
    attention_dim: int  # d_k
    value_dim: int  # d_v

    kernel = "rank_tower_request"
    item_keys = ("r", "q", "g", "k", "v")

    def defines(self, item_heads: int, dtype: torch.dtype) -> Defines:
        shape = (("HU", self.user_heads), ("HI", item_heads), ("K", self.dim))
        shape += (("DK", self.attention_dim), ("DV", self.value_dim), ("W", block_lanes()))
        return (*shape, ("BF16", int(dtype == torch.bfloat16)), ("EMB", self.fields.dim))

    def _function(self, defines: Defines) -> Callable[..., int]:
        headers = ("vec.h", "rows.h", "fields.c", "mlp.c", "rank_tower.c")
        return function(self.kernel, defines, ARGTYPES, headers)

    def warm(self) -> None:
        self._function(self.defines(self.item_heads, torch.float32))

    def bind(self, cache: dict[str, Tensor]) -> BoundRequest | None:
        items = [_item_tensor(cache.get(key)) for key in self.item_keys]
        if any(t is None or t.dim() != 3 for t in items) or len({t.dtype for t in items}) != 1:
            return None
        num_rows, hi = items[0].shape[:2]
        widths = (self.dim, self.attention_dim, self.value_dim, self.attention_dim, self.value_dim)
        if any(t.shape != (num_rows, hi, w) for t, w in zip(items, widths, strict=True)):
            return None
        fn = self._function(self.defines(hi, items[0].dtype))
        plan = _RankTowerStruct(
            *self.fields.args,
            *self.arrays.addresses,
            self.n_a,
            self.n_b,
            self.arrays.width,
            self.fixed.data_ptr(),
            *(t.data_ptr() for t in items),
            num_rows,
            *self.scalars,
        )
        return BoundRequest(fn, self.fields, plan, num_rows, (self, items))


def _float32(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def int_tower_plan(model: nn.Module, user_features: Sequence[str]) -> IntTowerPlan | None:
    """The native request's reading of an IntTower in eval mode, or None where a part of it is not what
    ``int_tower_request.c`` computes."""
    c = model.config
    fields = fields_plan(model.emb, model.sel.user, user_features)
    if fields is None or model.training or not isinstance(model.dropout, nn.Dropout | nn.Identity):
        return None
    se = model.user_se.linear
    n = len(fields.names)
    if type(se) is not nn.Linear or se.bias is None or se.weight.shape != (n, n) or not _float32(se.weight, se.bias):
        return None
    layers = [linear_layer(m, RELU) for m in model.user_layers]
    projections = [linear_layer(m, NONE) for m in model.user_proj]
    if not layers or len(projections) != len(layers) or any(x is None for x in (*layers, *projections)):
        return None
    chain: list[Layer] = [x for x in layers if x is not None]
    if check_chain(n * fields.dim, chain) is None:
        return None
    per_layer = c.user_heads * c.head_dim
    for layer, proj in zip(chain, projections, strict=True):
        if check_chain(layer[0].shape[0], [proj]) != per_layer:
            return None
    arrays = affine_arrays([*chain, *(p for p in projections if p is not None)])
    if arrays is None:
        return None
    with torch.no_grad():
        se_params = (se.weight.detach().clone().contiguous(), se.bias.detach().clone().contiguous())
        bias = float(model.bias.detach())
    plan = IntTowerPlan(
        fields, se_params, arrays, len(chain), len(chain) * c.user_heads, c.head_dim, c.item_heads, bias
    )
    return plan if plan.defines(c.item_heads, torch.float32) is not None else None


def _centred(x: Tensor) -> Tensor:
    return x - x.mean(-1, keepdim=True)


def rank_tower_plan(model: nn.Module, user_features: Sequence[str]) -> RankTowerPlan | None:
    """The native request's reading of a RankTower in eval mode, or None where a part of it is not what
    ``rank_tower_request.c`` computes (more than one cross layer, a tower MLP with batch norm or another activation,
    a GAU activation other than SiLU, LayerNorms without affine maps, ...)."""
    c = model.config
    fields = fields_plan(model.emb, model.sel.user, user_features)
    if fields is None or model.training or len(model.cross.layers) != 1:
        return None
    tower = model.user_tower
    chain, gate = _sequential(tower.mlp), _sequential(tower.gate)
    if chain is None or gate is None:
        return None
    in_dim, out_dim = len(fields.names) * fields.dim, tower.heads * tower.head_dim
    if check_chain(in_dim, chain) != out_dim or check_chain(in_dim, gate) != out_dim:
        return None
    arrays = affine_arrays([*chain, *gate])
    layer = model.cross.layers[0]
    ug, ig = layer.user_gau, layer.item_gau
    linears = [getattr(g, name) for g in (ug, ig) for name in ("w_q", "w_k", "w_v", "w_u", "w_o")]
    norms = (layer.item_norm, layer.user_norm)
    if arrays is None or any(linear_layer(m) is None for m in linears):
        return None
    if any(type(g.act) is not nn.SiLU for g in (ug, ig)):
        return None
    if any(
        type(m) is not nn.LayerNorm or m.weight is None or m.bias is None or m.normalized_shape != (c.head_dim,)
        for m in norms
    ):
        return None
    k, dk, dv = c.head_dim, ug.w_q.out_features, ug.w_v.out_features
    if (ig.w_q.out_features, ug.w_k.out_features, ig.w_k.out_features, ig.w_v.out_features) != (dk, dk, dk, dv):
        return None
    if tower.head_dim != k or ug.w_o.in_features != dv or ug.w_o.out_features != k:
        return None
    params = [p for m in (*linears, *norms) for p in (m.weight, m.bias)]
    if not _float32(*params, model.log_temperature):
        return None
    with torch.no_grad():
        weights = (
            layer.item_norm.weight,
            layer.item_norm.bias,
            layer.user_norm.weight,
            layer.user_norm.bias,
            *(p for lin in (ug.w_q, ug.w_u, ig.w_k, ig.w_v) for p in (lin.weight, lin.bias)),
            ug.w_o.bias,
        )
        parts = (_centred(ig.w_o.weight.T), _centred(ug.w_o.weight.T), *weights)
        fixed = torch.cat([t.detach().reshape(-1).float() for t in parts]).contiguous()
        inv_tau = float(torch.exp(-model.log_temperature.detach()))
        bias = float(model.bias.detach()) if model.bias is not None else 0.0
    scalars = (ig.scale, ug.scale, layer.item_norm.eps, layer.user_norm.eps, inv_tau, bias)
    return RankTowerPlan(fields, arrays, len(chain), len(gate), fixed, scalars, tower.heads, c.item_heads, k, dk, dv)
