"""The ranking teacher: every feature, DIN over sequences that share the item table, a big MLP."""

from __future__ import annotations

import pytest
import torch

from prerank.bench.cost import score_cost
from prerank.data.batch import Batch
from prerank.models.base import ConfigError
from prerank.models.ranker import Ranker, RankerConfig
from prerank.schema import Schema

SMALL = RankerConfig(hidden=(32, 16))


def test_uses_every_feature_and_attends_over_the_item_history(schema: Schema) -> None:
    model = Ranker(schema, SMALL)
    assert set(model.sel.user + model.sel.item + model.sel.cross) == set(schema.names)
    assert model.attended == {"hist_item_id": model.sel.item.index("item_id")}
    assert "hist_item_id" not in model.user_fields and "genres" in model.sel.item
    assert RankerConfig().hidden == (1024, 512, 256)


def test_state_shapes(schema: Schema, batch: Batch) -> None:
    model = Ranker(schema, SMALL)
    user, item = model.encode_user(batch), model.encode_item(batch)
    assert user["fields"].shape == (len(batch), len(model.user_fields), 16)
    assert user["seq:hist_item_id"].shape == (len(batch), 6, 16)
    assert user["mask:hist_item_id"].shape == (len(batch), 6)
    assert item["fields"].shape == (len(batch), len(model.sel.item), 16)


def test_history_is_read_against_the_target_item(schema: Schema, batch: Batch) -> None:
    """DIN: the history's contribution depends on the candidate, and an empty history contributes nothing."""
    model = Ranker(schema, SMALL).eval()
    hist = batch.features["hist_item_id"]
    with torch.no_grad():
        query = model.emb.field(batch, "item_id")
        keys, mask = model.emb.sequence(batch, "hist_item_id")
        pooled = model.attention["hist_item_id"](query, keys, mask)
        other = model.attention["hist_item_id"](query.roll(1, 0), keys, mask)
    has_history = (hist > 0).any(-1)
    assert not torch.allclose(pooled[has_history], other[has_history])
    assert (pooled[~has_history] == 0).all()
    without = Batch(features={**batch.features, "hist_item_id": torch.zeros_like(hist)})
    with torch.no_grad():
        assert not torch.allclose(model(batch)[has_history], model(without)[has_history])


def test_without_the_item_id_the_history_is_pooled(schema: Schema, batch: Batch) -> None:
    names = tuple(n for n in schema.names if n != "item_id")
    model = Ranker(schema, RankerConfig(hidden=(8,), features=names)).eval()
    assert model.attended == {} and "hist_item_id" in model.user_fields
    assert model(batch).shape == (len(batch),)


def test_cross_features_are_required(schema: Schema, batch: Batch) -> None:
    model = Ranker(schema, SMALL).eval()
    with pytest.raises(ValueError, match="cross features"):
        model.score(model.encode_user(batch), model.encode_item(batch), None)


def test_bad_config(schema: Schema) -> None:
    with pytest.raises(ConfigError, match="hidden"):
        Ranker(schema, RankerConfig(hidden=()))


def test_score_cost_covers_attention_and_the_whole_mlp(schema: Schema, batch: Batch) -> None:
    model = Ranker(schema)
    cost = score_cost(model, batch)
    n_fields = len(model.user_fields) + len(model.attended) + len(model.sel.item) + len(model.sel.cross)
    mlp = 2 * (n_fields * 16 * 1024 + 1024 * 512 + 512 * 256 + 256)
    din = 2 * 6 * (4 * 16 * 64 + 64 * 32 + 32)  # the activation unit over 6 behaviours
    assert mlp + din <= cost["score_flops_per_candidate"] <= 1.2 * (mlp + din)
