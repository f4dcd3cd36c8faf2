"""MovieLens download: checksum verified, a bad file deleted, the zip usable by the recipe."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from prerank.data.recipes import RecipeError, prepare
from prerank.data.recipes.download import ARCHIVES, DownloadError, download


def _zip(path: Path) -> Path:
    """A tiny ml-100k.zip in the GroupLens layout."""
    ratings = "".join(f"{u}\t{m}\t{1 + (u + m) % 5}\t{880000000 + 60 * m}\n" for u in range(1, 9) for m in range(1, 9))
    users = "".join(f"{u}|{20 + u}|{'MF'[u % 2]}|writer|{10000 + u}\n" for u in range(1, 9))
    flags = "|".join(["0", "1"] + ["0"] * 17)
    items = "".join(f"{m}|Movie {m} (1990)|01-Jan-1990||http://x|{flags}\n" for m in range(1, 9))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-100k/u.data", ratings)
        zf.writestr("ml-100k/u.user", users)
        zf.writestr("ml-100k/u.item", items)
    return path


def test_official_archives_are_pinned() -> None:
    assert ARCHIVES["ml-1m"].url == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    assert ARCHIVES["ml-100k"].url == "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
    assert all(len(a.sha256) == 64 for a in ARCHIVES.values())


def test_download_good_checksum_then_prepare(tmp_path: Path) -> None:
    src = _zip(tmp_path / "mirror.zip")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    seen: list[int] = []
    got = download("ml-100k", tmp_path / "cache", url=src.as_uri(), sha256=sha, progress=lambda m, d, t: seen.append(d))
    assert got == tmp_path / "cache" / "ml-100k.zip"
    assert got.read_bytes() == src.read_bytes()
    assert seen and seen[-1] == src.stat().st_size
    # a verified copy is reused without fetching again (the URL is gone now)
    src.unlink()
    assert download("ml-100k", tmp_path / "cache", url=src.as_uri(), sha256=sha) == got
    root = prepare("ml-100k", got, tmp_path / "ds")
    assert (root / "train").is_dir()


def test_download_bad_checksum_deletes_the_file(tmp_path: Path) -> None:
    src = _zip(tmp_path / "mirror.zip")
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download("ml-100k", cache, url=src.as_uri(), sha256="0" * 64)
    assert list(cache.iterdir()) == []  # neither the zip nor a temporary file is left


def test_download_errors(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="failed"):
        download("ml-1m", tmp_path, url=(tmp_path / "missing.zip").as_uri())
    with pytest.raises(RecipeError, match="no download for 'taobao-user-behavior'"):
        download("taobao-user-behavior", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == []
