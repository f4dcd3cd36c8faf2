"""The native serving backend (prerank.serve.native): IntTower's and RankTower's fused C request equals the eager
runtime's, falls back where it cannot take the inputs, and is refused cleanly (None and a warning) where there is no
kernel, compiler or private kernel directory."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_schema, tiny_table
from prerank.data.parquet import table_to_batch
from prerank.models.base import PreRanker
from prerank.models.int_tower import IntTower, IntTowerConfig
from prerank.models.rank_tower import RankTower, RankTowerConfig
from prerank.models.two_tower import TwoTower
from prerank.serve import native
from prerank.serve.graphs import Signature, signature
from prerank.serve.native import NativeRuntime, build, open_native
from prerank.serve.native import request as native_request
from prerank.serve.runtime import EagerRuntime

HAS_CC = build.compiler() is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler (cc/gcc or $CC): no native kernel here")

CONFIGS = {
    "int_tower": IntTowerConfig(),
    "rank_tower": RankTowerConfig(),
    "rank_tower_odd": RankTowerConfig(user_heads=3, item_heads=5, head_dim=7, hidden=(24, 12), bias=False),
}
NUM_ITEMS = 60


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One private directory for the module's compiled kernels (each is compiled once)."""
    return tmp_path_factory.mktemp("native") / "kernels"


@pytest.fixture(autouse=True)
def _fresh(kernel_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PRERANK_KERNEL_DIR", str(kernel_dir))
    for name in ("PRERANK_NATIVE", "PRERANK_KERNEL_LANES"):
        monkeypatch.delenv(name, raising=False)
    build.clear_caches()
    native._warned.clear()
    yield
    build.clear_caches()
    native._warned.clear()


def trained_like(model: PreRanker) -> PreRanker:
    """``model`` in eval mode with its parameters away from their initial values (LayerNorms and biases too)."""
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


class Served:
    """A model, its signature, the eager runtime, an item cache of NUM_ITEMS + 1 rows and some users."""

    def __init__(self, model: PreRanker):
        schema = tiny_schema()
        self.model = trained_like(model)
        self.sig: Signature = signature(self.model)
        self.eager = EagerRuntime(self.model, self.sig)
        items = table_to_batch(tiny_table(NUM_ITEMS + 1, 5, schema), schema)
        states = self.eager.item([items.features[k] for k in self.sig.item_features])
        self.cache = dict(zip(self.sig.item_state, states, strict=True))
        users = table_to_batch(tiny_table(8, 6, schema), schema)
        self.users = [[users.features[k][i : i + 1].contiguous() for k in self.sig.user_features] for i in range(8)]

    def cache_as(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) for k, v in self.cache.items()}


@pytest.fixture(scope="module")
def served() -> dict[str, Served]:
    schema = tiny_schema()
    return {
        name: Served((IntTower if isinstance(c, IntTowerConfig) else RankTower)(schema, c))
        for name, c in CONFIGS.items()
    }


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_cc
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_native_request_equals_the_eager_one(name: str, dtype: torch.dtype, served, kernel_dir: Path) -> None:
    s = served[name]
    runtime = open_native(s.model, s.sig)
    assert isinstance(runtime, NativeRuntime) and isinstance(runtime, EagerRuntime) and runtime.name == "native"
    cache = s.cache_as(dtype)
    assert runtime.bind(cache) is not None  # the fused call, not the fallback
    gen = torch.Generator().manual_seed(1)
    for n in (1, 7, 300):
        rows = torch.randint(0, NUM_ITEMS + 1, (n,), generator=gen)
        for user in s.users[:3]:
            out = runtime.request(user, cache, rows, [])
            assert out.shape == (n,) and out.dtype == torch.float32
            close(out, s.eager.request(user, cache, rows, []))
    kernel = "int_tower_request" if name == "int_tower" else "rank_tower_request"
    assert list(kernel_dir.glob(f"{kernel}-*.so"))
    assert stat.S_IMODE(kernel_dir.stat().st_mode) == 0o700


@needs_cc
@pytest.mark.parametrize("name", ["int_tower", "rank_tower"])
def test_the_other_lane_width_equals_the_eager_one(name: str, served, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block kernels in 8 lanes (CPUs without AVX-512) and in 16 (emulated without it): both score alike."""
    other = "8" if build.block_lanes() == 16 else "16"
    monkeypatch.setenv("PRERANK_KERNEL_LANES", other)
    s = served[name]
    runtime = open_native(s.model, s.sig)
    rows = torch.randint(0, NUM_ITEMS + 1, (37,))
    for dtype in (torch.float32, torch.bfloat16):
        cache = s.cache_as(dtype)
        assert runtime.bind(cache) is not None
        close(runtime.request(s.users[4], cache, rows, []), s.eager.request(s.users[4], cache, rows, []))


@needs_cc
def test_a_split_request_equals_one_call(served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_request, "MIN_CHUNK", 40)
    s = served["rank_tower"]
    runtime = open_native(s.model, s.sig, threads=3)
    rows = torch.randint(0, NUM_ITEMS + 1, (301,))
    close(runtime.request(s.users[0], s.cache, rows, []), s.eager.request(s.users[0], s.cache, rows, []))
    with pytest.raises(IndexError, match="candidate 290: row"):
        runtime.request(s.users[0], s.cache, torch.cat([rows[:290], torch.tensor([NUM_ITEMS + 1]), rows[291:]]), [])


@needs_cc
@pytest.mark.parametrize("name", ["int_tower", "rank_tower"])
def test_bad_ids_and_rows_are_named_and_other_inputs_fall_back(name: str, served) -> None:
    s = served[name]
    runtime = open_native(s.model, s.sig)
    user, rows = s.users[1], torch.arange(0, 20)
    with pytest.raises(IndexError, match="candidate 1: row"):
        runtime.request(user, s.cache, torch.tensor([1, NUM_ITEMS + 1]), [])
    age = s.sig.user_features.index("age")
    bad = [torch.tensor([tiny_schema().vocab("age")]) if i == age else t for i, t in enumerate(user)]
    with pytest.raises(IndexError, match="feature 'age': an id is outside its table"):
        runtime.request(bad, s.cache, rows, [])
    # an int32 id and a strided sequence are not what fields.c reads: the eager path scores them
    hist = s.sig.user_features.index("hist_item_id")
    odd = [t.int() if i == age else t for i, t in enumerate(user)]
    odd[hist] = torch.stack([user[hist], user[hist]], -1).flatten(1)[:, ::2]
    assert not odd[hist].is_contiguous() and runtime.bind(s.cache).fields.inputs(odd) is None
    close(runtime.request(odd, s.cache, rows, []), s.eager.request(odd, s.cache, rows, []))
    # a kernel that fails to compile when a cache is bound: a warning, and the eager path scores
    runtime = open_native(s.model, s.sig)
    bf16 = s.cache_as(torch.bfloat16)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(build, "FLAGS", (*build.FLAGS, "-fno-such-flag-here"))
        build.clear_caches()
        with pytest.warns(RuntimeWarning, match="no-such-flag-here"):
            assert runtime.bind(bf16) is None
        close(runtime.request(user, bf16, rows, []), s.eager.request(user, bf16, rows, []))


@needs_cc
def test_the_binding_is_kept_per_cache(served) -> None:
    s = served["int_tower"]
    runtime = open_native(s.model, s.sig)
    bound = runtime.bind(s.cache)
    assert runtime.bind(s.cache) is bound
    assert runtime.bind(dict(s.cache)) is not bound  # another dict: bound anew
    other = {k: v.clone() for k, v in s.cache.items()}
    assert runtime.bind(other) is not bound


def test_models_without_a_kernel_get_none() -> None:
    model = TwoTower(tiny_schema()).eval()
    with pytest.warns(RuntimeWarning, match="TwoTower has no native kernel"):
        assert open_native(model, signature(model)) is None


@needs_cc
@pytest.mark.parametrize(
    "model",
    [
        lambda s: RankTower(s, RankTowerConfig(cross_layers=2)),
        lambda s: IntTower(s, IntTowerConfig(item_heads=16, head_dim=64)),  # item rows too wide for the kernel
    ],
    ids=["rank_tower_two_cross_layers", "int_tower_wide_items"],
)
def test_configurations_without_a_native_form_get_none(model) -> None:
    m = model(tiny_schema()).eval()
    with pytest.warns(RuntimeWarning, match="configuration has no native form"):
        assert open_native(m, signature(m)) is None


def test_no_compiler_or_native_off_gives_none_with_a_warning(served, monkeypatch: pytest.MonkeyPatch) -> None:
    s = served["int_tower"]
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert open_native(s.model, s.sig) is None
    with warnings.catch_warnings():  # once per reason
        warnings.simplefilter("error")
        assert open_native(s.model, s.sig) is None
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", "")
    if build.compiler() is None:
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            assert open_native(s.model, s.sig) is None
    monkeypatch.setenv("PRERANK_NATIVE", "0")
    with pytest.warns(RuntimeWarning, match="PRERANK_NATIVE=0"):
        assert open_native(s.model, s.sig) is None


@needs_cc
def test_a_kernel_directory_others_can_write_is_refused(served, tmp_path: Path, monkeypatch) -> None:
    s = served["int_tower"]
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o775)
    monkeypatch.setenv("PRERANK_KERNEL_DIR", str(shared))
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        assert open_native(s.model, s.sig) is None
    assert not list(shared.iterdir())
    fresh = tmp_path / "a" / "b"
    monkeypatch.setenv("PRERANK_KERNEL_DIR", str(fresh))
    assert build.secure_dir() == fresh and stat.S_IMODE(fresh.stat().st_mode) == 0o700


@needs_cc
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_kernel_directory_of_another_user_is_refused(served, tmp_path: Path, monkeypatch) -> None:
    s = served["int_tower"]
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 4242, -1)
    monkeypatch.setenv("PRERANK_KERNEL_DIR", str(theirs))
    with pytest.warns(RuntimeWarning, match="owned by uid 4242"):
        assert open_native(s.model, s.sig) is None


@needs_cc
def test_the_object_name_changes_with_the_flags_and_the_source(served, kernel_dir: Path, monkeypatch) -> None:
    s = served["int_tower"]
    cc = build.compiler()
    text = build.source("int_tower_request", ("vec.h", "rows.h", "fields.c", "mlp.c", "sum_max_block.c"))
    name = build.object_name("int_tower_request", text, build.FLAGS, cc)
    assert name != build.object_name("int_tower_request", text, (*build.FLAGS, "-DX=1"), cc)
    assert name != build.object_name("int_tower_request", text + "/* */", build.FLAGS, cc)
    assert name != build.object_name("int_tower_request", text, build.FLAGS, cc + "x")

    def built() -> set[str]:
        assert open_native(s.model, s.sig) is not None
        return {p.name for p in kernel_dir.glob("int_tower_request-*.so")}

    before = built()
    monkeypatch.setattr(build, "FLAGS", (*build.FLAGS, "-DPRERANK_TEST_FLAG=1"))
    build.clear_caches()
    after_flags = built()
    assert len(after_flags - before) == 1
    original = build.source
    monkeypatch.setattr(build, "source", lambda name, headers=(): original(name, headers) + "/* changed */\n")
    build.clear_caches()
    after_source = built()
    assert len(after_source - after_flags) == 1
