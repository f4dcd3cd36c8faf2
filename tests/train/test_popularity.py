"""The popularity baseline of ``prerank compare --popularity``: the item's smoothed train click rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from prerank.data.parquet import write_dataset
from prerank.schema import FeatureSpec, Schema
from prerank.train.compare import popularity_predictions

SCHEMA = Schema(
    name="pop",
    features=(
        FeatureSpec("user_id", "user", "categorical", vocab_size=4),
        FeatureSpec("item_id", "item", "categorical", vocab_size=4),
    ),
)


def _table(items: list[int], labels: list[int]) -> pa.Table:
    n = len(items)
    return pa.table(
        {
            "request_id": pa.array(np.arange(n) % 2, pa.int64()),
            "label": pa.array(np.array(labels, np.float32)),
            "user_id": pa.array(np.ones(n, np.int64)),
            "item_id": pa.array(np.array(items, np.int64)),
        }
    )


def test_scores_are_the_smoothed_train_rates_and_unseen_items_the_mean(tmp_path: Path) -> None:
    # train: item 1 clicked 3 of 4, item 2 clicked 0 of 4; overall rate 3/8
    train = _table([1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 0, 0, 0, 0, 0])
    test = _table([1, 2, 3, 0], [1, 0, 1, 0])
    write_dataset(tmp_path, SCHEMA, {"train": train, "valid": test, "test": test})
    pred = popularity_predictions(tmp_path, "test", smoothing=4.0)
    rate = 3 / 8
    expected = np.array([(3 + 4 * rate) / 8, (0 + 4 * rate) / 8, rate, rate])
    assert 1 / (1 + np.exp(-pred["logits"])) == pytest.approx(expected)
    assert pred["label"].tolist() == [1, 0, 1, 0] and pred["request_id"].tolist() == [0, 1, 0, 1]
