"""Shared set-up of the native kernel tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prerank.kernels import native


@pytest.fixture(autouse=True)
def _fresh_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test builds into its own directory and resolves libraries anew."""
    monkeypatch.setenv("PRERANK_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv("PRERANK_NATIVE", raising=False)
    native.library.cache_clear()
    native.function.cache_clear()
    yield
    native.library.cache_clear()
    native.function.cache_clear()
