"""Synchronous distillation: shared tables, gradient flow per option, frozen teacher attention, joint training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prerank.data.batch import Batch
from prerank.losses.pointwise import binary_cross_entropy
from prerank.models.base import ConfigError
from prerank.models.registry import build_model
from prerank.models.sync_distill import GradientBlock, SyncDistill
from prerank.schema import Schema
from prerank.train.checkpoint import load_model, read_checkpoint, save_checkpoint
from prerank.train.config import TrainConfig
from prerank.train.sync_distill import student_model, sync_distillation

SMALL = {"teacher_options": {"hidden": [16]}, "student_options": {"hidden": [16]}}
CONFIG = TrainConfig(epochs=1, batch_size=64, threads=1, progress=False)


def _joint(schema: Schema, **options: object) -> SyncDistill:
    torch.manual_seed(0)
    model = build_model("sync_distill", schema, {**SMALL, **options})
    assert isinstance(model, SyncDistill)
    return model


def _shared_grads(model: SyncDistill) -> list[torch.Tensor | None]:
    return [p.grad for p in model.teacher.emb.parameters()]


def _student_loss(model: SyncDistill, batch: Batch) -> torch.Tensor:
    """The student's two terms: its hard BCE (the trainer's loss) and its soft-label loss."""
    logits = model(batch)
    _, soft = model.teacher_terms(batch, logits)
    return binary_cross_entropy(logits, batch.label) + soft


def test_the_student_reads_the_teachers_tables(schema: Schema, batch: Batch) -> None:
    model = _joint(schema)
    assert model.student.emb is model.teacher.emb
    blocked = _joint(schema, student_updates_embeddings=False)
    assert isinstance(blocked.student.emb, GradientBlock) and blocked.student.emb.inner is blocked.teacher.emb
    with torch.no_grad():
        blocked.teacher.emb.tables["item_id"].weight.add_(1.0)  # the student sees a change made through the teacher
        before = blocked(batch)
        blocked.teacher.emb.tables["item_id"].weight.add_(1.0)
        assert not torch.allclose(before, blocked(batch))


def test_student_gradients_reach_the_shared_tables_only_when_allowed(schema: Schema, batch: Batch) -> None:
    on = _joint(schema)
    _student_loss(on, batch).backward()
    assert any(g is not None and g.abs().sum() > 0 for g in _shared_grads(on))

    off = _joint(schema, student_updates_embeddings=False)
    _student_loss(off, batch).backward()
    assert all(g is None or g.abs().sum() == 0 for g in _shared_grads(off))
    # the student's own layers still learn from its losses
    assert off.student.user_tower[0].weight.grad.abs().sum() > 0
    # and the teacher's loss does reach the tables
    hard, _ = off.teacher_terms(batch, off(batch))
    hard.backward()
    assert any(g is not None and g.abs().sum() > 0 for g in _shared_grads(off))


def test_the_soft_term_never_moves_the_teacher(schema: Schema, batch: Batch) -> None:
    model = _joint(schema)
    _, soft = model.teacher_terms(batch, model(batch))
    soft.backward()
    assert all(p.grad is None for n, p in model.teacher.named_parameters() if not n.startswith("emb."))


def test_teacher_attention_switch(schema: Schema, batch: Batch) -> None:
    frozen = _joint(schema, teacher_updates_attention=False)
    assert all(not p.requires_grad for p in frozen.teacher.attention.parameters())
    assert all(p.requires_grad for p in frozen.teacher.mlp.parameters())
    assert all(p.requires_grad for p in _joint(schema).teacher.attention.parameters())
    # the frozen attention still passes gradients to the tables it reads (the behaviour sequence)
    frozen.auxiliary_loss(batch, frozen.encode_user(batch), frozen.encode_item(batch)).backward()
    assert frozen.teacher.emb.tables["item_id"].weight.grad.abs().sum() > 0


def test_bad_pairs_are_config_errors(schema: Schema) -> None:
    with pytest.raises(ConfigError, match="one width"):
        _joint(schema, student_options={"embedding_dim": 8})
    with pytest.raises(ConfigError, match="no submodule 'attention'"):
        _joint(schema, teacher="two_tower", teacher_options={})
    with pytest.raises(ConfigError, match="nest"):
        _joint(schema, student="sync_distill")
    with pytest.raises(ConfigError, match="distill_weight"):
        _joint(schema, distill_weight=-1.0)


def test_the_joint_model_trains_and_the_student_comes_out_plain(tiny_dataset: Path, tmp_path: Path) -> None:
    result = sync_distillation(tiny_dataset, tmp_path / "run", SMALL, config=CONFIG, log=lambda _: None)
    history = result.joint.history
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["train_loss"]))
    name, student, ckpt = load_model(result.student_checkpoint)
    assert name == "distilled_dssm" and ckpt["trainer"]["sync_distill"]["teacher"] == "ranker"
    batch = next(iter(_loader(tiny_dataset, student.schema)))
    with torch.no_grad():
        torch.testing.assert_close(student(batch), result.joint.model(batch))
    # the extracted student owns a copy of the tables: training it further leaves the joint model alone
    assert (
        student.emb.tables["item_id"].weight.data_ptr()
        != result.joint.model.teacher.emb.tables["item_id"].weight.data_ptr()
    )


def test_a_warm_teacher_keeps_its_frozen_attention(tiny_dataset: Path, tmp_path: Path) -> None:
    schema = Schema.load(tiny_dataset)
    torch.manual_seed(1)
    teacher = build_model("ranker", schema, {"hidden": [16]})
    save_checkpoint(tmp_path / "teacher.pt", "ranker", teacher)
    runs = {}
    for frozen in (True, False):
        options = {"student_options": {"hidden": [16]}, "teacher_updates_attention": not frozen}
        out = tmp_path / f"run-{frozen}"
        sync_distillation(tiny_dataset, out, options, config=CONFIG, teacher_init=tmp_path / "teacher.pt", log=print)
        runs[frozen] = read_checkpoint(out / "last.pt")["state_dict"]
    start = teacher.state_dict()
    attention = [k for k in start if k.startswith("attention.")]
    assert attention
    for k in attention:
        torch.testing.assert_close(runs[True][f"teacher.{k}"], start[k], rtol=0, atol=0)
    assert any(not torch.equal(runs[False][f"teacher.{k}"], start[k]) for k in attention)
    # the rest of the warm teacher trains in both runs
    assert not torch.equal(runs[True]["teacher.mlp.0.weight"], start["mlp.0.weight"])


def test_teacher_init_rejects_clashing_options(tiny_dataset: Path, tmp_path: Path) -> None:
    schema = Schema.load(tiny_dataset)
    save_checkpoint(tmp_path / "teacher.pt", "ranker", build_model("ranker", schema, {"hidden": [16]}))
    with pytest.raises(ConfigError, match="differ"):
        sync_distillation(
            tiny_dataset,
            tmp_path / "run",
            {"teacher_options": {"hidden": [32]}},
            config=CONFIG,
            teacher_init=tmp_path / "teacher.pt",
        )


def _loader(data: Path, schema: Schema) -> object:
    from prerank.data.parquet import make_loader

    return make_loader(data, "valid", 32, schema=schema)


def test_student_model_of_a_blocked_joint(schema: Schema, batch: Batch) -> None:
    joint = _joint(schema, student_updates_embeddings=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(student_model(joint)(batch), joint(batch))
