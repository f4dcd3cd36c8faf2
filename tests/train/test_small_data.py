"""Defaults that work on small data: with batch size and epochs chosen from the rows (auto_schedule), every model of
a representative set beats a popularity scorer (the item's click rate on the train split) on test AUC."""

from __future__ import annotations

from pathlib import Path

import pytest

from prerank.data.synthetic import generate
from prerank.train.compare import MODEL_TRAIN_DEFAULTS, popularity_predictions
from prerank.train.config import TrainConfig
from prerank.train.trainer import evaluate_predictions, evaluate_split, train_model

MODELS = ("lr", "two_tower", "cold", "int_tower", "fit", "rank_tower", "fscd_preranker", "distilled_dssm")


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
    baseline = evaluate_predictions(popularity_predictions(small_log))["auc"]
    assert auc > baseline, f"{name}: test AUC {auc:.4f} <= popularity {baseline:.4f}"
