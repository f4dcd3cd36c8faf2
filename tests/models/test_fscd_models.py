"""FSCD's ranking and pre-ranking networks: registered sizes, feature subsets, the first-layer split."""

from __future__ import annotations

import pytest
import torch

from prerank.data.batch import Batch
from prerank.models.base import ConfigError
from prerank.models.fscd import FSCDConfig, FSCDNet
from prerank.models.registry import build_model, model_config
from prerank.schema import Schema


def test_registered_sizes_are_the_papers() -> None:
    assert model_config("fscd_ranker").hidden == (1024, 512, 256)
    assert model_config("fscd_preranker").hidden == (1024, 256)
    assert model_config("fscd_preranker").features is None


def test_split_equals_unsplit_first_layer(schema: Schema, batch: Batch) -> None:
    model = FSCDNet(schema, FSCDConfig(hidden=(32, 8))).eval()
    with torch.no_grad():
        ones = torch.ones(len(model.names))
        torch.testing.assert_close(model(batch), model.gated_logits(batch, ones), rtol=1e-5, atol=1e-6)
    # the user state is one H1 vector per request; the item state one H1 vector per item
    assert model.encode_user(batch)["proj"].shape == (len(batch), 32)
    assert model.encode_item(batch)["proj"].shape == (len(batch), 32)


def test_feature_subset(schema: Schema, batch: Batch) -> None:
    model = build_model(
        "fscd_preranker", schema, {"features": ["age", "hour", "item_id", "user_cat_clicks"], "hidden": [16, 4]}
    )
    assert model.names == ("age", "hour", "item_id", "user_cat_clicks")
    assert model(batch).shape == (len(batch),)
    no_cross = build_model("fscd_preranker", schema, {"features": ["age", "item_id"], "hidden": [16, 4]})
    assert no_cross.sel.cross == ()
    with pytest.raises(ConfigError, match="not in the schema"):
        build_model("fscd_preranker", schema, {"features": ["nope", "item_id"]})
    with pytest.raises(ConfigError):
        build_model("fscd_preranker", schema, {"hidden": []})
