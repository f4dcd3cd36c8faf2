"""LR: the logit is the bias plus one weight per feature."""

from __future__ import annotations

import pytest
import torch

from prerank.data.batch import Batch
from prerank.models.lr import LR, LRConfig
from prerank.schema import Schema


@pytest.mark.parametrize("use_cross", [True, False])
def test_logit_is_the_sum_of_feature_weights(use_cross: bool, schema: Schema, batch: Batch) -> None:
    """Dense features scored by a fused multiply-add equal their ``nn.Linear`` weights."""
    model = LR(schema, LRConfig(use_cross=use_cross)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        names = model.sel.user + model.sel.item + model.sel.cross
        expected = model.bias + sum(model.weights.field(batch, n).squeeze(-1) for n in names)
        torch.testing.assert_close(model(batch), expected)
    assert any(schema[n].kind == "dense" for n in model.sel.cross) == use_cross


def test_cross_features_are_required(schema: Schema, batch: Batch) -> None:
    model = LR(schema)
    with pytest.raises(ValueError, match="cross features"):
        model.score(model.encode_user(batch), model.encode_item(batch), None)
