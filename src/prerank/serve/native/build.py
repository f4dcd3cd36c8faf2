"""Compile the native serving kernels with the machine's C compiler on first use, keep the shared objects in a
per-user directory and load them with ctypes.

- Compiler: ``$CC`` (resolved on PATH), else ``cc``, else ``gcc``; flags :data:`FLAGS` (``-O3 -march=native``: the
  object is built for, and only runs on, this machine's CPU) plus the kernel's ``-D`` shape defines.
- Objects are named ``<kernel>-<sha256>.so``, the hash of the C sources, the compiler's path and ``--version``
  string, the flags and defines, and the CPU's feature flags (a directory shared by several machines never hands
  one an object built for another). Each is compiled to a temporary file and renamed into place.
- Directory: ``$PRERANK_KERNEL_DIR``, else ``kernels`` in the ``prerank`` folder of ``$XDG_CACHE_HOME`` (default
  ``~/.cache``), created with mode 0o700. A directory that is writable by group or others, or owned by another
  user, is refused (anyone who can write there could have this process load their code), as is an object file of
  that kind.
- ``PRERANK_NATIVE=0`` (or ``false``/``off``/``no``) turns native kernels off.

Every failure (no compiler, a refused directory, a failed compile or load) is a :class:`NativeUnavailable` naming
the reason; :func:`prerank.serve.native.open_native` turns it into a warning and the PyTorch runtime.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120
ENV_ENABLED, ENV_DIR, ENV_LANES = "PRERANK_NATIVE", "PRERANK_KERNEL_DIR", "PRERANK_KERNEL_LANES"
Defines = tuple[tuple[str, int], ...]


class NativeUnavailable(RuntimeError):
    """A native kernel cannot be had here; the message says why."""


def enabled() -> bool:
    """False when ``PRERANK_NATIVE`` is ``0``, ``false``, ``off`` or ``no``."""
    return os.environ.get(ENV_ENABLED, "1").strip().lower() not in ("0", "false", "off", "no")


def compiler() -> str | None:
    """The C compiler's path: ``$CC`` if it resolves, else ``cc`` or ``gcc`` on PATH; None where there is none."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def status() -> str:
    """One line for reports: ``on (<compiler>)`` or ``off (<why>)``."""
    if not enabled():
        return f"off ({ENV_ENABLED}=0)"
    cc = compiler()
    if cc:
        return f"on ({cc})"
    if os.environ.get("CC"):
        return f"off (no C compiler: $CC={os.environ['CC']!r} not found)"
    return "off (no C compiler: set CC or install cc/gcc)"


@functools.cache
def compiler_version(cc: str) -> str:
    """The first line of ``cc --version`` ("" where it gives none)."""
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else ""


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prerank" / "kernels"


def _private(st: os.stat_result) -> str | None:
    """Why a file or directory of stat ``st`` may not be trusted (None where it may): not owned by this user, or
    writable by group or others."""
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    if uid is not None and st.st_uid != uid:
        return f"owned by uid {st.st_uid}, not this user ({uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def secure_dir() -> Path:
    """:func:`cache_dir`, created with mode 0o700 where it is missing; NativeUnavailable where it is not a directory
    of this user's that only this user can write."""
    path = cache_dir()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        raise NativeUnavailable(f"kernel directory {path} cannot be created: {e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise NativeUnavailable(f"kernel directory {path} is not a directory")
    why = _private(st)
    if why:
        raise NativeUnavailable(f"kernel directory {path} is {why}; refusing to load code from it")
    return path


@functools.cache
def _cpu_flags() -> str:
    """The CPU's feature flags line of ``/proc/cpuinfo`` ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.strip() for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def cpu_fingerprint() -> str:
    return f"{platform.machine()} {platform.processor()} {_cpu_flags()}"


def block_lanes() -> int:
    """Candidates per vector in the block kernels (``rank_tower.c``, ``sum_max_block.c``): 16 where the CPU has
    AVX-512, whose registers hold 16 floats, else 8 (16 lanes emulated on AVX2 measured 8x slower).
    ``PRERANK_KERNEL_LANES`` (8 or 16) overrides the choice."""
    override = os.environ.get(ENV_LANES, "").strip()
    if override:
        if override not in ("8", "16"):
            raise ValueError(f"{ENV_LANES} must be 8 or 16, got {override!r}")
        return int(override)
    return 16 if "avx512f" in _cpu_flags().split() else 8


def source(name: str, headers: Sequence[str] = ()) -> str:
    """The source of kernel ``name``: the files ``headers`` of this package, then ``<name>.c``, as one text."""
    files = resources.files(__package__)
    return "".join(files.joinpath(f).read_text() + "\n" for f in (*headers, f"{name}.c"))


def object_name(name: str, text: str, flags: Sequence[str], cc: str) -> str:
    """The file name of kernel ``name`` compiled from ``text`` with ``flags`` (defines included) by ``cc``."""
    key = json.dumps([text, cc, compiler_version(cc), list(flags), cpu_fingerprint()])
    return f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.so"


def _compile(cc: str, text: str, flags: Sequence[str], out: Path) -> None:
    """Compile ``text`` into the shared object ``out``, atomically (a temporary file renamed into place)."""
    fd, tmp_name = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    src = tmp.with_suffix(".c")
    try:
        src.write_text(text)
        cmd = [cc, *flags, "-o", str(tmp), str(src)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise NativeUnavailable(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        os.chmod(tmp, 0o700)  # whatever the umask: the object must pass _private when loaded
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"compiling {out.name} failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
        src.unlink(missing_ok=True)


def _load(path: Path) -> ctypes.CDLL:
    why = _private(os.stat(path))
    if why:
        raise NativeUnavailable(f"kernel {path} is {why}; refusing to load it")
    return ctypes.CDLL(str(path))


@functools.cache
def library(name: str, defines: Defines, headers: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The kernel ``<name>.c`` (after ``headers``) compiled with ``defines``, built where it is not yet in
    :func:`secure_dir` and loaded; cached per process. An object that exists but does not load (truncated, another
    architecture) is rebuilt once. NativeUnavailable where native kernels are off or none can be had."""
    if not enabled():
        raise NativeUnavailable(f"{ENV_ENABLED}=0")
    cc = compiler()
    if cc is None:
        raise NativeUnavailable(status()[len("off (") : -1])
    directory = secure_dir()
    text = source(name, headers)
    flags = (*FLAGS, *(f"-D{k}={v}" for k, v in defines))
    path = directory / object_name(name, text, flags, cc)
    try:
        if not path.exists():
            _compile(cc, text, flags, path)
        try:
            return _load(path)
        except OSError:
            _compile(cc, text, flags, path)
            return _load(path)
    except OSError as e:
        raise NativeUnavailable(f"kernel {path.name} does not load: {e}") from e


@functools.cache
def function(name: str, defines: Defines, argtypes: tuple, headers: tuple[str, ...] = ()) -> Callable[..., int]:
    """The C function ``name`` of :func:`library` ``(name, defines, headers)``, with its argument types set and an
    int64 result; NativeUnavailable as there."""
    fn = getattr(library(name, defines, headers), name)
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int64
    return fn


def clear_caches() -> None:
    """Forget every loaded kernel and the compiler's version (after changing the environment: tests)."""
    library.cache_clear()
    function.cache_clear()
    compiler_version.cache_clear()
