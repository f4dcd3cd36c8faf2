"""End to end: synthetic default -> compare through the CLI; real ML-100K -> Two-Tower to a sane AUC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import SHARED_DATA
from prerank.cli import app, main  # noqa: F401  (main imports every command module)
from prerank.cli import data as _data  # noqa: F401
from prerank.cli import train as _train  # noqa: F401
from prerank.train.config import TrainConfig
from prerank.train.trainer import evaluate_split, train_model

runner = CliRunner()


@pytest.mark.slow
def test_demo_on_the_synthetic_default(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--rows", "6000", "--models", "lr,two_tower", "--epochs", "2"]
    res = runner.invoke(app, [*args, "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "| two_tower | 1 |" in res.stdout and "| lr | 1 |" in res.stdout
    records = json.loads((out / "results.json").read_text())
    assert {r["model"] for r in records} == {"lr", "two_tower"}
    assert all(0.5 < r["auc"] < 1.0 for r in records)  # both learn something from the ground truth
    assert (out / "auc_vs_latency.png").exists()


@pytest.mark.realdata
@pytest.mark.slow
def test_two_tower_learns_real_ml100k(tmp_path: Path) -> None:
    raw = SHARED_DATA / "ml-100k"
    if not (raw / "ml-100k.inter.gz").exists():
        pytest.skip(f"real ML-100K not found at {raw}: this test needs the workplace's ../shared/data")
    from prerank.data.recipes import prepare

    root = prepare("ml-100k", raw, tmp_path / "ml100k", "paper", seed=0)
    cfg = TrainConfig(epochs=3, batch_size=1024, threads=1, progress=False, patience=1)
    result = train_model("two_tower", root, tmp_path / "run", config=cfg, log=lambda _: None)
    test = evaluate_split(result.model, root, "test")
    # a sane ML-100K `paper` AUC: well above chance and above LR-level popularity (~0.72)
    assert test["auc"] > 0.76, test
