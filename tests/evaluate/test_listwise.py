"""Listwise evaluation: hand-computed metrics on a two-request case and an end-to-end run on a cascade."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from prerank.data.cascade import CascadeConfig, build_cascade
from prerank.data.parquet import ParquetSplit
from prerank.evaluate import metrics
from prerank.evaluate.listwise import (
    baseline_metrics,
    baseline_predictions,
    evaluate_listwise,
    hard_relevance,
    listwise_metrics,
    relevance,
)
from prerank.losses import build_loss
from prerank.models.registry import build_model
from prerank.schema import Schema
from prerank.train.checkpoint import load_model, save_checkpoint
from prerank.train.config import TrainConfig
from prerank.train.trainer import train_model


def hand_made() -> dict[str, np.ndarray]:
    """Request 1: [imp+, imp-, rank, random]; request 2: [imp+ (level 1), imp+ (level 3), pre-rank]."""
    return {
        "request_id": np.array([1, 1, 1, 1, 2, 2, 2]),
        "stage": np.array([0, 0, 1, 3, 0, 0, 2]),
        "label": np.array([1, 0, 0, 0, 1, 1, 0], dtype=np.float32),
        "label_level": np.array([2, 1, 0, 0, 1, 3, 0]),  # level 1 on the negative impression: exposure
        "logits": np.array([0.1, 0.15, 0.5, -1.0, 0.2, 0.3, 0.8], dtype=np.float32),
        "teacher_logit": np.array([3.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0], dtype=np.float32),
    }


def test_relevance_is_graded_on_positives_only() -> None:
    assert relevance(hand_made()).tolist() == [2, 0, 0, 0, 1, 3, 0]
    pred = hand_made()
    del pred["label_level"]
    assert relevance(pred).tolist() == [1, 0, 0, 0, 1, 1, 0]


def test_hand_computed_metrics() -> None:
    m = listwise_metrics(hand_made(), ks=(2, 10), cascade_k=1, cascade_ns=(2, 3))
    # top-2 by model: request 1 -> rows 2, 1 (positive row 0 missed); request 2 -> rows 6, 5 (one of two positives)
    assert m["recall@2"] == pytest.approx((0.0 + 0.5) / 2)
    assert m["recall@10"] == pytest.approx(1.0)
    ndcg2 = (2**3 - 1) / math.log2(3) / ((2**3 - 1) + (2**1 - 1) / math.log2(3))
    assert m["ndcg@2"] == pytest.approx((0.0 + ndcg2) / 2)
    assert m["recall@2_requests_used"] == 2
    # teacher top-1: request 1 row 0 (not in model top-2), request 2 row 5 (in model top-2)
    assert m["cascade_recall@1/2"] == pytest.approx(0.5)
    # N = 3: request 1 keeps row 0 in its top 3; request 2 has only 3 rows and loses nothing, so it is skipped
    assert m["cascade_recall@1/3"] == pytest.approx(1.0)
    assert m["cascade_recall@1/3_requests_skipped"] == 1
    imp = hand_made()["stage"] == 0
    assert m["impressions"] == 4
    assert m["auc"] == pytest.approx(roc_auc_score(hand_made()["label"][imp], hand_made()["logits"][imp]))
    assert m["gauc"] == pytest.approx(0.0)  # request 1: its positive scores below its negative
    assert m["gauc_requests_skipped"] == 1  # request 2 has positives only
    assert m["requests"] == 2 and m["list_len_mean"] == 3.5


def test_undefined_metrics_are_nan_not_errors() -> None:
    pred = hand_made()
    pred["label"] = np.zeros(7, dtype=np.float32)
    m = listwise_metrics(pred, ks=(2,), cascade_ns=(50,))
    assert math.isnan(m["recall@2"]) and math.isnan(m["auc"]) and math.isnan(m["gauc"])
    assert math.isnan(m["cascade_recall@5/50"])  # no list longer than 50


def test_bad_input_is_an_error() -> None:
    pred = hand_made()
    pred["logits"] = np.full(7, np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        listwise_metrics(pred)
    with pytest.raises(ValueError, match="request_id"):
        listwise_metrics({"logits": np.zeros(3), "label": np.zeros(3)})


@pytest.fixture
def cascade(tiny_dataset: Path, tmp_path: Path, schema: Schema) -> tuple[Path, Path]:
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, "two_tower", build_model("two_tower", schema))
    out = tmp_path / "cascade"
    cfg = CascadeConfig(
        retrieve=8, rank_candidates=4, prerank_candidates=4, random=4, cross="pad", rank_cut="teacher_top"
    )
    build_cascade(tiny_dataset, teacher, out, cfg)
    return out, teacher


def test_teacher_as_model_keeps_its_own_top_k(cascade: tuple[Path, Path]) -> None:
    data, teacher = cascade
    _, model, _ = load_model(teacher)
    m = evaluate_listwise(model, data, "test", ks=(5, 10), cascade_ns=(10,))
    assert m["cascade_recall@5/10"] == pytest.approx(1.0)
    assert m["cascade_recall@5/10_requests_used"] == 16
    assert m["rows"] == 128 + 16 * 12 and m["impressions"] == 128
    assert 0.0 <= m["recall@5"] <= m["recall@10"] <= 1.0
    assert 0.0 <= m["ndcg@10"] <= 1.0


def test_cli_evaluate(cascade: tuple[Path, Path], tmp_path: Path) -> None:
    import prerank.cli.cascade  # noqa: F401  (registers the commands)
    from prerank.cli import app

    data, _teacher = cascade
    ckpt = tmp_path / "student.pt"
    save_checkpoint(ckpt, "lr", build_model("lr", Schema.load(data)))
    result = CliRunner().invoke(
        app, ["cascade", "evaluate", "-c", str(ckpt), "-d", str(data), "--ks", "5,10", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{") :])
    assert out["model"] == "lr" and "ndcg@10" in out and "cascade_recall@5/50" in out
    bad = CliRunner().invoke(app, ["cascade", "evaluate", "-c", str(_teacher), "-d", str(data), "--ks", "x"])
    assert bad.exit_code == 2


def test_baselines_popularity_and_teacher(cascade: tuple[Path, Path], tmp_path: Path) -> None:
    import prerank.cli.cascade  # noqa: F401  (registers the commands)
    from prerank.cli import app

    data, teacher = cascade
    preds = baseline_predictions(data, "test")
    # popularity is log1p of the item's training impressions, computed here independently
    t = pq.read_table(ParquetSplit(data, "train").files, columns=["item_id", "stage"])
    shown = t.column("item_id").to_numpy()[t.column("stage").to_numpy() == 0]
    test_items = pq.read_table(ParquetSplit(data, "test").files, columns=["item_id"]).column(0).to_numpy()
    want = np.log1p([(shown == i).sum() for i in test_items])
    assert np.allclose(preds["popularity"]["logits"], want)
    m = baseline_metrics(data, "test", ks=(5,), cascade_ns=(10,))
    _, model, _ = load_model(teacher)
    assert m["teacher"]["cascade_recall@5/10"] == pytest.approx(1.0)
    assert m["teacher"]["auc"] == pytest.approx(evaluate_listwise(model, data, "test", ks=(5,))["auc"], abs=1e-5)
    assert 0.0 <= m["popularity"]["exposure_auc"] <= 1.0
    result = CliRunner().invoke(app, ["cascade", "baselines", "-d", str(data), "--ks", "5"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"split", "popularity", "teacher"}
    plain = tmp_path / "plain"
    bad = CliRunner().invoke(app, ["cascade", "baselines", "-d", str(plain)])
    assert bad.exit_code == 2


def test_exposure_auc_is_the_auc_of_impressions_against_unexposed_rows() -> None:
    pred = {
        "logits": np.array([3.0, 1.0, 2.0, 0.0]),
        "label": np.array([1.0, 0.0, 0.0, 0.0]),
        "request_id": np.array([1, 1, 1, 1]),
        "stage": np.array([0, 0, 1, 3]),
    }
    assert listwise_metrics(pred, ks=(2,))["exposure_auc"] == pytest.approx(
        0.75
    )  # 3 of the 4 (shown, unshown) pairs in order
    assert "exposure_auc" not in listwise_metrics({**pred, "stage": np.zeros(4, dtype=np.int64)}, ks=(2,))


def test_hard_label_metrics_count_every_impression() -> None:
    """RankTower's hard label: feedback + 1 on impressions; [3, 1, 0, 0] and [2, 4, 0] here."""
    pred = hand_made()
    assert hard_relevance(pred).tolist() == [3, 1, 0, 0, 2, 4, 0]
    out = listwise_metrics(pred, ks=(1, 2, 3))
    # request 1 ranks rank, imp-, imp+, random; request 2 ranks pre-rank, imp(4), imp(2)
    assert out["hard_recall@1"] == 0.0
    assert out["hard_recall@2"] == pytest.approx(0.5)
    assert out["hard_recall@3"] == pytest.approx(1.0)
    assert out["recall@2"] == pytest.approx((0.0 + 0.5) / 2)  # clicks only: imp+ of request 1 is 3rd
    expected = metrics.ndcg_at_k(np.array([3, 1, 0, 0, 2, 4, 0.0]), pred["logits"], pred["request_id"], 2).value
    assert out["hard_ndcg@2"] == pytest.approx(expected)
    pred["stage"] = np.zeros_like(pred["stage"])  # impressions only: every row would be relevant
    assert "hard_recall@1" not in listwise_metrics(pred, ks=(1,))
    del pred["stage"]
    assert "hard_recall@1" not in listwise_metrics(pred, ks=(1,))


def test_training_can_stop_early_on_a_listwise_metric(cascade: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = cascade
    config = TrainConfig(epochs=1, threads=1, progress=False, metric="ndcg@10", batching="requests")
    out = tmp_path / "run"
    result = train_model("two_tower", data, out, config=config, loss=build_loss("hybrid"), log=lambda _: None)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"valid_recall@10", "valid_ndcg@10", "valid_hard_recall@10", "valid_hard_ndcg@10"} <= set(record)
    assert result.best_metric == pytest.approx(record["valid_ndcg@10"])
