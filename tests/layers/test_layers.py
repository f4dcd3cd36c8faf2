"""Shared layers: embedding lookups equal their modules, DIN's shared-query path equals its forward."""

from __future__ import annotations

import pytest
import torch

from prerank.data.batch import Batch
from prerank.layers.attention import DINAttention
from prerank.layers.embedding import EmbeddingTables
from prerank.schema import Schema


def test_fields_equal_the_modules_forward(schema: Schema, batch: Batch) -> None:
    emb = EmbeddingTables(schema, 8)
    with torch.no_grad():
        for lin in emb.dense.values():
            lin.bias.normal_()  # zero at init: make the bias term count
    for f in schema.features:
        x = batch.features[f.name]
        if f.kind == "dense":
            expected = emb.dense[f.name](x.unsqueeze(-1))
        elif f.kind == "categorical":
            expected = emb.tables[f.table](x)
        else:
            e, mask = emb.tables[f.table](x), (x > 0).unsqueeze(-1).float()
            expected = (e * mask).sum(-2) / mask.sum(-2).clamp_min(1.0)
        torch.testing.assert_close(emb.field(batch, f.name), expected)
    # padding (id 0) still gets no gradient
    emb.fields(batch, schema.names).sum().backward()
    assert emb.tables["item_id"].weight.grad[0].abs().sum() == 0
    assert all(lin.weight.grad is not None for lin in emb.dense.values())


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_din_shared_queries_equal_the_forward(normalize: bool, masked: bool) -> None:
    torch.manual_seed(0)
    din = DINAttention(8, (16, 4), normalize=normalize)
    query, keys = torch.randn(5, 8), torch.randn(3, 6, 8)
    mask = torch.rand(3, 6) > 0.4 if masked else None
    if masked:
        mask[0] = False  # a row without any behaviour pools to 0
    expected = din(query.expand(3, -1, -1), keys, mask)
    torch.testing.assert_close(din.shared_queries(query, keys, mask), expected)
    with torch.no_grad():
        torch.testing.assert_close(din.shared_queries(query, keys, mask), expected)


def test_din_shared_queries_follow_weight_changes_and_train() -> None:
    torch.manual_seed(0)
    din = DINAttention(8, (16, 4))
    query, keys = torch.nn.Parameter(torch.randn(5, 8)), torch.randn(2, 4, 8)
    with torch.inference_mode():
        before = din.shared_queries(query, keys)
    other = DINAttention(8, (16, 4)).state_dict()
    din.load_state_dict(other)  # the folded first layer follows a weight change ...
    with torch.no_grad():
        query.mul_(2.0)  # ... and after the query changes in place
        after = din.shared_queries(query, keys)
        torch.testing.assert_close(after, din(query.expand(2, -1, -1), keys))
    assert not torch.allclose(before, after)
    # with autograd on, the folded layer is differentiable: gradient reaches the first layer and the query
    din.shared_queries(query, keys).sum().backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    assert din.unit[0].weight.grad is not None and din.unit[0].weight.grad.abs().sum() > 0
