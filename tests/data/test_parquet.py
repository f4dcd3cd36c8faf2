"""The streaming reader: batches, shuffling, sharding, and clear errors for bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_schema, tiny_table
from prerank.data.parquet import BatchStream, DataError, ParquetSplit, make_loader, write_dataset
from prerank.schema import FeatureSpec, Schema, SchemaError


def _dataset(tmp_path: Path, table: pa.Table, schema: Schema | None = None) -> Path:
    root = tmp_path / "ds"
    write_dataset(root, schema or tiny_schema(), {"train": table}, row_group_size=50)
    return root


def _all_rows(root: Path, **kw) -> list:  # type: ignore[no-untyped-def]
    return list(make_loader(root, "train", 32, **kw))


def test_every_row_once_in_order_without_shuffle(tmp_path: Path) -> None:
    table = tiny_table(301, 0)
    batches = _all_rows(_dataset(tmp_path, table))
    assert [len(b) for b in batches] == [32] * 9 + [13]
    got = torch.cat([b.features["user_id"] for b in batches]).numpy()
    np.testing.assert_array_equal(got, table.column("user_id").to_numpy())


def test_shuffle_is_a_seeded_permutation(tmp_path: Path) -> None:
    root = _dataset(tmp_path, tiny_table(301, 0))
    ids = lambda seed: torch.cat([b.request_id for b in _all_rows(root, shuffle=True, seed=seed)])  # noqa: E731
    plain = torch.cat([b.request_id for b in _all_rows(root)])
    a, b, c = ids(1), ids(1), ids(2)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    assert torch.equal(a.sort().values, plain.sort().values)


def test_shards_partition_the_rows(tmp_path: Path) -> None:
    split = ParquetSplit(_dataset(tmp_path, tiny_table(301, 0)), "train")
    seen = [sum(len(b) for b in BatchStream(split, 32, rank=r, world_size=3)) for r in range(3)]
    assert sum(seen) == 301 and all(s > 0 for s in seen)


def test_workers_read_every_row(tmp_path: Path) -> None:
    root = _dataset(tmp_path, tiny_table(301, 0))
    assert sum(len(b) for b in _all_rows(root, num_workers=2)) == 301


def test_sequences_keep_the_most_recent_ids(tmp_path: Path) -> None:
    schema = tiny_schema()
    table = tiny_table(3, 0)
    table = table.set_column(
        table.column_names.index("hist_item_id"),
        "hist_item_id",
        pa.array([[1, 2, 3, 4, 5, 6, 7, 8], [], [9]], pa.list_(pa.int32())),
    )
    (batch,) = _all_rows(_dataset(tmp_path, table, schema))
    seq = batch.features["hist_item_id"]
    assert seq.shape == (3, 6)
    assert seq[0].tolist() == [3, 4, 5, 6, 7, 8] and seq[1].tolist() == [0] * 6 and seq[2].tolist() == [9] + [0] * 5


def test_missing_column(tmp_path: Path) -> None:
    root = _dataset(tmp_path, tiny_table(10, 0).drop_columns(["age"]), tiny_schema())
    with pytest.raises(SchemaError, match="'age'"):
        _all_rows(root)


def test_wrong_dtype(tmp_path: Path) -> None:
    t = tiny_table(10, 0)
    t = t.set_column(t.column_names.index("age"), "age", pa.array(["x"] * 10))
    with pytest.raises(SchemaError, match="'age'"):
        _all_rows(_dataset(tmp_path, t))


def test_id_outside_vocabulary(tmp_path: Path) -> None:
    t = tiny_table(10, 0)
    t = t.set_column(t.column_names.index("age"), "age", pa.array([99] * 10, pa.int64()))
    with pytest.raises(DataError, match="'age'.*outside its vocabulary"):
        _all_rows(_dataset(tmp_path, t))


def test_nan_in_dense_feature(tmp_path: Path) -> None:
    t = tiny_table(10, 0)
    t = t.set_column(t.column_names.index("user_ctr"), "user_ctr", pa.array([np.nan] * 10, pa.float32()))
    with pytest.raises(DataError, match="'user_ctr'.*NaN"):
        _all_rows(_dataset(tmp_path, t))


def test_bad_label(tmp_path: Path) -> None:
    t = tiny_table(10, 0)
    t = t.set_column(t.column_names.index("label"), "label", pa.array([2.0] * 10, pa.float32()))
    with pytest.raises(DataError, match="'label'"):
        _all_rows(_dataset(tmp_path, t))


def test_empty_and_missing_files(tmp_path: Path) -> None:
    root = _dataset(tmp_path, tiny_table(10, 0))
    with pytest.raises(DataError, match="no Parquet files"):
        ParquetSplit(root, "valid")
    empty = root / "train" / "part-00000.parquet"
    pq.write_table(tiny_table(10, 0).slice(0, 0), empty)
    with pytest.raises(DataError, match="no rows"):
        ParquetSplit(root, "train")
    empty.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable Parquet"):
        ParquetSplit(root, "train")


def test_schema_mismatch_and_bad_schema(tmp_path: Path) -> None:
    other = Schema(features=(*tiny_schema().features, FeatureSpec("extra", "user", "categorical", vocab_size=3)))
    root = _dataset(tmp_path, tiny_table(10, 0))
    with pytest.raises(SchemaError, match="'extra'"):
        ParquetSplit(root, "train", other)
    (root / "schema.json").write_text("{not json")
    with pytest.raises(SchemaError, match="not valid JSON"):
        ParquetSplit(root, "train")
    with pytest.raises(SchemaError, match="tower"):
        FeatureSpec("x", "nowhere", "categorical", vocab_size=3)  # type: ignore[arg-type]


def test_schema_round_trip(tmp_path: Path) -> None:
    s = tiny_schema()
    s.save(tmp_path / "schema.json")
    assert Schema.load(tmp_path) == s
    assert s["user_cat_clicks"].cost_o == 3.0
