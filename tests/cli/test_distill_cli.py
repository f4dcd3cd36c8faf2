"""``prerank distill two-stage`` and ``prerank distill sync`` on the tiny dataset."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import tiny_schema, tiny_table
from prerank.cli import app
from prerank.cli import distill as distill_cli  # noqa: F401  (registers the commands)
from prerank.cli.teacher import add_teacher_logits
from prerank.data.parquet import write_dataset
from prerank.models.registry import build_model
from prerank.schema import Schema
from prerank.train.checkpoint import load_model, read_checkpoint, save_checkpoint

runner = CliRunner()
FAST = ["--epochs", "1", "--threads", "1", "--no-progress"]


def _json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def test_two_stage_without_teacher_logits_is_a_clear_error(tiny_dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["distill", "two-stage", "--data", str(tiny_dataset), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    message = " ".join(result.output.split())  # the console wraps long paths at any width
    assert "no teacher_logit column" in message and "prerank teacher score" in message
    assert not (tmp_path / "r").exists()


def _by_request(root: Path) -> Path:
    """The tiny dataset with each request's rows together (request-level loading needs that) and teacher logits."""
    schema = tiny_schema()
    splits = {
        s: tiny_table(n, seed, schema).sort_by("request_id")
        for s, n, seed in [("train", 512, 1), ("valid", 128, 2), ("test", 128, 3)]
    }
    write_dataset(root, schema, splits, row_group_size=128)
    add_teacher_logits(build_model("ranker", schema, {"hidden": [8]}), root, log=lambda _: None)
    return root


def test_two_stage_trains_both_stages_fm_in_stage_two(tmp_path: Path) -> None:
    data = _by_request(tmp_path / "data")
    out = tmp_path / "run"
    args = ["distill", "two-stage", "--data", str(data), "--out", str(out), "--model", "dssm_mlp_fm", *FAST]
    result = runner.invoke(app, [*args, "--model-option", "head_hidden=[8]", "--hard-weight", "0.3"])
    assert result.exit_code == 0, result.output
    summary = _json(result.stdout)
    assert summary["stage1_options"] == {"use_fm": False} and summary["hard_weight"] == 0.3
    assert 0.0 <= summary["stage2"]["test"]["auc"] <= 1.0 and "gauc" in summary["stage1"]["test"]
    assert read_checkpoint(out / "stage2" / "best.pt")["model_config"]["use_fm"] is True
    assert json.loads((out / "test.json").read_text()) == summary
    bad = runner.invoke(app, [*args, "--hard-weight", "2"])
    assert bad.exit_code == 2 and "hard_weight" in bad.output


def test_sync_trains_and_writes_the_student(tiny_dataset: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, "ranker", build_model("ranker", Schema.load(tiny_dataset), {"hidden": [8]}))
    out = tmp_path / "run"
    args = ["distill", "sync", "--data", str(tiny_dataset), "--out", str(out), *FAST, "--batch-size", "128"]
    args += ["--student-option", "hidden=[8]", "--teacher-init", str(teacher), "--no-student-updates-embeddings"]
    result = runner.invoke(app, [*args, "--no-teacher-updates-attention"])
    assert result.exit_code == 0, result.output
    summary = _json(result.stdout)
    assert summary["options"]["student_updates_embeddings"] is False
    assert summary["options"]["teacher_updates_attention"] is False
    assert summary["options"]["teacher_options"]["hidden"] == [8]
    assert 0.0 <= summary["test"]["gauc"] <= 1.0 and 0.0 <= summary["teacher_test"]["auc"] <= 1.0
    name, _, _ = load_model(out / "student.pt")
    assert name == "distilled_dssm"
    bad = runner.invoke(app, [*args, "--teacher-option", "hidden=[16]"])
    assert bad.exit_code == 2 and "differ" in bad.output
