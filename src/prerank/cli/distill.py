"""``prerank distill two-stage`` and ``prerank distill sync``: the Taobao distilled DSSM's training recipes.

``two-stage`` (:mod:`prerank.train.two_stage`) reads the teacher's logits from the dataset's
``teacher_logit`` column (``prerank teacher fit`` + ``prerank teacher score --out-of-fold K``);
``sync`` (:mod:`prerank.train.sync_distill`) trains its own teacher beside the student.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer

from prerank.cli import app
from prerank.cli.common import (
    BatchOpt,
    EpochsOpt,
    LrOpt,
    MaxStepsOpt,
    MetricOpt,
    ModelOptOpt,
    PatienceOpt,
    ProgressOpt,
    RequestsOpt,
    SeedOpt,
    ThreadsOpt,
    WorkersOpt,
    console,
    friendly_errors,
    parse_options,
    print_json,
    train_flags,
)
from prerank.io import atomic_write_text

distill_app = typer.Typer(help="Distil a ranking teacher into a pre-ranker (Taobao report).", no_args_is_help=True)
app.add_typer(distill_app, name="distill")


def _summary(result: Any, data: Path, eval_batch_size: int) -> dict[str, Any]:
    from prerank.train.trainer import evaluate_split

    return {
        "checkpoint": str(result.checkpoint),
        "epochs": result.epochs,
        "best_valid": result.best_metric,
        "train_seconds": result.train_seconds,
        "test": evaluate_split(result.model, data, "test", eval_batch_size),
    }


@distill_app.command("two-stage")
@friendly_errors
def two_stage(
    data: Path = typer.Option(..., "--data", "-d", help="Dataset with a teacher_logit column (`teacher score`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: stage1/, stage2/ (trainer runs), test.json."),
    model: str = typer.Option("distilled_dssm", "--model", "-m", help="Registered student model."),
    model_option: list[str] = ModelOptOpt,
    stage1_option: list[str] = typer.Option(
        None,
        "--stage1-option",
        help="Model option for stage 1 only, key=value (repeatable). Default: use_fm=false when the student has"
        " the FM cross on (the report turns FM on in stage 2).",
    ),
    hard_weight: float = typer.Option(0.5, "--hard-weight", help="Stage 2: weight of the hard-label BCE in [0, 1]."),
    temperature: float = typer.Option(1.0, "--temperature", help="Soft labels sigmoid(teacher_logit / T)."),
    epochs: int = EpochsOpt,
    lr: float = LrOpt,
    threads: int = ThreadsOpt,
    seed: int = SeedOpt,
    patience: int = PatienceOpt,
    metric: str = MetricOpt,
    max_steps: int = MaxStepsOpt,
    requests_per_batch: int = RequestsOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Stage 1 on the teacher's soft labels only; stage 2 from stage 1's weights on soft + hard labels."""
    from prerank.models.registry import model_config
    from prerank.train.config import train_config
    from prerank.train.two_stage import require_teacher_logits, two_stage_distillation

    require_teacher_logits(data)
    cfg = train_config(train_flags(locals()))
    overrides = parse_options(model_option, "--model-option")
    stage1 = parse_options(stage1_option, "--stage1-option")
    if not stage1_option and getattr(model_config(model, overrides), "use_fm", False):
        stage1 = {"use_fm": False}
    result = two_stage_distillation(
        model,
        data,
        out,
        model_overrides=overrides,
        stage1_overrides=stage1,
        config=cfg,
        hard_weight=hard_weight,
        temperature=temperature,
        log=console.print,
    )
    summary = {
        "model": model,
        "stage1_options": stage1,
        "hard_weight": hard_weight,
        "temperature": temperature,
        "stage1": _summary(result.stage1, data, cfg.eval_batch_size),
        "stage2": _summary(result.stage2, data, cfg.eval_batch_size),
    }
    atomic_write_text(out / "test.json", json.dumps(summary, indent=2, default=float))
    print_json(summary)


@distill_app.command("sync")
@friendly_errors
def sync(
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory (no teacher_logit needed)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: best.pt (joint), student.pt, test.json."),
    student: str = typer.Option("distilled_dssm", "--student", help="Registered student model (served)."),
    teacher: str = typer.Option(None, "--teacher", help="Registered teacher model (default ranker)."),
    student_option: list[str] = typer.Option(None, "--student-option", help="Student option key=value (repeatable)."),
    teacher_option: list[str] = typer.Option(None, "--teacher-option", help="Teacher option key=value (repeatable)."),
    teacher_init: Path = typer.Option(
        None, "--teacher-init", help="Teacher checkpoint (`teacher fit`) to start from; its model and config are used."
    ),
    student_updates_embeddings: bool = typer.Option(
        True,
        "--student-updates-embeddings/--no-student-updates-embeddings",
        help="Whether the student's losses update the shared embeddings (off: gradient block).",
    ),
    teacher_updates_attention: bool = typer.Option(
        True,
        "--teacher-updates-attention/--no-teacher-updates-attention",
        help="Whether the teacher's user attention trains (off: frozen; use with --teacher-init).",
    ),
    distill_weight: float = typer.Option(1.0, "--distill-weight", help="Weight of the student's soft-label loss."),
    temperature: float = typer.Option(1.0, "--temperature", help="Soft labels sigmoid(teacher logit / T)."),
    epochs: int = EpochsOpt,
    batch_size: int = BatchOpt,
    lr: float = LrOpt,
    threads: int = ThreadsOpt,
    seed: int = SeedOpt,
    patience: int = PatienceOpt,
    metric: str = MetricOpt,
    max_steps: int = MaxStepsOpt,
    num_workers: int = WorkersOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Train a teacher and a student jointly on shared embeddings; keep the student (report: synchronous)."""
    from prerank.train.config import train_config
    from prerank.train.sync_distill import sync_distillation
    from prerank.train.trainer import evaluate_split

    cfg = train_config(train_flags(locals()))
    overrides: dict[str, Any] = {
        "student": student,
        "student_options": parse_options(student_option, "--student-option"),
        "teacher_options": parse_options(teacher_option, "--teacher-option"),
        "student_updates_embeddings": student_updates_embeddings,
        "teacher_updates_attention": teacher_updates_attention,
        "distill_weight": distill_weight,
        "temperature": temperature,
    }
    if teacher:
        overrides["teacher"] = teacher
    result = sync_distillation(data, out, overrides, config=cfg, teacher_init=teacher_init, log=console.print)
    joint = result.joint.model
    summary = {
        "student": student,
        "options": asdict(joint.config),
        "teacher_init": str(teacher_init) if teacher_init else None,
        "student_checkpoint": str(result.student_checkpoint),
        **_summary(result.joint, data, cfg.eval_batch_size),
        "teacher_test": evaluate_split(joint.teacher, data, "test", cfg.eval_batch_size),
    }
    atomic_write_text(out / "test.json", json.dumps(summary, indent=2, default=float))
    print_json(summary)


__all__ = ["distill_app"]
