"""Shared fixtures: a tiny schema covering every tower and kind, and random data for it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from prerank.data.batch import Batch
from prerank.data.parquet import table_to_batch, write_dataset
from prerank.schema import FeatureSpec, Schema

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def taobao_sample() -> Path:
    """The real Taobao UserBehavior sample under ../shared/data; the test skips, saying so, where it is absent."""
    raw = SHARED_DATA / "taobao-user-behavior" / "UserBehavior_first814users.csv.gz"
    if not raw.exists():
        pytest.skip(f"real Taobao sample not found at {raw} (see its PROVENANCE.md)")
    return raw


def tiny_schema() -> Schema:
    return Schema(
        name="tiny",
        features=(
            FeatureSpec("user_id", "user", "categorical", vocab_size=30, cost_type="I"),
            FeatureSpec("age", "user", "categorical", vocab_size=5, cost_type="I"),
            FeatureSpec("user_ctr", "user", "dense", cost_type="II"),
            FeatureSpec("hist_item_id", "user", "sequence", max_len=6, shares="item_id", cost_type="III", n_values=6),
            FeatureSpec("hour", "context", "categorical", vocab_size=25, cost_type="I"),
            FeatureSpec("item_id", "item", "categorical", vocab_size=40, cost_type="I"),
            FeatureSpec("category_id", "item", "categorical", vocab_size=8, cost_type="I"),
            FeatureSpec("genres", "item", "sequence", vocab_size=10, max_len=3, cost_type="I", n_values=3),
            FeatureSpec("item_ctr", "item", "dense", cost_type="II"),
            FeatureSpec("user_cat_affinity", "cross", "dense", cost_type="III"),
            FeatureSpec("user_cat_clicks", "cross", "categorical", vocab_size=6, cost_type="IV"),
        ),
        has_label_level=True,
    )


def tiny_table(n: int = 64, seed: int = 0, schema: Schema | None = None) -> pa.Table:
    schema = schema or tiny_schema()
    rng = np.random.default_rng(seed)
    cols: dict[str, pa.Array] = {
        "request_id": pa.array(rng.integers(0, max(n // 8, 1), n), pa.int64()),
        "label": pa.array(rng.integers(0, 2, n).astype(np.float32)),
        "label_level": pa.array(rng.integers(0, 3, n).astype(np.int8)),
    }
    for f in schema.features:
        if f.kind == "dense":
            cols[f.name] = pa.array(rng.random(n).astype(np.float32))
        elif f.kind == "categorical":
            cols[f.name] = pa.array(rng.integers(1, f.vocab_size, n), pa.int64())
        else:
            vocab = schema.vocab(f.name)
            lens = rng.integers(0, f.max_len + 3, n)
            cols[f.name] = pa.array(
                [list(rng.integers(1, vocab, k).astype(np.int32)) for k in lens], pa.list_(pa.int32())
            )
    return pa.table(cols)


def narrow_dataset(wide: Path, root: Path, drop: str = "user_cat_affinity") -> Path:
    """The dataset ``wide`` without feature ``drop`` (as a default feature set beside a recipe's ``wide`` one): the
    same rows, cut into other files and row groups."""
    import pyarrow.parquet as pq

    schema = Schema.load(wide)
    narrow = replace(schema, features=tuple(f for f in schema.features if f.name != drop))
    tables = {s: pq.read_table(wide / s).drop_columns([drop]) for s in ("train", "valid", "test")}
    write_dataset(root, narrow, tables, items=pq.read_table(wide / "items.parquet"), row_group_size=37)
    return root


@pytest.fixture
def schema() -> Schema:
    return tiny_schema()


@pytest.fixture
def batch(schema: Schema) -> Batch:
    return table_to_batch(tiny_table(64, 0, schema), schema)


@pytest.fixture
def tiny_dataset(tmp_path: Path, schema: Schema) -> Path:
    root = tmp_path / "tiny"
    items = tiny_table(39, 9, schema).select([f.name for f in schema.tower("item")])
    items = items.set_column(items.column_names.index("item_id"), "item_id", pa.array(np.arange(1, 40), pa.int64()))
    write_dataset(
        root,
        schema,
        {"train": tiny_table(512, 1, schema), "valid": tiny_table(128, 2, schema), "test": tiny_table(128, 3, schema)},
        items=items,
        row_group_size=100,
    )
    return root


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
