"""Synchronous distillation, the Taobao report's other training recipe: teacher and student in one run.

The joint model is :class:`~prerank.models.sync_distill.SyncDistill` (registered as ``sync_distill``; its
docstring gives the report's sentence and every reading): the trainer trains it like any model, adding its
auxiliary loss (the teacher's hard loss and the student's soft-label loss) to the student's BCE, and
early-stops on the student's validation metric. This module adds what the trainer does not know: starting
the teacher from a trained checkpoint (``teacher_init``, e.g. from ``prerank teacher fit``) and taking the
student out of the joint model as a plain checkpoint (``student.pt``) to evaluate, export and serve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from prerank.io import CheckpointError
from prerank.models.base import ConfigError, PreRanker
from prerank.models.registry import build_model
from prerank.models.sync_distill import SyncDistill
from prerank.schema import Schema
from prerank.train.checkpoint import load_model, save_checkpoint
from prerank.train.config import TrainConfig
from prerank.train.trainer import TrainResult, seed_everything, train_model

JOINT = "sync_distill"


@dataclass(frozen=True)
class SyncResult:
    joint: TrainResult
    student: PreRanker
    student_checkpoint: Path


def student_model(joint: SyncDistill) -> PreRanker:
    """The student of a joint model as a plain registered model (own copy of its embedding tables), in eval mode."""
    c = joint.config
    plain = build_model(c.student, joint.schema, c.student_options)
    # a blocked student reads the shared tables through GradientBlock, one level deeper
    state = {k.replace("emb.inner.", "emb.", 1): v for k, v in joint.student.state_dict().items()}
    plain.load_state_dict({k: state[k].detach().clone() for k in plain.state_dict()})
    return plain.eval()


def _teacher_overrides(path: Path, schema: Schema, overrides: dict) -> tuple[dict, PreRanker]:
    """The joint model's options with the teacher's name and config taken from its checkpoint."""
    name, teacher, _ = load_model(path)
    if teacher.schema.features != schema.features:
        raise CheckpointError(f"{path} was trained on other features than the dataset's; it cannot start the teacher")
    given = overrides.get("teacher_options") or {}
    saved = asdict(teacher.config)  # type: ignore[arg-type]
    clash = sorted(k for k, v in given.items() if k in saved and saved[k] != (tuple(v) if isinstance(v, list) else v))
    if clash or overrides.get("teacher", name) != name:
        raise ConfigError(f"the teacher options differ from those of {path} ({clash or 'teacher'}); drop them")
    return {**overrides, "teacher": name, "teacher_options": saved}, teacher


def sync_distillation(
    data_dir: str | Path,
    out_dir: str | Path,
    overrides: dict | None = None,
    *,
    config: TrainConfig = TrainConfig(),
    teacher_init: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> SyncResult:
    """Train ``sync_distill`` (``overrides`` = :class:`~prerank.models.sync_distill.SyncDistillConfig` options) on
    ``data_dir`` into ``out_dir``; write the student alone to ``out_dir/student.pt``.

    ``teacher_init``: a checkpoint of the teacher (its model name and config are taken from it) whose weights,
    shared embeddings included, start the joint run; the student starts from its initialisation.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    overrides = dict(overrides or {})
    init = None
    if teacher_init is not None:
        schema = Schema.load(data_dir)
        overrides, teacher = _teacher_overrides(Path(teacher_init), schema, overrides)
        seed_everything(config.seed)  # the student's initialisation as in a run without teacher_init
        joint = build_model(JOINT, schema, overrides)
        joint.teacher.load_state_dict(teacher.state_dict())  # type: ignore[union-attr]
        init = joint.state_dict()
        log(f"teacher {overrides['teacher']} starts from {teacher_init}")
    elif overrides.get("teacher_updates_attention") is False:
        log("warning: the teacher's attention is frozen at its random initialisation (no teacher_init)")
    result = train_model(JOINT, data_dir, out_dir, overrides, config, log=log, init_weights=init)
    assert isinstance(result.model, SyncDistill)
    student = student_model(result.model)
    path = out_dir / "student.pt"
    save_checkpoint(path, result.model.config.student, student, {"sync_distill": asdict(result.model.config)})
    return SyncResult(joint=result, student=student, student_checkpoint=path)


__all__ = ["SyncResult", "student_model", "sync_distillation"]
