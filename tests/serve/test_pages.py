"""Cache memory: one block, arrays from 64-byte lines, huge pages where the OS grants them, .npy files read into it."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest
from test_artifact import make_checkpoint, write_serve_data

from prerank.models.registry import build_model
from prerank.serve import pages
from prerank.serve.export import build_item_cache, export, load_artifact

SPECS = [
    ((3, 5), np.dtype(np.float32)),
    ((0, 4), np.dtype(np.int64)),
    ((7,), np.dtype(np.int16)),
    ((), np.dtype(np.float64)),
]


def advised_huge(a: np.ndarray) -> bool:
    """Whether the mapping holding ``a``'s first byte is advised MADV_HUGEPAGE ('hg' in /proc/self/smaps)."""
    address, inside = a.ctypes.data, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and line.startswith("VmFlags:"):
                return "hg" in line.split()[1:]
    return False


needs_madvise = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this OS"
)


def test_zeros_many_gives_separate_zeroed_arrays_on_cache_lines() -> None:
    arrays = pages.zeros_many(SPECS)
    for a, (shape, dtype) in zip(arrays, SPECS, strict=True):
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % pages.LINE == 0 and not a.any()
    arrays[0][:] = 1.5
    arrays[2][:] = -1
    arrays[3][...] = 2.0
    assert arrays[0].sum() == 22.5 and arrays[2].sum() == -7 and float(arrays[3]) == 2.0  # no overlaps


@needs_madvise
def test_a_block_of_huge_page_size_is_advised_huge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pages.ENV, raising=False)
    big = pages.zeros_many([((pages.HUGE_PAGE // 4,), np.dtype(np.float32))])[0]
    assert big.ctypes.data % pages.HUGE_PAGE == 0 and advised_huge(big)
    big[-1] = 3.0
    assert big.sum() == 3.0


def test_small_blocks_and_the_switch_stay_in_numpy_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_map(*args: object, **kwargs: object) -> None:
        raise AssertionError("mapped")

    monkeypatch.setattr(pages.mmap, "mmap", no_map)
    monkeypatch.delenv(pages.ENV, raising=False)
    assert pages.zeros_many([((1000,), np.dtype(np.float32))])[0].ctypes.data % pages.LINE == 0
    monkeypatch.setenv(pages.ENV, "0")
    assert not pages.enabled()
    off = pages.zeros_many([((pages.HUGE_PAGE // 4,), np.dtype(np.float32))])[0]
    assert off.ctypes.data % pages.LINE == 0 and not off.any()


def test_load_npys_reads_what_np_save_wrote(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    saved = [
        rng.normal(size=(6, 3)).astype(np.float32),
        rng.integers(-9, 9, size=(5,)).astype(np.int16),
        np.asfortranarray(rng.normal(size=(4, 7))),
        np.zeros((0, 2), np.int64),
    ]
    paths = [tmp_path / f"a{i}.npy" for i in range(len(saved))]
    for p, a in zip(paths, saved, strict=True):
        np.save(p, a)
    loaded = pages.load_npys(paths)
    for a, b in zip(saved, loaded, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(a, b)
    assert all(b.ctypes.data % pages.LINE == 0 for b in loaded[:2])


def test_load_npys_names_the_bad_file(tmp_path: Path) -> None:
    good = tmp_path / "good.npy"
    np.save(good, np.arange(10.0))
    (tmp_path / "text.npy").write_text("not an array")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "short.npy").write_bytes(good.read_bytes()[:-8])
    cases = {
        "missing.npy": "No such file",
        "text.npy": "magic string",
        "objects.npy": "Python objects",
        "short.npy": "ends after",
    }
    for name, reason in cases.items():
        with pytest.raises(pages.NpyError, match=reason) as e:
            pages.load_npys([good, tmp_path / name])
        assert e.value.path == tmp_path / name


def test_built_and_loaded_caches_start_on_cache_lines(tmp_path: Path) -> None:
    data = write_serve_data(tmp_path / "data")
    export(make_checkpoint(tmp_path / "tt.pt", "two_tower"), data, tmp_path / "art")
    artifact = load_artifact(tmp_path / "art")
    model = build_model("two_tower", artifact.model.schema).eval()
    for cache in (build_item_cache(model, data), artifact.cache):
        assert all(t.data_ptr() % pages.LINE == 0 for t in (cache.row_of_id, *cache.states.values()))
