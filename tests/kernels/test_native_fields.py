"""The native one-row field lookups (prerank.kernels.fields) against EmbeddingTables' PyTorch path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prerank.data.batch import Batch
from prerank.kernels import native
from prerank.layers.embedding import EmbeddingTables
from prerank.schema import Schema

pytestmark = pytest.mark.usefixtures("fresh_kernels")
needs_cc = pytest.mark.skipif(
    native.compiler() is None, reason="no C compiler (cc/gcc or $CC): the native kernel cannot be built here"
)


def torch_fields(emb: EmbeddingTables, batch: Batch, names: tuple[str, ...]) -> torch.Tensor:
    return torch.stack([emb.field(batch, n) for n in names], dim=-2)


def with_sum_pooling(schema: Schema) -> Schema:
    """The tiny schema with its item sequence pooled by sum (the user one stays mean-pooled)."""
    feats = tuple(dataclasses.replace(f, pooling="sum") if f.name == "genres" else f for f in schema.features)
    return dataclasses.replace(schema, features=feats)


@needs_cc
def test_one_row_equals_the_pytorch_path(schema: Schema, batch: Batch) -> None:
    """Categorical, dense, mean- and sum-pooled sequences, with an empty sequence and id 0 among the rows."""
    schema = with_sum_pooling(schema)
    emb = EmbeddingTables(schema, 8)
    with torch.no_grad():  # padding rows and biases away from zero, so that wrongly including them shows
        for p in emb.parameters():
            p.add_(torch.randn_like(p))
    feats = dict(batch.features)
    feats["hist_item_id"] = feats["hist_item_id"].clone()
    feats["hist_item_id"][1] = 0
    feats["age"] = feats["age"].clone()
    feats["age"][2] = 0
    names = tuple(schema.names)
    with torch.inference_mode():
        for i in range(4):
            row = Batch(features={k: v[i : i + 1] for k, v in feats.items()})
            out = emb.fields(row, names)
            assert out.shape == (1, len(names), 8)
            torch.testing.assert_close(out, torch_fields(emb, row, names), rtol=1e-6, atol=1e-6)
    assert list(native.cache_dir().glob("fields-*.so"))


@needs_cc
def test_an_id_outside_its_table_is_named(schema: Schema, batch: Batch) -> None:
    emb = EmbeddingTables(schema, 4)
    row = {k: v[:1] for k, v in batch.features.items()}
    with torch.inference_mode(), pytest.raises(IndexError, match=r"feature 'age': an id is outside its table \[0, 5\)"):
        emb.fields(Batch(features={**row, "age": torch.tensor([5])}), ("user_id", "age"))


def test_batches_autograd_and_other_dtypes_take_pytorch(schema: Schema, batch: Batch) -> None:
    """Several rows, autograd, a non-int64 id or a strided sequence: the PyTorch path."""
    emb = EmbeddingTables(schema, 4)
    names = ("user_id", "user_ctr", "hist_item_id")
    row = Batch(features={k: v[:1] for k, v in batch.features.items()})
    assert emb.fields(row, names).requires_grad
    with torch.no_grad():
        torch.testing.assert_close(emb.fields(batch, names), torch_fields(emb, batch, names))
        int32 = Batch(features={**row.features, "user_id": row.features["user_id"].int()})
        torch.testing.assert_close(emb.fields(int32, names), torch_fields(emb, row, names))
        strided = Batch(features={**row.features, "hist_item_id": batch.features["hist_item_id"][:1, ::2]})
        assert not strided.features["hist_item_id"].is_contiguous()
        torch.testing.assert_close(emb.fields(strided, names), torch_fields(emb, strided, names))
    assert not list(native.cache_dir().glob("fields-*.so"))
