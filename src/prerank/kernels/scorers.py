"""Native scoring of one user against item-cache rows, fused with the row gather.

Five scores, each reading a candidate's cached item state straight from the cache (no gathered copy):

- :func:`sum_max_rows` (``sum_max.c``, for one user row ``sum_max_block.c``):
  ``bias + sum_h max_j <U[m_i, h], V[rows[i], j]>``, IntTower's FE-Block score (Li et al. 2022, Sec. 3.2;
  one row of user heads per tower layer) and the "w SumMax" ablation of FIT; neither the gathered heads
  nor the ``[N, H, H_v]`` similarities are materialised.
- :func:`dot_rows` (``dot.c``): ``bias + scale * <U[m_i], V[rows[i]]>``, the Two-Tower / DAT output and
  FIT's "w/o LSS" ablation.
- :func:`lss_rows` (``lss.c``): the per-candidate part of FIT's Lightweight Similarity Scorer,
  ``c0 + sum_h c_h PReLU_h(<U[m_i, h], X[rows[i], h]> + b_h)``
  (:class:`~prerank.layers.fit_parts.LightweightSimilarityScorer`).
- :class:`RankTowerKernel` (``rank_tower.c``): RankTower's gated cross-attention (one layer) and
  maximum-similarity score, one candidate per vector lane (as ``sum_max_block.c``; both share ``vec.h``).
- :func:`fc_rows` (``fc.c``): ``c0 + sum_k w_k ReLU(U[m_i, k] + V[rows[i], k])``, FIT's "w FC" ablation.

``m_i = meta[rows[i]]`` picks the user row a cache row is scored against (FIT: one user row per meta
vector, by the item's stored meta index; RankTower has none); without ``meta`` there is one user row.
Each returns None where the native kernel is unavailable (:mod:`prerank.kernels.native`), and the caller
runs PyTorch instead.
Float32, and bfloat16 item caches for the two block kernels (RankTower's, and IntTower's sum-max for one user
row), which convert each gathered row to floats in registers; every other case returns None. No autograd (a
gradient-carrying input is an error). They run on one thread, whatever
``torch.get_num_threads()`` says: splitting the rows over a second Python thread measured slower on our
2-core machines (PyTorch's OpenMP workers occupy the other core). A row outside ``[0, R)`` or a meta
index outside ``[0, M)`` raises IndexError naming the candidate.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import Tensor

from prerank.kernels.native import block_lanes, function

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# user, num_meta, meta, cache, num_rows, rows, n, [scale,] bias, out
_SUM_MAX_ARGS = [_P, _I, _P, _P, _I, _P, _I, _F, _P]
_DOT_ARGS = [_P, _I, _P, _P, _I, _P, _I, _F, _F, _P]
_HEAD_ARGS = [_P, _I, _P, _P, _I, _P, _I, _P, _F, _P]  # lss / fc: ..., params, c0, out
_VECTOR_ROWS = ("vec.h", "rows.h")  # the row-wise kernels with W-lane vectors (lss has none)


def _lanes(width: int) -> int:
    """Vector lanes: 16 for wide rows, 8 for narrow ones (measured faster there)."""
    return 16 if width > 8 else 8


def _check(
    user: Tensor,
    user_dims: int,
    cache: Tensor,
    rows: Tensor,
    meta: Tensor | None,
    cache_dtypes: tuple[torch.dtype, ...] = (torch.float32,),
) -> bool:
    """Validate the common arguments; False where only PyTorch can score them (a float32 user, a cache of
    ``cache_dtypes`` and int64 rows are native)."""
    if user.dim() != user_dims or cache.dim() != user_dims or user.shape[-1] != cache.shape[-1]:
        got = f"{tuple(user.shape)} and {tuple(cache.shape)}"
        raise ValueError(f"user and cache must be {user_dims}-d with the same last dimension, got {got}")
    if rows.dim() != 1:
        raise ValueError(f"rows must be 1-d, got shape {tuple(rows.shape)}")
    if user.requires_grad or cache.requires_grad:
        raise ValueError("native scorers have no backward; call them under torch.no_grad() or inference_mode()")
    if meta is None and user.shape[0] != 1:
        raise ValueError(f"without meta there must be one user row, got {user.shape[0]}")
    if meta is not None and (meta.dtype != torch.int64 or meta.shape != cache.shape[:1]):
        raise ValueError(f"meta must be int64 [{cache.shape[0]}], got {meta.dtype} {tuple(meta.shape)}")
    return user.dtype == torch.float32 and cache.dtype in cache_dtypes and rows.dtype == torch.int64


def _run(
    fn: Callable[..., int], user: Tensor, cache: Tensor, rows: Tensor, meta: Tensor | None, *tail: object
) -> Tensor:
    """Call a kernel over all rows; decode its out-of-range report into an IndexError."""
    cache, rows = cache.contiguous(), rows.contiguous()
    meta = meta.contiguous() if meta is not None else None
    out = torch.empty(rows.shape[0])
    head = (user.data_ptr(), user.shape[0], meta.data_ptr() if meta is not None else None, cache.data_ptr())
    err = fn(*head, cache.shape[0], rows.data_ptr(), rows.shape[0], *tail, out.data_ptr())
    if err:
        i = -1 - err
        row = int(rows[i])
        if 0 <= row < cache.shape[0] and meta is not None:
            raise IndexError(f"candidate {i}: meta index {int(meta[row])} of row {row} outside [0, {user.shape[0]})")
        raise row_error(rows, i, cache.shape[0])
    return out


def row_error(rows: Tensor, i: int, num_rows: int) -> IndexError:
    return IndexError(f"candidate {i}: row {int(rows[i])} outside [0, {num_rows})")


def sum_max_rows(
    user: Tensor, cache: Tensor, rows: Tensor, meta: Tensor | None = None, bias: float = 0.0
) -> Tensor | None:
    """``[N]`` sum-max scores of cache ``rows`` ``[N]``: ``user`` ``[M, H, d]``, ``cache`` ``[R, H_v, d]``."""
    if not _check(user, 3, cache, rows, meta, _BLOCK_DTYPES):
        return None
    m, heads, dim = user.shape
    block = sum_max_block_defines(heads, cache) if meta is None else None
    if block is not None:
        return _sum_max_block(user[0], cache, rows, bias, block)
    if cache.dtype != torch.float32:
        return None
    lanes = _lanes(heads)
    vectors = -(-heads // lanes)
    defines = (("H", heads), ("HV", cache.shape[1]), ("D", dim), ("W", lanes), ("NV", vectors))
    fn = function("sum_max", defines, tuple(_SUM_MAX_ARGS), _VECTOR_ROWS)
    if fn is None:
        return None
    # transposed and zero-padded to whole vectors of user heads: [M, d, NV * W]
    ut = torch.zeros(m, dim, vectors * lanes)
    ut[:, :, :heads] = user.transpose(1, 2)
    return _run(fn, ut, cache, rows, meta, bias)


_BLOCK_DTYPES = (torch.float32, torch.bfloat16)  # the cache dtypes of the block kernels (vec.h's transpose)
_BLOCK_MAX_ITEM_HEADS = 16  # sum_max_block keeps HB x HV accumulators in registers
_BLOCK_MAX_ROW = 512  # floats per item row: a transposed block of 16 rows (16 lanes) then takes 32 KiB of L1


def sum_max_block_defines(heads: int, cache: Tensor) -> tuple[tuple[str, int], ...] | None:
    """The defines of ``sum_max_block.c`` for one user of ``heads`` heads against ``cache`` ``[R, H_v, d]`` (float32 or
    bfloat16), or None where its rows are too wide for it (then ``sum_max.c``, float32 only, scores them)."""
    hv, dim = cache.shape[1:]
    if hv > _BLOCK_MAX_ITEM_HEADS or hv * dim > _BLOCK_MAX_ROW or cache.dtype not in _BLOCK_DTYPES:
        return None
    per_pass = 2 if heads % 2 == 0 and hv <= 8 else 1
    defines = (("H", heads), ("HV", hv), ("D", dim), ("W", block_lanes()), ("HB", per_pass))
    return (*defines, ("BF16", int(cache.dtype == torch.bfloat16)))


def _sum_max_block(
    user: Tensor, cache: Tensor, rows: Tensor, bias: float, defines: tuple[tuple[str, int], ...]
) -> Tensor | None:
    """:func:`sum_max_rows` for one user ``[H, d]`` by ``sum_max_block.c`` (one candidate per vector lane), compiled
    with ``defines`` (:func:`sum_max_block_defines`)."""
    fn = function("sum_max_block", defines, (_P, _P, _I, _P, _I, _F, _P), headers=("vec.h",))
    if fn is None:
        return None
    cache, rows = cache.contiguous(), rows.contiguous()
    out = torch.empty(rows.shape[0])
    user = user.contiguous()
    err = fn(user.data_ptr(), cache.data_ptr(), cache.shape[0], rows.data_ptr(), rows.shape[0], bias, out.data_ptr())
    if err:
        raise row_error(rows, -1 - err, cache.shape[0])
    return out


def dot_rows(
    user: Tensor, cache: Tensor, rows: Tensor, meta: Tensor | None = None, scale: float = 1.0, bias: float = 0.0
) -> Tensor | None:
    """``[N]`` dot-product scores of cache ``rows`` ``[N]``: ``user`` ``[M, D]``, ``cache`` ``[R, D]``."""
    if not _check(user, 2, cache, rows, meta):
        return None
    dim = user.shape[1]
    fn = function("dot", (("D", dim), ("W", _lanes(dim))), tuple(_DOT_ARGS), _VECTOR_ROWS)
    if fn is None:
        return None
    return _run(fn, user.contiguous(), cache, rows, meta, scale, bias)


def lss_rows(
    user: Tensor,
    cache: Tensor,
    rows: Tensor,
    meta: Tensor | None,
    *,
    row_bias: Tensor,
    slope: Tensor,
    weight: Tensor,
    out_bias: float,
) -> Tensor | None:
    """``[N]`` LSS scores of cache ``rows``: ``user`` ``[M, H, d]``, ``cache`` ``[R, H, d]`` (mixed item heads);
    ``row_bias``, ``slope`` (PReLU) and ``weight`` (column FC) each ``[H]``."""
    if not _check(user, 3, cache, rows, meta):
        return None
    heads, dim = user.shape[1:]
    if cache.shape[1] != heads:
        raise ValueError(f"LSS needs one mixed item head per user head: {heads} vs {cache.shape[1]}")
    fn = function("lss", (("H", heads), ("D", dim)), tuple(_HEAD_ARGS))
    if fn is None:
        return None
    if any(t.shape != (heads,) for t in (row_bias, slope, weight)):
        got = [tuple(t.shape) for t in (row_bias, slope, weight)]
        raise ValueError(f"row_bias, slope and weight must each be [{heads}], got {got}")
    params = torch.stack([row_bias, slope, weight]).float().contiguous()
    return _run(fn, user.contiguous(), cache, rows, meta, params.data_ptr(), out_bias)


def fc_rows(
    user: Tensor, cache: Tensor, rows: Tensor, meta: Tensor | None, *, weight: Tensor, out_bias: float
) -> Tensor | None:
    """``[N]`` FC-head scores of cache ``rows``: ``user`` ``[M, h]``, ``cache`` ``[R, h]``, ``weight`` ``[h]``."""
    if not _check(user, 2, cache, rows, meta):
        return None
    dim = user.shape[1]
    if weight.shape != (dim,):
        raise ValueError(f"weight must be [{dim}], got {tuple(weight.shape)}")
    fn = function("fc", (("D", dim), ("W", _lanes(dim))), tuple(_HEAD_ARGS), _VECTOR_ROWS)
    if fn is None:
        return None
    w = weight.float().contiguous()
    return _run(fn, user.contiguous(), cache, rows, meta, w.data_ptr(), out_bias)


RANK_TOWER_ITEM_KEYS = ("r", "q", "g", "k", "v")


class RankTowerKernel:
    """``rank_tower.c`` bound to one item cache, the packed parameters and the six scalars: the shapes are checked
    and the addresses taken once, so that a request (:meth:`__call__`) pays for little more than the call.

    ``cache`` holds the item keys ``r, q, g, k, v`` (each ``[R, H_i, .]``), ``fixed`` the user-independent
    parameters and ``scalars`` the six floats, for users of ``user_heads`` heads. Built by :func:`rank_tower_kernel`
    (from :meth:`prerank.layers.gau.GatedCrossAttentionLayer.native`). It holds the tensors whose addresses it
    passes (``tensors``: ``fixed``, then the item keys, at ``addresses``), so they live as long as it does; ``defines``
    are the ones it was compiled with.
    """

    def __init__(
        self,
        fn: Callable[..., int],
        fixed: Tensor,
        items: list[Tensor],
        scalars: tuple[float, ...],
        user_heads: int,
        defines: tuple[tuple[str, int], ...],
    ):
        self._fn, self.tensors, self.scalars = fn, (fixed, *items), scalars
        self.addresses = tuple(t.data_ptr() for t in self.tensors)
        self.num_rows, _, self.dim = items[0].shape
        self.user_heads = user_heads
        self.defines = defines

    def __call__(self, e_u: Tensor, rows: Tensor) -> Tensor:
        """``[N]`` scores of cache ``rows`` (int64 ``[N]``) for one user's ``E_u`` ``[H_u, k]`` (float32)."""
        if rows.dim() != 1 or rows.dtype != torch.int64:
            raise ValueError(f"rows must be a 1-d int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
        if e_u.shape != (self.user_heads, self.dim) or e_u.dtype != torch.float32:
            raise ValueError(
                f"the user state must be float32 [{self.user_heads}, {self.dim}], got {e_u.dtype} {tuple(e_u.shape)}"
            )
        if e_u.requires_grad:
            raise ValueError("native scorers have no backward; call them under torch.no_grad() or inference_mode()")
        e_u, rows = e_u.contiguous(), rows.contiguous()
        out = torch.empty(rows.shape[0])
        err = self._fn(
            e_u.data_ptr(),
            *self.addresses,
            self.num_rows,
            rows.data_ptr(),
            rows.shape[0],
            *self.scalars,
            out.data_ptr(),
        )
        if err:
            raise row_error(rows, -1 - err, self.num_rows)
        return out


def rank_tower_kernel(
    fixed: Tensor, cache: dict[str, Tensor], scalars: tuple[float, ...], user_heads: int
) -> RankTowerKernel | None:
    """:class:`RankTowerKernel` of these arguments (those of ``rank_tower.c``), checked; None where only PyTorch can
    score them (a cache neither float32 nor bfloat16, mixed dtypes, or no native kernel)."""
    items = [cache[x] for x in RANK_TOWER_ITEM_KEYS]
    num_rows, hi, k = items[0].shape
    dk, dv = cache["q"].shape[-1], cache["g"].shape[-1]
    for key, t, width in zip(RANK_TOWER_ITEM_KEYS, items, (k, dk, dv, dk, dv), strict=True):
        if t.shape != (num_rows, hi, width):
            raise ValueError(f"item state {key!r} has shape {tuple(t.shape)}, expected ({num_rows}, {hi}, {width})")
    size = 2 * dv * k + 4 * k + 2 * (dk + dv) * (k + 1) + k
    if fixed.shape != (size,):
        raise ValueError(f"RankTower kernel parameters have shape {tuple(fixed.shape)}, expected ({size},)")
    if len(scalars) != 6:
        raise ValueError(f"RankTower kernel takes 6 scalars, got {len(scalars)}")
    dtype = items[0].dtype
    if fixed.dtype != torch.float32 or dtype not in _BLOCK_DTYPES or any(t.dtype != dtype for t in items):
        return None
    if any(t.requires_grad for t in (fixed, *items)):
        raise ValueError("native scorers have no backward; call them under torch.no_grad() or inference_mode()")
    defines = (("HU", user_heads), ("HI", hi), ("K", k), ("DK", dk), ("DV", dv), ("W", block_lanes()))
    defines += (("BF16", int(dtype == torch.bfloat16)),)
    fn = function("rank_tower", defines, (*[_P] * 7, _I, _P, _I, *[_F] * 6, _P), headers=("vec.h",))
    if fn is None:
        return None
    return RankTowerKernel(fn, fixed.contiguous(), [t.contiguous() for t in items], scalars, user_heads, defines)
