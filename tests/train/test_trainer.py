from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prerank.io import CheckpointError
from prerank.models.base import ConfigError
from prerank.train.checkpoint import load_model, read_checkpoint
from prerank.train.config import TrainConfig
from prerank.train.trainer import evaluate_split, train_model

FAST = TrainConfig(epochs=2, batch_size=64, threads=1, progress=False, patience=5)


def test_train_writes_checkpoints_and_metrics(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train_model("two_tower", tiny_dataset, out, config=FAST, log=lambda _: None)
    assert result.epochs == 2
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    keys = {"valid_auc", "valid_logloss", "valid_gauc", "train_loss", "samples_per_second", "train_cpu_seconds"}
    assert keys <= set(lines[0])
    assert lines[0]["train_cpu_seconds"] > 0
    assert result.samples_per_second > 0
    name, model, _ = load_model(out / "best.pt")
    assert name == "two_tower"
    metrics = evaluate_split(model, tiny_dataset, "test")
    assert 0.0 <= metrics["auc"] <= 1.0 and metrics["logloss"] > 0


def test_training_reduces_loss_and_is_deterministic(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=3, batch_size=64, threads=1, progress=False, patience=5, lr=1e-2)
    a = train_model("lr", tiny_dataset, tmp_path / "a", config=cfg, log=lambda _: None)
    b = train_model("lr", tiny_dataset, tmp_path / "b", config=cfg, log=lambda _: None)
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_unset_batch_and_epochs_are_chosen_from_the_rows_and_recorded(tiny_dataset: Path, tmp_path: Path) -> None:
    from prerank.train.config import auto_schedule

    messages: list[str] = []
    cfg = TrainConfig(epochs=1, threads=1, progress=False)  # batch size left to auto_schedule, epochs explicit
    result = train_model("lr", tiny_dataset, tmp_path / "run", config=cfg, log=messages.append)
    assert result.auto == ("batch_size",) and result.config is not None
    assert result.config.batch_size == auto_schedule(512)[0] and result.config.epochs == 1
    assert any(m.startswith("lr auto: batch 64 for 512 training rows") for m in messages), messages
    assert read_checkpoint(tmp_path / "run" / "last.pt")["trainer"]["config"]["batch_size"] == 64
    explicit = train_model("lr", tiny_dataset, tmp_path / "explicit", config=FAST, log=messages.append)
    assert explicit.auto == () and explicit.config == FAST


def test_resume_continues_from_last_epoch(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_model("lr", tiny_dataset, out, config=FAST, log=lambda _: None)
    longer = TrainConfig(**{**FAST.to_dict(), "epochs": 3})
    messages: list[str] = []
    result = train_model("lr", tiny_dataset, out, config=longer, resume=True, log=messages.append)
    assert any("resuming" in m for m in messages)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert read_checkpoint(out / "last.pt")["trainer"]["epoch"] == 2


def test_resume_refuses_other_model(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_model("lr", tiny_dataset, out, config=FAST, log=lambda _: None)
    with pytest.raises(CheckpointError, match="another model"):
        train_model("two_tower", tiny_dataset, out, config=FAST, resume=True, log=lambda _: None)


def test_resume_refuses_other_training_options(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_model("lr", tiny_dataset, out, config=FAST, log=lambda _: None)
    other = TrainConfig(**{**FAST.to_dict(), "lr": 0.05})
    with pytest.raises(CheckpointError, match="lr: 0.001 -> 0.05"):
        train_model("lr", tiny_dataset, out, config=other, resume=True, log=lambda _: None)


def test_listwise_metric_needs_cascade_data(tiny_dataset: Path, tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, threads=1, progress=False, metric="recall@10")
    with pytest.raises(ConfigError, match="cascade data"):
        train_model("two_tower", tiny_dataset, tmp_path / "run", config=config, log=lambda _: None)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a prerank checkpoint"):
        load_model(foreign)


def test_early_stopping(tiny_dataset: Path, tmp_path: Path) -> None:
    # random labels: validation AUC cannot keep improving for 20 epochs with lr 0.5
    cfg = TrainConfig(epochs=20, batch_size=64, threads=1, progress=False, patience=1, lr=0.5)
    result = train_model("lr", tiny_dataset, tmp_path / "run", config=cfg, log=lambda _: None)
    assert result.epochs < 20
