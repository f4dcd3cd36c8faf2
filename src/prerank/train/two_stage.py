"""Two-stage distillation, the training recipe of the Taobao distilled DSSM.

Report ``../shared/papers/taobao-coarse-ranking-distillation.txt``, "Two-stage distillation": the
teacher is the fine-ranking model (its logit is the dataset's ``teacher_logit``), the student the
pre-ranker. Stage 1 trains the student on the teacher's soft labels only (the report's
``distill_loss``; here ``distill:logloss``, BCE against ``sigmoid(teacher_logit / T)``). Stage 2 starts
from stage 1's best weights and trains on soft and hard labels together (:class:`SoftHardLoss`), and
may switch on parts that stage 1 left out: the report adds the FM cross in stage 2, which for
``distilled_dssm`` is ``stage1_overrides={"use_fm": False}`` (the FM cross adds no parameters, so
stage 1's weights load into the stage-2 model as they are).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import Tensor

from prerank.data.batch import Batch
from prerank.data.parquet import DataError
from prerank.losses import DistillationLoss, PointwiseBCE, build_loss
from prerank.losses.distill import weighted_logloss_distillation
from prerank.models.base import ConfigError
from prerank.schema import Schema
from prerank.train.config import TrainConfig
from prerank.train.trainer import TrainResult, train_model


@dataclass(frozen=True)
class SoftHardLoss:
    """Stage 2's multi-task loss: ``a * BCE(z, label) + (1 - a) * distill:logloss(z, teacher_logit)``.

    ``a`` = ``hard_weight``. The hard part is the trainer's ``bce`` over every row of the request
    batch (as when training on hard labels alone); the soft part is ``distill:logloss`` with
    ``temperature``, on impressions only when the batch has ``stage`` (where the teacher is valid).
    Takes request-level batches: logits ``[R, N]`` with ``batch.mask``.
    """

    hard_weight: float = 0.5
    temperature: float = 1.0
    requires_lists: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.hard_weight <= 1.0:
            raise ConfigError(f"hard_weight must be in [0, 1], got {self.hard_weight!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor:
        soft = DistillationLoss(weighted_logloss_distillation, {"temperature": self.temperature})(logits, batch)
        hard = PointwiseBCE()(logits, batch)
        return self.hard_weight * hard + (1.0 - self.hard_weight) * soft


def require_teacher_logits(data_dir: str | Path) -> None:
    """A clear error when ``data_dir`` has no ``teacher_logit`` column (the soft labels of both stages)."""
    if not Schema.load(data_dir).has_teacher_logit:
        raise DataError(
            f"{data_dir} has no teacher_logit column: fit a teacher (`prerank teacher fit`) and write its logits "
            "(`prerank teacher score --out-of-fold 5`, out of fold on train so the soft labels do not memorise the "
            "hard ones) before two-stage distillation"
        )


@dataclass(frozen=True)
class TwoStageResult:
    stage1: TrainResult
    stage2: TrainResult


def two_stage_distillation(
    name: str,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    model_overrides: dict | None = None,
    stage1_overrides: dict | None = None,
    config: TrainConfig = TrainConfig(),
    stage1_config: TrainConfig | None = None,
    hard_weight: float = 0.5,
    temperature: float = 1.0,
    log: Callable[[str], None] = print,
) -> TwoStageResult:
    """Train registered model ``name`` in two stages; runs land in ``out_dir/stage1`` and ``out_dir/stage2``.

    Stage 1: ``model_overrides`` + ``stage1_overrides``, loss ``distill:logloss`` (``temperature``),
    ``stage1_config`` (default ``config``). Stage 2: ``model_overrides``, :class:`SoftHardLoss`
    (``hard_weight``, ``temperature``), ``config``, starting from stage 1's best weights (the two
    models must have the same parameters). Needs a dataset with ``teacher_logit``.
    """
    require_teacher_logits(data_dir)
    out_dir = Path(out_dir)
    base = dict(model_overrides or {})
    soft = build_loss("distill:logloss", temperature=temperature)
    stage2_loss = SoftHardLoss(hard_weight, temperature)  # validates before any training
    log(f"{name}: stage 1 of 2, soft labels only")
    first = train_model(
        name,
        data_dir,
        out_dir / "stage1",
        {**base, **(stage1_overrides or {})},
        stage1_config or config,
        loss=soft,
        log=log,
    )
    log(f"{name}: stage 2 of 2, soft + hard labels from stage 1's best weights")
    second = train_model(
        name,
        data_dir,
        out_dir / "stage2",
        base,
        config,
        loss=stage2_loss,
        log=log,
        init_weights=first.model.state_dict(),
    )
    return TwoStageResult(stage1=first, stage2=second)


__all__ = ["SoftHardLoss", "TwoStageResult", "require_teacher_logits", "two_stage_distillation"]
