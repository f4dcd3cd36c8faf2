"""A served RankTower request in one native call (PreRanker.bind, prerank.kernels.request): equal to the contract's
path, bounds-checked, and falling back to it wherever the fused call does not apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from prerank.data.batch import Batch
from prerank.kernels import native
from prerank.kernels.mlp import MlpPlan
from prerank.kernels.request import rank_tower_request
from prerank.models.rank_tower import RankTower, RankTowerConfig
from prerank.serve.export import build_item_cache
from prerank.serve.scorer import Scorer

pytestmark = [
    pytest.mark.usefixtures("fresh_kernels"),
    pytest.mark.skipif(native.compiler() is None, reason="no C compiler (cc/gcc or $CC): no native kernel here"),
]


def trained_like(schema, config: RankTowerConfig = RankTowerConfig()) -> RankTower:
    """A RankTower whose parameters are away from their initial values (LayerNorm and biases included)."""
    model = RankTower(schema, config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def user_row(batch: Batch, i: int) -> Batch:
    return Batch(features={k: v[i : i + 1].contiguous() for k, v in batch.features.items()})


def contract(model: RankTower, cache, user: Batch, rows: torch.Tensor) -> torch.Tensor:
    """``score(encode_user(user), gathered rows)``: what the bound request must equal."""
    return model.score(model.encode_user(user), cache.gather(rows))


@pytest.mark.parametrize(
    "config",
    [RankTowerConfig(), RankTowerConfig(user_heads=3, item_heads=5, head_dim=7, hidden=(24, 12), bias=False)],
)
@pytest.mark.parametrize("lanes", ["8", "16"])
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_the_bound_request_equals_the_contract(
    config: RankTowerConfig, lanes: str, cache_dtype: str, schema, batch, tiny_dataset: Path, monkeypatch
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
    assert list(native.cache_dir().glob("rank_tower_request-*.so"))


def test_bad_ids_and_rows_are_named(schema, batch, tiny_dataset: Path) -> None:
    model = trained_like(schema)
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


def test_other_inputs_and_autograd_take_the_contract_path(schema, batch, tiny_dataset: Path) -> None:
    """An int32 id, a strided sequence or gradients on: the fused call does not apply, and the default path scores."""
    model = trained_like(schema)
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


def test_binding_again_follows_new_weights_and_old_bindings_stay_safe(schema, batch, tiny_dataset: Path) -> None:
    model, other = trained_like(schema), trained_like(schema)
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


def test_disabled_native_kernels_bind_the_contract_path(schema, batch, tiny_dataset: Path, monkeypatch) -> None:
    monkeypatch.setenv("PRERANK_NATIVE", "0")
    model = trained_like(schema)
    cache = build_item_cache(model, tiny_dataset)
    user, rows = user_row(batch, 2), torch.arange(3, 30)
    with torch.inference_mode():
        assert model._request(cache.states) is None
        torch.testing.assert_close(model.bind(cache.states)(user, rows, None), contract(model, cache, user, rows))


def test_a_tower_that_does_not_fit_the_kernel_is_an_error(schema, tiny_dataset: Path) -> None:
    model = trained_like(schema)
    cache = build_item_cache(model, tiny_dataset)
    fields = model.emb.fields_plan(model.sel.user)
    wrong = nn.Linear(len(model.sel.user) * model.config.embedding_dim, 5)
    tower = MlpPlan.build(wrong.in_features, [(wrong.weight.detach(), wrong.bias.detach(), False)])
    with torch.inference_mode(), pytest.raises(ValueError, match="the user tower maps"):
        rank_tower_request(fields, tower, model._native_kernel(cache.states))
