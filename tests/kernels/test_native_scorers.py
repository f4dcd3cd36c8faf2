"""The native scorers (sum-max, dot, LSS, FC, RankTower): equal to the PyTorch path, bounds-checked, and
optional (every way they can be unavailable falls back to PyTorch)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch

from prerank.data.batch import Batch
from prerank.kernels import native
from prerank.kernels import scorers as sm
from prerank.layers.fit_parts import DotScorer, FCScorer, LightweightSimilarityScorer, SumMaxScorer
from prerank.models.fit import FIT, FITConfig
from prerank.models.rank_tower import RankTower, RankTowerConfig
from prerank.models.registry import build_model
from prerank.serve.export import build_item_cache
from prerank.serve.scorer import Scorer

pytestmark = pytest.mark.usefixtures("fresh_kernels")
needs_cc = pytest.mark.skipif(
    native.compiler() is None, reason="no C compiler (cc/gcc or $CC): the native kernel cannot be built here"
)


def sum_max_reference(
    user: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, meta: torch.Tensor | None, bias: float
) -> torch.Tensor:
    u = user.index_select(0, meta[rows]) if meta is not None else user.expand(len(rows), -1, -1)
    return torch.einsum("nid,njd->nij", u, cache[rows]).amax(-1).sum(-1) + bias


@needs_cc
@pytest.mark.parametrize(
    ("m", "heads", "item_heads", "dim"),
    # one user row takes sum_max_block.c, except with wide item rows (1, 6, 32, 64) or > 16 item heads (1, 3, 17, 2)
    [
        (1, 24, 8, 16),
        (16, 4, 4, 8),
        (3, 5, 30, 7),
        (1, 1, 1, 1),
        (2, 40, 3, 64),
        (1, 17, 5, 3),
        (1, 6, 32, 64),
        (1, 3, 17, 2),
        (1, 7, 16, 32),
    ],
)
@pytest.mark.parametrize("lanes", ["8", "16"])
def test_sum_max_matches_pytorch(
    m: int, heads: int, item_heads: int, dim: int, lanes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRERANK_KERNEL_LANES", lanes)
    cache = torch.randn(50, item_heads, dim)
    rows = torch.randint(0, 50, (301,))
    user = torch.randn(m, heads, dim)
    meta = torch.randint(0, m, (50,)) if m > 1 else None
    with torch.inference_mode():
        out = sm.sum_max_rows(user, cache, rows, meta, bias=0.25)
        assert out is not None
        torch.testing.assert_close(out, sum_max_reference(user, cache, rows, meta, 0.25), rtol=1e-5, atol=1e-4)
    assert list(native.cache_dir().glob("*.so")), "the built library is kept for the next process"


@needs_cc
@pytest.mark.parametrize(("heads", "item_heads", "dim"), [(24, 8, 16), (17, 5, 3), (7, 16, 32), (3, 3, 12)])
@pytest.mark.parametrize("lanes", ["8", "16"])
def test_sum_max_block_reads_a_bfloat16_cache(
    heads: int, item_heads: int, dim: int, lanes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One user row against a bfloat16 cache: equal to PyTorch on the rounded cache (whole tiles of 32 bfloat16 and a
    scalar rest, 8 and 16 lanes); the row-wise kernels, which read floats, leave it to PyTorch (None)."""
    monkeypatch.setenv("PRERANK_KERNEL_LANES", lanes)
    cache = torch.randn(50, item_heads, dim).to(torch.bfloat16)
    rows = torch.randint(0, 50, (301,))
    user = torch.randn(1, heads, dim)
    with torch.inference_mode():
        out = sm.sum_max_rows(user, cache, rows, bias=0.25)
        assert out is not None
        torch.testing.assert_close(out, sum_max_reference(user, cache.float(), rows, None, 0.25), rtol=1e-5, atol=1e-4)
        assert sm.sum_max_rows(user, torch.randn(50, 40, dim).to(torch.bfloat16), rows) is None  # > 16 heads: sum_max.c
        assert sm.sum_max_rows(torch.randn(2, heads, dim), cache, rows, torch.randint(0, 2, (50,))) is None
        assert sm.dot_rows(user[0, :1], cache[:, 0], rows) is None


@needs_cc
@pytest.mark.parametrize(("m", "dim"), [(1, 64), (1, 1), (4, 7), (16, 100), (2, 16)])
def test_dot_matches_pytorch(m: int, dim: int) -> None:
    cache, user = torch.randn(50, dim), torch.randn(m, dim)
    rows = torch.randint(0, 50, (301,))
    meta = torch.randint(0, m, (50,)) if m > 1 else None
    u = user[meta[rows]] if meta is not None else user
    with torch.inference_mode():
        out = sm.dot_rows(user, cache, rows, meta, scale=2.5, bias=-0.5)
    assert out is not None
    torch.testing.assert_close(out, (u * cache[rows]).sum(-1) * 2.5 - 0.5, rtol=1e-5, atol=1e-4)


@needs_cc
@pytest.mark.parametrize("kind", ["lss", "fc", "dot", "summax"])
@pytest.mark.parametrize("m", [1, 5])
def test_fit_scorers_native_equals_forward(kind: str, m: int) -> None:
    """Each FIT scorer's ``native`` (read from the cache) equals its ``forward`` on gathered rows."""
    scorer = {
        "lss": LightweightSimilarityScorer(12, 4, 3, 8),
        "fc": FCScorer(12, 32),
        "dot": DotScorer(),
        "summax": SumMaxScorer(12, 4, 3, 8),
    }[kind]
    with torch.no_grad():  # non-trivial biases and PReLU slopes
        for p in scorer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    with torch.inference_mode():
        user = scorer.user_part(torch.randn(m, 12))
        cache = scorer.item_part(torch.randn(40, 12))
        rows = torch.randint(0, 40, (257,))
        meta = torch.randint(0, m, (40,)) if m > 1 else None
        out = scorer.native(user, cache, rows, meta)
        expected = scorer(user, cache[rows], meta[rows]) if meta is not None else scorer(user, cache[rows])
    assert out is not None
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


@needs_cc
def test_out_of_range_rows_and_meta_are_errors() -> None:
    cache, user = torch.randn(10, 2, 4), torch.randn(3, 2, 4)
    meta = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 7])
    with torch.inference_mode():
        with pytest.raises(IndexError, match="candidate 2: row 10 outside"):
            sm.sum_max_rows(user[:1], cache, torch.tensor([1, 2, 10]))
        with pytest.raises(IndexError, match="candidate 0: row -1 outside"):
            sm.sum_max_rows(user[:1], cache, torch.tensor([-1]))
        with pytest.raises(IndexError, match="candidate 1: meta index 7 of row 9 outside"):
            sm.sum_max_rows(user, cache, torch.tensor([0, 9]), meta)
        with pytest.raises(IndexError, match="candidate 1: row 10 outside"):
            sm.dot_rows(user[:1, 0], cache[:, 0], torch.tensor([0, 10]))


def test_bad_shapes_and_autograd_are_errors() -> None:
    with pytest.raises(ValueError, match="same last dimension"):
        sm.sum_max_rows(torch.randn(1, 2, 4), torch.randn(5, 2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="one user row, got 2"):
        sm.sum_max_rows(torch.randn(2, 2, 4), torch.randn(5, 2, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="1-d"):
        sm.sum_max_rows(torch.randn(1, 2, 4), torch.randn(5, 2, 4), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="no backward"):
        sm.sum_max_rows(torch.randn(1, 2, 4, requires_grad=True), torch.randn(5, 2, 4), torch.tensor([0]))


def test_disabled_or_without_compiler_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    args = (torch.randn(1, 2, 4), torch.randn(5, 2, 4), torch.tensor([0, 3]))
    monkeypatch.setenv("PRERANK_NATIVE", "0")
    assert sm.sum_max_rows(*args) is None
    assert native.status() == "off (PRERANK_NATIVE=0)"
    monkeypatch.setenv("PRERANK_NATIVE", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native.library.cache_clear()
    native.function.cache_clear()
    with pytest.warns(RuntimeWarning, match="no C compiler: \\$CC='/nonexistent/cc' not found"):
        assert sm.sum_max_rows(*args) is None
    assert sm.sum_max_rows(torch.randn(1, 2, 4).double(), torch.randn(5, 2, 4).double(), args[2]) is None


@needs_cc
def test_a_compile_error_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: internal error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.warns(RuntimeWarning, match="internal error"):
        assert sm.sum_max_rows(torch.randn(1, 2, 4), torch.randn(5, 2, 4), torch.tensor([0])) is None
    assert not list(native.cache_dir().glob("*.so")), "a failed build leaves no library behind"


@needs_cc
def test_a_corrupt_library_is_rebuilt() -> None:
    args = (torch.randn(1, 3, 4), torch.randn(5, 2, 4), torch.tensor([0, 4]))
    with torch.inference_mode():
        first = sm.sum_max_rows(*args)
    (lib,) = native.cache_dir().glob("*.so")
    lib.unlink()  # a new file: this process still maps the old one, which must not change under it
    lib.write_bytes(b"not a shared library")
    native.library.cache_clear()
    native.function.cache_clear()
    with torch.inference_mode():
        torch.testing.assert_close(sm.sum_max_rows(*args), first)


NATIVE_MODELS = [
    *("int_tower", "two_tower", "dat", "rank_tower"),
    *("fit", "fit_no_mqm", "fit_no_lss", "fit_summax", "fit_fc"),
]


@needs_cc
@pytest.mark.parametrize("name", [*NATIVE_MODELS, "fit_summax_no_mqm"])
def test_models_score_from_the_cache_as_from_gathered_states(
    name: str, schema, batch, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name == "fit_summax_no_mqm":
        model = FIT(schema, FITConfig(scorer="summax", use_mqm=False)).eval()
    else:
        model = build_model(name, schema).eval()
    cache = build_item_cache(model, tiny_dataset)
    one_user = Batch(features={k: v[:1] for k, v in batch.features.items()})
    rows = torch.randint(0, cache.num_items + 1, (200,))
    with torch.inference_mode():
        user = model.encode_user(one_user)
        fused = model.score_cached(user, cache.states, rows)
        torch.testing.assert_close(fused, model.score(user, cache.gather(rows)), rtol=1e-5, atol=1e-4)
    assert list(native.cache_dir().glob("*.so")), "the model took the native path"
    monkeypatch.setenv("PRERANK_NATIVE", "0")
    native.library.cache_clear()
    native.function.cache_clear()
    with torch.inference_mode():
        torch.testing.assert_close(model.score_cached(user, cache.states, rows), fused, rtol=1e-5, atol=1e-4)


@needs_cc
def test_scorer_builds_the_kernel_before_the_first_request(schema, tiny_dataset: Path) -> None:
    model = build_model("int_tower", schema).eval()
    Scorer(model, build_item_cache(model, tiny_dataset))
    assert list(native.cache_dir().glob("*.so"))


@needs_cc
@pytest.mark.parametrize(
    "config",
    [
        RankTowerConfig(),
        RankTowerConfig(user_heads=3, item_heads=5, head_dim=7, attention_dim=9, value_dim=5, bias=False),
        RankTowerConfig(user_heads=2, item_heads=2, head_dim=32, attention_dim=8, value_dim=24, temperature=2.0),
    ],
)
@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_rank_tower_kernel_equals_the_pytorch_path(
    config: RankTowerConfig,
    lanes: str,
    cache_dtype: str,
    schema,
    batch,
    tiny_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Other head counts and widths (not multiples of the 16 lanes: the transposition's scalar path), no bias; both
    vector widths (8 lanes: the code CPUs without AVX-512 run, and the division and square-root path); float32 and
    bfloat16 caches (pairs of bfloat16 transposed at once, and a scalar rest where a row is not whole tiles)."""
    monkeypatch.setenv("PRERANK_KERNEL_LANES", lanes)
    model = RankTower(schema, config).eval()
    with torch.no_grad():  # LayerNorm and W_O biases away from their initial values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cache = build_item_cache(model, tiny_dataset, cache_dtype=cache_dtype)
    one_user = Batch(features={k: v[:1] for k, v in batch.features.items()})
    rows = torch.randint(0, cache.num_items + 1, (37,))  # a short last block of 16
    with torch.inference_mode():
        assert model._native_kernel(cache.states) is not None
        user = model.encode_user(one_user)
        fused = model.score_cached(user, cache.states, rows)
        torch.testing.assert_close(fused, model.score(user, cache.gather(rows)), rtol=1e-5, atol=1e-4)
        with pytest.raises(IndexError, match="candidate 1: row"):
            model.score_cached(user, cache.states, torch.tensor([1, cache.num_items + 1]))
    assert list(native.cache_dir().glob("rank_tower-*.so"))


def test_block_lanes_follow_the_cpu_and_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRERANK_KERNEL_LANES", raising=False)
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags\t: fpu sse2 avx avx2 fma")
    assert native.block_lanes() == 8
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags\t: fpu sse2 avx avx2 fma avx512f avx512bw")
    assert native.block_lanes() == 16
    monkeypatch.setenv("PRERANK_KERNEL_LANES", "8")
    assert native.block_lanes() == 8
    monkeypatch.setenv("PRERANK_KERNEL_LANES", "4")
    with pytest.raises(ValueError, match="PRERANK_KERNEL_LANES must be 8 or 16, got '4'"):
        native.block_lanes()


@needs_cc
def test_rank_tower_kernel_checks_the_states_it_reads() -> None:
    hu, hi, k, dk, dv = 2, 3, 4, 5, 6
    e_u = torch.randn(hu, k)
    cache = {key: torch.randn(7, hi, w) for key, w in zip("rqgkv", (k, dk, dv, dk, dv), strict=True)}
    fixed = torch.randn(2 * dv * k + 4 * k + 2 * (dk + dv) * (k + 1) + k)
    scalars = (0.5, 0.5, 1e-5, 1e-5, 1.0, 0.0)
    with torch.inference_mode():
        kernel = sm.rank_tower_kernel(fixed, cache, scalars, hu)
        assert kernel is not None and kernel(e_u, torch.tensor([0, 6])).shape == (2,)
        with pytest.raises(ValueError, match="item state 'v' has shape"):
            sm.rank_tower_kernel(fixed, {**cache, "v": torch.randn(7, 3, 5)}, scalars, hu)
        with pytest.raises(ValueError, match="parameters have shape"):
            sm.rank_tower_kernel(fixed[:-1], cache, scalars, hu)
        with pytest.raises(ValueError, match="6 scalars"):
            sm.rank_tower_kernel(fixed, cache, scalars[:5], hu)
        assert sm.rank_tower_kernel(fixed.double(), cache, scalars, hu) is None  # PyTorch scores other dtypes
        with pytest.raises(ValueError, match=r"user state must be float32 \[2, 4\], got torch.float32 \(2, 5\)"):
            kernel(torch.randn(hu, 5), torch.tensor([0]))
        with pytest.raises(ValueError, match="user state must be"):
            kernel(e_u[None], torch.tensor([0]))
        with pytest.raises(ValueError, match="rows must be a 1-d int64"):
            kernel(e_u, torch.tensor([0.0]))
        with pytest.raises(IndexError, match="candidate 0: row 7 outside"):
            kernel(e_u, torch.tensor([7]))


@needs_cc
def test_rank_tower_kernel_follows_weight_updates(schema, batch, tiny_dataset: Path) -> None:
    """The kernel is rebuilt after an in-place update (an optimizer step), a replaced module or parameter, a new
    temperature or bias, and for another item cache."""
    model = RankTower(schema, RankTowerConfig()).eval()
    cache = build_item_cache(model, tiny_dataset)
    rows = torch.arange(1, cache.num_items + 1)
    one_user = Batch(features={k: v[:1] for k, v in batch.features.items()})
    with torch.inference_mode():
        user = model.encode_user(one_user)

    def agrees(states: dict[str, torch.Tensor]) -> None:
        with torch.inference_mode():
            fused = model.score_cached(user, states, rows)
            torch.testing.assert_close(fused, model.score(user, {k: v[rows] for k, v in states.items()}))

    agrees(cache.states)
    layer = model.cross.layers[0]
    with torch.no_grad():
        for norm in (layer.item_norm, layer.user_norm):
            norm.weight.mul_(torch.rand_like(norm.weight) + 0.5)
            norm.bias.add_(torch.randn_like(norm.bias))
        for p in (
            layer.user_gau.w_o.weight,
            layer.user_gau.w_o.bias,
            layer.user_gau.w_q.weight,
            layer.item_gau.w_v.bias,
        ):
            p.add_(torch.randn_like(p))
    agrees(cache.states)
    with torch.no_grad():
        model.log_temperature.fill_(-1.0)
        model.bias.fill_(0.7)
    agrees(cache.states)
    layer.item_gau.w_k = torch.nn.Linear(16, 16)
    agrees(cache.states)
    other = RankTower(schema, RankTowerConfig())
    model.load_state_dict(other.state_dict(), assign=True)
    agrees(cache.states)
    agrees({k: v + 0.1 for k, v in cache.states.items()})


@needs_cc
def test_rank_tower_copies_after_serving(schema, batch, tiny_dataset: Path) -> None:
    """The bound kernel (a C function) is not part of a copy or a pickle; the copy binds its own."""
    model = RankTower(schema, RankTowerConfig()).eval()
    cache = build_item_cache(model, tiny_dataset)
    rows = torch.arange(1, cache.num_items + 1)
    with torch.inference_mode():
        user = model.encode_user(Batch(features={k: v[:1] for k, v in batch.features.items()}))
        scores = model.score_cached(user, cache.states, rows)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.inference_mode():
            torch.testing.assert_close(twin.score_cached(user, cache.states, rows), scores)
    assert model._kernel is not None


def test_rank_tower_with_two_cross_layers_takes_the_pytorch_path(schema, batch, tiny_dataset: Path) -> None:
    model = RankTower(schema, RankTowerConfig(cross_layers=2)).eval()
    cache = build_item_cache(model, tiny_dataset)
    rows = torch.arange(cache.num_items + 1)
    with torch.inference_mode():
        user = model.encode_user(Batch(features={k: v[:1] for k, v in batch.features.items()}))
        torch.testing.assert_close(model.score_cached(user, cache.states, rows), model.score(user, cache.gather(rows)))
    assert not list(native.cache_dir().glob("rank_tower-*.so"))
