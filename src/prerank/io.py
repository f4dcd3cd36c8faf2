"""Atomic file writes and safe checkpoint loading.

Every output prerank writes goes to a temporary file in the same directory and is renamed into
place, so a crash or a full disk never leaves a half-written file where a good one stood.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class CheckpointError(RuntimeError):
    """A checkpoint or artifact is missing, corrupt or does not match."""


def safe_torch_load(path: str | Path) -> Any:
    """Load a checkpoint with ``weights_only=True``; raise :class:`CheckpointError` on any damage."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises loading with weights_only=False: wrong advice for a file that would run code
        found = re.search(r"WeightsUnpickler error: (.*?\.)(?:\s|$)", str(e), re.S)
        detail = " ".join(found.group(1).split()) if found else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a prerank checkpoint: it holds Python objects other than tensors and "
            f"plain data, refused without running them ({detail})"
        ) from e
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a prerank checkpoint: {e}") from e
