"""Download the official MovieLens zips with a SHA-256 check.

Checksums of the GroupLens release files (``files.grouplens.org/datasets/movielens/``):

* ``ml-1m.zip``: a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20
* ``ml-100k.zip``: 50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229

Both agree across many independent public projects that pin them (TensorFlow Recommenders'
MovieLens example, Keras-RS, scikit-style dataset fetchers); the ML-100K one is also cross-checked
there against GroupLens' published MD5 ``0e33842e24a9c977be4e0107933c0723``. They were not
recomputed here (no network access to GroupLens from the build machine).
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prerank.data.recipes.common import Progress, RecipeError, no_progress
from prerank.io import atomic_path


class DownloadError(RecipeError):
    """A download failed or its checksum did not match (the partial file is deleted)."""


@dataclass(frozen=True)
class Archive:
    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


ARCHIVES: dict[str, Archive] = {
    "ml-1m": Archive(
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
    ),
    "ml-100k": Archive(
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
    ),
}

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: Path, sha256: str, *, progress: Progress = no_progress, timeout: float = 60.0) -> Path:
    """Stream ``url`` to ``dest`` (atomically), verifying its SHA-256; a good ``dest`` is reused.

    ``progress(message, bytes_done, bytes_total)`` is called per chunk (total 0 when unknown).
    On a checksum mismatch or a network error the partial file is removed and
    :class:`DownloadError` is raised; ``dest`` is never left half-written.
    """
    dest = Path(dest)
    if dest.exists():
        if sha256_of(dest) == sha256:
            return dest
        dest.unlink()  # stale or corrupt copy: fetch again
    digest = hashlib.sha256()
    try:
        with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as fh:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while block := resp.read(CHUNK):
                fh.write(block)
                digest.update(block)
                done += len(block)
                progress(f"downloading {dest.name}", done, total)
            if digest.hexdigest() != sha256:
                raise DownloadError(
                    f"checksum mismatch for {url}: got sha256 {digest.hexdigest()}, expected {sha256}; "
                    "the partial file was deleted"
                )
    except DownloadError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: malformed URL
        raise DownloadError(f"download of {url} failed: {e}") from e
    return dest


def download(
    name: str,
    cache: str | Path,
    *,
    url: str | None = None,
    sha256: str | None = None,
    progress: Progress = no_progress,
) -> Path:
    """Fetch the official zip of ``name`` (``ml-1m`` or ``ml-100k``) into ``cache``; returns its path.

    ``url``/``sha256`` override the official ones (tests point them at a local ``file://`` zip).
    The result can be passed straight to ``prepare(name, raw=<zip>, ...)``.
    """
    archive = ARCHIVES.get(name)
    if archive is None:
        raise RecipeError(f"no download for {name!r}; downloadable: {sorted(ARCHIVES)}")
    return fetch(url or archive.url, Path(cache) / archive.filename, sha256 or archive.sha256, progress=progress)
