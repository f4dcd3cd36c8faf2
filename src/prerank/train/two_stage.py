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

from prerank.data.parquet import DataError
from prerank.losses import SoftHardLoss, build_loss
from prerank.schema import Schema
from prerank.train.config import TrainConfig
from prerank.train.trainer import TrainResult, train_model


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
