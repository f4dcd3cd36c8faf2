"""Memory for item caches: one block, arrays on 64-byte lines, in transparent huge pages where the OS grants them.

Scoring reads cache rows in the random order of the candidates, so two things about that memory matter:

- **Alignment.** numpy aligns its arrays (``np.zeros``, ``np.load``) to 16 bytes only; a row of 64 floats then
  spans five cache lines instead of four. Every array here starts on a 64-byte line.
- **Page size.** With 4 KiB pages, a row of a large catalogue's cache usually sits on a page the TLB does not
  hold, so its read starts with a page walk; a 2 MiB page covers 512 times as much. numpy advises huge pages for
  its own arrays of 4 MiB or more, torch's allocator does not. Here the whole cache is one block: where Linux
  gives transparent huge pages on request (``madvise`` mode, the default of many distributions, or ``always``), a
  block of at least 2 MiB is an anonymous private map aligned to 2 MiB and advised ``MADV_HUGEPAGE``, so a small
  catalogue's cache (RankTower's five arrays of 0.9 MiB for ML-1M) gets huge pages too. Elsewhere (another OS,
  huge pages ``never``, a smaller block, ``PRERANK_HUGEPAGES=0``) it is numpy memory.

The arrays hold the same values either way. ``benchmarks/hugepages.py`` measures the effect per model.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HUGE_PAGE = 2 << 20
LINE = 64
ENV = "PRERANK_HUGEPAGES"

Spec = tuple[tuple[int, ...], np.dtype]  # (shape, dtype) of one array


class NpyError(ValueError):
    """A ``.npy`` file that :func:`load_npys` cannot read; ``path`` names it."""

    def __init__(self, path: Path, reason: object) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, str(reason)


def enabled() -> bool:
    """Whether blocks ask for huge pages: an OS with ``MADV_HUGEPAGE`` and ``PRERANK_HUGEPAGES`` not 0."""
    return hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get(ENV, "1") != "0"


def _block(nbytes: int) -> np.ndarray:
    """``nbytes`` zero bytes starting on a 64-byte line; in huge pages where :func:`enabled` and it spans one."""
    if nbytes >= HUGE_PAGE and enabled():
        buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # anonymous: zero-filled, not yet touched
        buf.madvise(mmap.MADV_HUGEPAGE)
        raw, align = np.frombuffer(buf, np.uint8), HUGE_PAGE  # the array keeps buf alive
    else:
        raw, align = np.zeros(nbytes + LINE, np.uint8), LINE
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes]


def zeros_many(specs: Sequence[Spec]) -> list[np.ndarray]:
    """Zero-filled, writable, C-ordered arrays of ``specs`` in one :func:`_block`, each from a 64-byte line."""
    sizes = [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs]
    offsets = np.cumsum([0] + [-(-s // LINE) * LINE for s in sizes])
    block = _block(int(offsets[-1]))
    return [
        block[o : o + s].view(dtype).reshape(shape)
        for (shape, dtype), o, s in zip(specs, offsets.tolist()[:-1], sizes, strict=True)
    ]


def _header(path: Path) -> tuple[Spec, bool, int]:
    """(shape, dtype), Fortran order and the data offset of a ``.npy`` file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(f)
        if dtype.hasobject:
            raise ValueError("it holds Python objects, which are not loaded (allow_pickle=False)")
        return (shape[::-1] if fortran_order else shape, dtype), fortran_order, f.tell()


def load_npys(paths: Sequence[Path]) -> list[np.ndarray]:
    """``np.load(p, allow_pickle=False)`` of each path, into the arrays of one :func:`zeros_many`.

    Raises :class:`NpyError` naming the first file that is missing, not a ``.npy`` array, holds Python objects or
    ends early.
    """
    headers = []
    for path in paths:
        try:
            headers.append(_header(path))
        except (OSError, ValueError) as e:
            raise NpyError(path, e) from e
    arrays = zeros_many([spec for spec, _, _ in headers])
    for path, (_, _, offset), out in zip(paths, headers, arrays, strict=True):
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        except OSError as e:
            raise NpyError(path, e) from e
        if got != out.nbytes:
            raise NpyError(path, f"it ends after {got} of its {out.nbytes} data bytes")
    return [a.T if fortran_order else a for a, (_, fortran_order, _) in zip(arrays, headers, strict=True)]
