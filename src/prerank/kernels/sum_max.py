"""Sum-max late interaction of one user against cached item rows, fused with the row gather.

``out[i] = bias + sum_h max_j <U[m_i, h], V[rows[i], j]>`` with ``m_i = meta[rows[i]]`` (or 0): IntTower's
FE-Block score (Li et al. 2022, Sec. 3.2, one row of user heads per tower layer) and the "w SumMax"
ablation of FIT (one user row per meta vector, picked by the item's stored meta index). The C kernel
(``sum_max.c``) reads each candidate's item heads straight from the cache, so neither the gathered
copy nor the ``[N, H, H_v]`` similarities are materialised.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from prerank.kernels.native import library

_ARGTYPES = [
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_float,
    ctypes.c_void_p,
]


def _shape_defines(heads: int, item_heads: int, dim: int) -> tuple[tuple[str, int], ...]:
    """Compile-time shape: 16 lanes for wide user-head rows, 8 for narrow ones (measured faster there)."""
    lanes = 16 if heads > 8 else 8
    return (("H", heads), ("HV", item_heads), ("D", dim), ("W", lanes), ("NV", -(-heads // lanes)))


@functools.cache
def _kernel(heads: int, item_heads: int, dim: int) -> tuple[ctypes._CFuncPtr, int] | None:
    defines = _shape_defines(heads, item_heads, dim)
    lib = library("sum_max", defines)
    if lib is None:
        return None
    fn = lib.sum_max
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int64
    return fn, dict(defines)["NV"] * dict(defines)["W"]


def sum_max_rows(
    user: Tensor, cache: Tensor, rows: Tensor, meta: Tensor | None = None, bias: float = 0.0
) -> Tensor | None:
    """``[N]`` scores of cache ``rows`` ``[N]`` (int64) for one user; None where the native kernel is unavailable.

    ``user``: ``[M, H, d]`` user rows (``M = 1`` without ``meta``); ``cache``: ``[R, H_v, d]`` item heads;
    ``meta``: ``[R]`` int64, the user row each cache row is scored against. Float32 only, no autograd (a
    gradient-carrying input is an error). Runs on one thread, whatever ``torch.get_num_threads()`` says:
    splitting the rows over a second thread was slower on 2 cores, where PyTorch's own OpenMP workers
    spin on the other core. Raises IndexError for a row outside ``[0, R)`` or a meta index
    outside ``[0, M)``.
    """
    if user.dim() != 3 or cache.dim() != 3 or user.shape[-1] != cache.shape[-1]:
        got = f"{tuple(user.shape)} and {tuple(cache.shape)}"
        raise ValueError(f"sum_max_rows needs user [M, H, d] and cache [R, H_v, d] of one d, got {got}")
    if user.dtype != torch.float32 or cache.dtype != torch.float32 or rows.dtype != torch.int64:
        return None
    if user.requires_grad or cache.requires_grad:
        raise ValueError("sum_max_rows has no backward; call it under torch.no_grad() or inference_mode()")
    if meta is None and user.shape[0] != 1:
        raise ValueError(f"without meta, sum_max_rows scores one user row, got {user.shape[0]}")
    if meta is not None and (meta.dtype != torch.int64 or meta.shape != cache.shape[:1]):
        raise ValueError(f"meta must be int64 [{cache.shape[0]}], got {meta.dtype} {tuple(meta.shape)}")
    m, heads, dim = user.shape
    found = _kernel(heads, cache.shape[1], dim)
    if found is None:
        return None
    fn, padded = found
    ut = torch.zeros(m, dim, padded)
    ut[:, :, :heads] = user.transpose(1, 2)
    cache, rows = cache.contiguous(), rows.contiguous()
    meta = meta.contiguous() if meta is not None else None
    out = torch.empty(rows.shape[0])
    meta_ptr = meta.data_ptr() if meta is not None else None
    err = fn(
        ut.data_ptr(),
        m,
        meta_ptr,
        cache.data_ptr(),
        cache.shape[0],
        rows.data_ptr(),
        rows.shape[0],
        bias,
        out.data_ptr(),
    )
    if err:
        i = -1 - err
        row = int(rows[i])
        if 0 <= row < cache.shape[0] and meta is not None:
            what = f"meta index {int(meta[row])} of row {row} outside [0, {m})"
        else:
            what = f"row {row} outside [0, {cache.shape[0]})"
        raise IndexError(f"sum_max_rows: candidate {i}: {what}")
    return out
