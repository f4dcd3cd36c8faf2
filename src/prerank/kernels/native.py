"""Compile a kernel's C source on first use with the machine's C compiler and load it with ctypes.

Serving scores one user against thousands of cached items, and for late-interaction scorers the time
in eager PyTorch goes to per-op passes over ``[N, heads, d]`` temporaries, not to arithmetic. A small C
loop that reads each cached item row once, specialised to the model's shapes, removes those passes. It
needs no PyTorch headers, so compiling takes a fraction of a second.

- Compiler: ``$CC``, else ``cc``, else ``gcc``; flags ``-O3 -march=native -fno-math-errno`` (the library is built on the
  machine that runs it, so the file name hashes the CPU's feature flags with the source and flags).
- Built libraries are kept in ``$PRERANK_KERNEL_DIR``, else ``$XDG_CACHE_HOME/prerank/kernels``
  (``~/.cache/prerank/kernels``); each is written to a temporary file and renamed into place.
- Kernels with one candidate per vector lane use :func:`block_lanes` lanes (16 with AVX-512, else 8;
  ``PRERANK_KERNEL_LANES`` overrides it).
- ``PRERANK_NATIVE=0`` turns native kernels off. Without a compiler, or when compiling or loading
  fails, :func:`library` warns once per kernel and shape and returns None: callers then run PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120


def enabled() -> bool:
    """False when ``PRERANK_NATIVE=0`` (or ``false``/``off``/``no``)."""
    return os.environ.get("PRERANK_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def compiler() -> str | None:
    """The C compiler to use: ``$CC`` (if it resolves), else ``cc`` or ``gcc`` on PATH."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def status() -> str:
    """One line for reports: ``on (<compiler>)`` or ``off (<why>)``."""
    if not enabled():
        return "off (PRERANK_NATIVE=0)"
    cc = compiler()
    if cc:
        return f"on ({cc})"
    if os.environ.get("CC"):
        return f"off (no C compiler: $CC={os.environ['CC']!r} not found)"
    return "off (no C compiler: set CC or install cc/gcc)"


def cache_dir() -> Path:
    if os.environ.get("PRERANK_KERNEL_DIR"):
        return Path(os.environ["PRERANK_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prerank" / "kernels"


@functools.cache
def _cpu_flags() -> str:
    """The CPU's feature flags line of ``/proc/cpuinfo`` ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _cpu_fingerprint() -> str:
    """The CPU's feature flags (``-march=native`` code must not run on another CPU sharing the cache dir)."""
    return f"{platform.machine()} {platform.processor()} {_cpu_flags()}"


def block_lanes() -> int:
    """Candidates per vector for the kernels that put one candidate in each lane (``rank_tower``, ``sum_max_block``):
    16 where the CPU has AVX-512, whose registers hold 16 floats, else 8.

    Sixteen lanes without AVX-512 are emulated, and the 16 x 16 transposes of ``vec.h`` worst of all: ``rank_tower``
    over 5,000 candidates compiled for x86-64-v3 (AVX2) took 11 ms with 16 lanes and 1.3 ms with 8.
    ``PRERANK_KERNEL_LANES`` (8 or 16) overrides the choice; the tests use it to run the 8-lane code on any CPU.
    """
    override = os.environ.get("PRERANK_KERNEL_LANES", "").strip()
    if override:
        if override not in ("8", "16"):
            raise ValueError(f"PRERANK_KERNEL_LANES must be 8 or 16, got {override!r}")
        return int(override)
    return 16 if _has_flag(_cpu_flags(), "avx512f") else 8


@functools.cache
def _has_flag(flags: str, flag: str) -> bool:
    """Whether ``flag`` is one of ``flags``; cached, since IntTower asks on every request (splitting the line took
    11 us)."""
    return flag in flags.split()


def _build(cc: str, source: str, defines: tuple[tuple[str, int], ...], out: Path) -> None:
    """Compile ``source`` into the shared library ``out`` (atomically); raises RuntimeError on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    src = tmp.with_suffix(".c")
    try:
        src.write_text(source)
        cmd = [cc, *FLAGS, *(f"-D{k}={v}" for k, v in defines), "-o", str(tmp), str(src)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"compiling {out.name} failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
        src.unlink(missing_ok=True)


@functools.cache
def library(name: str, defines: tuple[tuple[str, int], ...], headers: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The kernel ``prerank/kernels/<name>.c`` compiled with ``defines``, or None (see the module docstring).

    ``headers`` (files of ``prerank/kernels``) are prepended to the source, so a kernel is compiled as one
    file from the compiler's temporary directory, and the library's name hashes everything it was built from.

    Cached per process; a library file that exists but does not load (truncated, wrong architecture) is
    rebuilt once.
    """
    if not enabled():
        return None
    cc = compiler()
    if cc is None:
        warnings.warn(f"prerank: {status()}; the {name} kernel falls back to PyTorch", RuntimeWarning, stacklevel=2)
        return None
    files = resources.files("prerank.kernels")
    source = "".join(files.joinpath(f).read_text() + "\n" for f in (*headers, f"{name}.c"))
    key = "\n".join([source, cc, " ".join(FLAGS), repr(defines), _cpu_fingerprint()])
    path = cache_dir() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so"
    try:
        if not path.exists():
            _build(cc, source, defines, path)
        try:
            return ctypes.CDLL(str(path))
        except OSError:
            _build(cc, source, defines, path)
            return ctypes.CDLL(str(path))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"prerank: native kernel {name} unavailable ({e}); using PyTorch", RuntimeWarning, stacklevel=2)
        return None


@functools.cache
def function(
    name: str, defines: tuple[tuple[str, int], ...], argtypes: tuple, headers: tuple[str, ...] = ("rows.h",)
) -> Callable[..., int] | None:
    """The C function ``name`` of :func:`library` ``(name, defines, headers)``, with its argument types set and an
    int64 result, or None."""
    lib = library(name, defines, headers)
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int64
    return fn
