"""A served RankTower or IntTower request in one native call, and FIT's user side in one (PreRanker.bind,
prerank.kernels.request): equal to the contract's path, bounds-checked, and falling back to it wherever the fused
call does not apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from prerank.data.batch import Batch
from prerank.kernels import native
from prerank.kernels.mlp import NONE, RELU, MlpPlan
from prerank.kernels.request import fit_user, int_tower_request, rank_tower_request
from prerank.models.base import PreRanker
from prerank.models.fit import FIT, FITConfig
from prerank.models.int_tower import IntTower, IntTowerConfig
from prerank.models.rank_tower import RankTower, RankTowerConfig
from prerank.serve.export import build_item_cache
from prerank.serve.scorer import Scorer

pytestmark = [
    pytest.mark.usefixtures("fresh_kernels"),
    pytest.mark.skipif(native.compiler() is None, reason="no C compiler (cc/gcc or $CC): no native kernel here"),
]


def trained_like(schema, config: RankTowerConfig | IntTowerConfig = RankTowerConfig()) -> PreRanker:
    """A model whose parameters are away from their initial values (LayerNorm and biases included)."""
    model = (RankTower if isinstance(config, RankTowerConfig) else IntTower)(schema, config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


CONFIGS = [
    RankTowerConfig(),
    RankTowerConfig(user_heads=3, item_heads=5, head_dim=7, hidden=(24, 12), bias=False),
    IntTowerConfig(),
    IntTowerConfig(hidden=(24, 12), user_heads=3, item_heads=5, head_dim=8),
]
KERNELS = {RankTower: "rank_tower_request", IntTower: "int_tower_request"}
BOTH = pytest.mark.parametrize("config", [RankTowerConfig(), IntTowerConfig()], ids=["rank_tower", "int_tower"])


def user_row(batch: Batch, i: int) -> Batch:
    return Batch(features={k: v[i : i + 1].contiguous() for k, v in batch.features.items()})


def contract(model: PreRanker, cache, user: Batch, rows: torch.Tensor) -> torch.Tensor:
    """``score(encode_user(user), gathered rows)``: what the bound request must equal."""
    return model.score(model.encode_user(user), cache.gather(rows))


@pytest.mark.parametrize("config", CONFIGS, ids=["rank_tower", "rank_tower_odd", "int_tower", "int_tower_odd"])
@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_the_bound_request_equals_the_contract(
    config: RankTowerConfig | IntTowerConfig,
    lanes: str,
    cache_dtype: str,
    schema,
    batch,
    tiny_dataset: Path,
    monkeypatch,
) -> None:
    """Categorical, dense and sequence user fields (mean-pooled, with padding), several users, a short last block."""
    monkeypatch.setenv("PRERANK_KERNEL_LANES", lanes)
    model = trained_like(schema, config)
    cache = build_item_cache(model, tiny_dataset, cache_dtype=cache_dtype)
    rows = torch.randint(0, cache.num_items + 1, (37,))
    with torch.inference_mode():
        run = model.bind(cache.states)
        assert model._request(cache.states) is not None
        for i in range(5):
            user = user_row(batch, i)
            torch.testing.assert_close(run(user, rows, None), contract(model, cache, user, rows), rtol=1e-5, atol=1e-4)
        scorer = Scorer(model, cache)
        torch.testing.assert_close(scorer.logits(user, rows, None), contract(model, cache, user, rows))
    assert list(native.cache_dir().glob(f"{KERNELS[type(model)]}-*.so"))


@BOTH
def test_bad_ids_and_rows_are_named(config, schema, batch, tiny_dataset: Path) -> None:
    model = trained_like(schema, config)
    cache = build_item_cache(model, tiny_dataset)
    user = user_row(batch, 0)
    with torch.inference_mode():
        run = model.bind(cache.states)
        with pytest.raises(IndexError, match="candidate 1: row"):
            run(user, torch.tensor([1, cache.num_items + 1]), None)
        bad = Batch(features={**user.features, "age": torch.tensor([schema.vocab("age")])})
        with pytest.raises(IndexError, match="feature 'age': an id is outside its table"):
            run(bad, torch.tensor([1, 2]), None)
        with pytest.raises(ValueError, match="rows must be a 1-d int64 tensor"):
            run(user, torch.tensor([[1, 2]]), None)


@BOTH
def test_other_inputs_and_autograd_take_the_contract_path(config, schema, batch, tiny_dataset: Path) -> None:
    """An int32 id, a strided sequence or gradients on: the fused call does not apply, and the default path scores."""
    model = trained_like(schema, config)
    cache = build_item_cache(model, tiny_dataset)
    user, rows = user_row(batch, 0), torch.arange(1, 20)
    with torch.inference_mode():
        run = model.bind(cache.states)
        want = contract(model, cache, user, rows)
        int32 = Batch(features={**user.features, "user_id": user.features["user_id"].int()})
        assert model.emb.fields_plan(model.sel.user).inputs(int32) is None
        torch.testing.assert_close(run(int32, rows, None), want)
        strided = Batch(features={**user.features, "hist_item_id": batch.features["hist_item_id"][:1, ::2]})
        assert model.emb.fields_plan(model.sel.user).inputs(strided) is None
        torch.testing.assert_close(run(strided, rows, None), contract(model, cache, strided, rows))
    with torch.no_grad():
        run = model.bind(cache.states)
    out = run(user, rows, None)
    assert out.requires_grad  # PyTorch's path, which can differentiate
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)


@BOTH
def test_binding_again_follows_new_weights_and_old_bindings_stay_safe(
    config, schema, batch, tiny_dataset: Path
) -> None:
    model, other = trained_like(schema, config), trained_like(schema, config)
    cache = build_item_cache(model, tiny_dataset)
    user, rows = user_row(batch, 1), torch.arange(0, 40)
    with torch.inference_mode():
        old = model.bind(cache.states)
        before = old(user, rows, None)
    model.load_state_dict(other.state_dict())
    for p in model.parameters():  # new storages: the old binding holds the ones it read
        p.data = p.data.clone()
    with torch.inference_mode():
        cache = build_item_cache(model, tiny_dataset)
        torch.testing.assert_close(model.bind(cache.states)(user, rows, None), contract(other, cache, user, rows))
        assert torch.isfinite(old(user, rows, None)).all()
        assert not torch.allclose(before, contract(other, cache, user, rows))


@BOTH
def test_disabled_native_kernels_bind_the_contract_path(config, schema, batch, tiny_dataset: Path, monkeypatch) -> None:
    monkeypatch.setenv("PRERANK_NATIVE", "0")
    model = trained_like(schema, config)
    cache = build_item_cache(model, tiny_dataset)
    user, rows = user_row(batch, 2), torch.arange(3, 30)
    with torch.inference_mode():
        assert model._request(cache.states) is None
        torch.testing.assert_close(model.bind(cache.states)(user, rows, None), contract(model, cache, user, rows))


def test_a_rank_tower_that_does_not_fit_the_kernel_is_an_error(schema, tiny_dataset: Path) -> None:
    model = trained_like(schema, RankTowerConfig())
    cache = build_item_cache(model, tiny_dataset)
    fields = model.emb.fields_plan(model.sel.user)
    wrong = nn.Linear(len(model.sel.user) * model.config.embedding_dim, 5)
    tower = MlpPlan.build(wrong.in_features, [(wrong.weight.detach(), wrong.bias.detach(), NONE)])
    with torch.inference_mode(), pytest.raises(ValueError, match="the user tower maps"):
        rank_tower_request(fields, tower, model._native_kernel(cache.states))


def test_int_tower_parts_that_do_not_fit_are_errors(schema, tiny_dataset: Path) -> None:
    model = trained_like(schema, IntTowerConfig())
    cache = build_item_cache(model, tiny_dataset).states["heads"]
    fields = model.emb.fields_plan(model.sel.user)
    se = (model.user_se.linear.weight, model.user_se.linear.bias)
    layers = [(m.weight, m.bias, RELU) for m in model.user_layers]
    proj = [(m.weight, m.bias, NONE) for m in model.user_proj]
    with torch.inference_mode():
        assert int_tower_request(fields, se, layers, proj, cache, 0.0) is not None
        with pytest.raises(ValueError, match="Light-SE must be"):
            int_tower_request(fields, (se[0][:1], se[1]), layers, proj, cache, 0.0)
        with pytest.raises(ValueError, match="one projection per tower layer"):
            int_tower_request(fields, se, layers, proj[:2], cache, 0.0)
        with pytest.raises(ValueError, match="layer 0: weight"):
            int_tower_request(fields, se, layers[1:], proj[1:], cache, 0.0)
        with pytest.raises(ValueError, match="whole heads of 16 values"):
            int_tower_request(fields, se, layers, [(w[:8], b[:8], r) for w, b, r in proj], cache, 0.0)


def test_int_tower_in_training_or_with_wide_item_rows_binds_the_contract_path(schema, batch, tiny_dataset) -> None:
    """Item rows wider than sum_max_block.c takes (here 16 heads of 64) and training mode: no fused request."""
    model = trained_like(schema, IntTowerConfig(item_heads=16, head_dim=64))
    cache = build_item_cache(model, tiny_dataset)
    user, rows = user_row(batch, 3), torch.arange(0, 40)
    with torch.inference_mode():
        assert model._request(cache.states) is None
        torch.testing.assert_close(model.bind(cache.states)(user, rows, None), contract(model, cache, user, rows))
        assert trained_like(schema, IntTowerConfig()).train()._request(cache.states) is None


NO_SEQUENCES = ("user_id", "age", "user_ctr", "hour", "item_id", "category_id", "genres", "item_ctr")


@pytest.mark.parametrize("scorer", ["lss", "dot", "summax", "fc"])
@pytest.mark.parametrize("normalize", [False, True])
def test_fit_users_native_side_equals_the_contract(scorer: str, normalize: bool, schema, batch, tiny_dataset) -> None:
    """Every scorer (whose user part is a projection, a bias-free one for FC, or none), DIN with raw and softmax
    weights; the user side is one native call, then the scorer's kernel."""
    model = FIT(schema, FITConfig(scorer=scorer, features=NO_SEQUENCES)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.din.normalize = normalize
    cache = build_item_cache(model, tiny_dataset)
    rows = torch.randint(0, cache.num_items + 1, (37,))
    with torch.inference_mode():
        assert model._native_user() is not None
        run = model.bind(cache.states)
        for i in range(4):
            user = user_row(batch, i)
            want = contract(model, cache, user, rows)
            assert want.std() > 0.05  # scores that differ, so that a wrong user state shows
            torch.testing.assert_close(run(user, rows, None), want, rtol=1e-5, atol=1e-5)
            states = model.encode_user(user)["user"][0]
            torch.testing.assert_close(model._native_user()(user).view(states.shape), states, rtol=1e-5, atol=1e-5)
        bad = Batch(features={**user.features, "age": torch.tensor([schema.vocab("age")])})
        with pytest.raises(IndexError, match="feature 'age': an id is outside its table"):
            run(bad, rows, None)
        with pytest.raises(IndexError, match="candidate 1: row"):
            run(user, torch.tensor([1, cache.num_items + 1]), None)
    assert list(native.cache_dir().glob("fit_user-*.so"))


def test_fit_with_user_sequences_or_without_mqm_binds_the_contract_path(schema, batch, tiny_dataset) -> None:
    """DIN over behaviour sequences, and FIT without the MQM: the user side stays in PyTorch."""
    for model in (FIT(schema).eval(), FIT(schema, FITConfig(use_mqm=False)).eval()):
        cache = build_item_cache(model, tiny_dataset)
        user, rows = user_row(batch, 0), torch.arange(0, 40)
        with torch.inference_mode():
            assert model._native_user() is None
            torch.testing.assert_close(model.bind(cache.states)(user, rows, None), contract(model, cache, user, rows))


def test_fit_user_parts_that_do_not_fit_are_errors(schema) -> None:
    model = FIT(schema, FITConfig(features=NO_SEQUENCES)).eval()
    fields = model.emb.fields_plan(model.sel.user)
    meta = model.selector.meta
    unit, tower = model.din.unit.affine_layers(), model.user_tower.affine_layers()
    with torch.no_grad():
        fold = model.din.fold_queries(meta)
        assert fit_user(fields, fold, meta, unit[1:], False, tower) is not None
        with pytest.raises(ValueError, match="must end in one weight"):
            fit_user(fields, fold, meta, unit[1:2], False, tower)
        with pytest.raises(ValueError, match="do not fit"):
            fit_user(fields, fold, meta[:, :3], unit[1:], False, tower)
        with pytest.raises(ValueError, match="layer 0: weight"):
            fit_user(fields, fold, meta, unit[1:], False, tower[1:])
