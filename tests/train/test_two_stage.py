"""Two-stage distillation recipe: the stage-2 loss's parts, and both stages trained end to end."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import tiny_schema, tiny_table
from prerank.data.batch import Batch
from prerank.data.parquet import write_dataset
from prerank.losses import SoftHardLoss, build_loss
from prerank.train.checkpoint import read_checkpoint
from prerank.train.config import TrainConfig
from prerank.train.two_stage import two_stage_distillation


def _lists() -> tuple[torch.Tensor, Batch]:
    torch.manual_seed(0)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    batch = Batch(
        features={},
        label=torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]),
        teacher_logit=torch.randn(2, 5),
        mask=mask,
    )
    return torch.randn(2, 5), batch


def test_soft_hard_loss_mixes_bce_and_logloss_distillation() -> None:
    logits, batch = _lists()
    soft = build_loss("distill:logloss", temperature=2.0)(logits, batch)
    hard = build_loss("bce")(logits, batch)
    torch.testing.assert_close(SoftHardLoss(0.0, 2.0)(logits, batch), soft)
    torch.testing.assert_close(SoftHardLoss(1.0, 2.0)(logits, batch), hard)
    torch.testing.assert_close(SoftHardLoss(0.3, 2.0)(logits, batch), 0.3 * hard + 0.7 * soft)
    with pytest.raises(ValueError, match="hard_weight"):
        SoftHardLoss(1.5)
    with pytest.raises(ValueError, match="temperature"):
        SoftHardLoss(0.5, 0.0)
    # registered for `compare --loss distill:soft_hard --grid loss.hard_weight=...`
    torch.testing.assert_close(
        build_loss("distill:soft_hard", hard_weight=0.3, temperature=2.0)(logits, batch), 0.3 * hard + 0.7 * soft
    )


def _teacher_dataset(root: Path) -> Path:
    schema = replace(tiny_schema(), has_teacher_logit=True)

    def split(n: int, seed: int) -> pa.Table:
        table = tiny_table(n, seed, schema)
        teacher = np.random.default_rng(seed + 100).normal(size=n).astype(np.float32)
        table = table.append_column("teacher_logit", pa.array(teacher))
        return table.sort_by("request_id")  # request-level loading needs each request's rows together

    write_dataset(root, schema, {"train": split(256, 1), "valid": split(64, 2)}, row_group_size=64)
    return root


def test_two_stages_train_and_the_second_adds_fm(tmp_path: Path) -> None:
    data = _teacher_dataset(tmp_path / "data")
    config = TrainConfig(epochs=1, threads=1, progress=False, requests_per_batch=8)
    messages: list[str] = []
    result = two_stage_distillation(
        "dssm_mlp_fm",
        data,
        tmp_path / "run",
        stage1_overrides={"use_fm": False},
        config=config,
        log=messages.append,
    )
    first = read_checkpoint(tmp_path / "run" / "stage1" / "best.pt")
    second = read_checkpoint(tmp_path / "run" / "stage2" / "best.pt")
    assert first["model_config"]["use_fm"] is False and second["model_config"]["use_fm"] is True
    assert result.stage1.epochs == result.stage2.epochs == 1
    assert any("stage 1" in m for m in messages) and any("stage 2" in m for m in messages)
    assert np.isfinite(result.stage2.history[0]["train_loss"])
