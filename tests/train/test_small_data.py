"""Defaults that work on small data: with batch size and epochs chosen from the rows (auto_schedule), every model of
a representative set beats a popularity scorer (the item's click rate on the train split) on test AUC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prerank.data.synthetic import generate
from prerank.evaluate import metrics
from prerank.train.compare import MODEL_TRAIN_DEFAULTS
from prerank.train.config import TrainConfig
from prerank.train.trainer import evaluate_split, train_model

MODELS = ("lr", "two_tower", "cold", "int_tower", "fit", "rank_tower", "fscd_preranker", "distilled_dssm")


def _read(root: Path, split: str) -> pa.Table:
    files = sorted((root / split).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=["item_id", "label"]) for f in files])


def popularity_auc(root: Path, smoothing: float = 10.0) -> float:
    """Test AUC of scoring each row by its item's train click rate (smoothed towards the overall rate)."""
    train, test = _read(root, "train"), _read(root, "test")
    items, labels = train["item_id"].to_numpy(), train["label"].to_numpy()
    size = int(max(items.max(), test["item_id"].to_numpy().max())) + 1
    shown = np.bincount(items, minlength=size)
    clicked = np.bincount(items, weights=labels, minlength=size)
    ctr = (clicked + smoothing * labels.mean()) / (shown + smoothing)
    return metrics.auc(test["label"].to_numpy(), ctr[test["item_id"].to_numpy()])


@pytest.fixture(scope="module")
def small_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("small") / "data", rows=12_000, seed=0, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_model_beats_popularity_on_a_small_log(small_log: Path, tmp_path: Path, name: str) -> None:
    # ~9.4k training rows: auto_schedule picks batch 64 and up to 14 epochs; early stopping on valid AUC
    config = TrainConfig(threads=2, progress=False, **MODEL_TRAIN_DEFAULTS.get(name, {}))
    result = train_model(name, small_log, tmp_path / name, config=config, log=lambda _: None)
    assert result.auto == ("batch_size", "epochs")
    auc = evaluate_split(result.model, small_log, "test")["auc"]
    baseline = popularity_auc(small_log)
    assert auc > baseline, f"{name}: test AUC {auc:.4f} <= popularity {baseline:.4f}"
