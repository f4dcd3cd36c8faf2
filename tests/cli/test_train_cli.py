"""``prerank train / evaluate / compare / models`` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prerank.cli import app
from prerank.cli import train as _train  # noqa: F401  (registers the commands)

runner = CliRunner()
FAST = ["--epochs", "1", "--batch-size", "128", "--threads", "1", "--no-progress"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    from PIL import Image  # matplotlib's own dependency

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_train_then_evaluate(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--model", "lr", "--data", str(tiny_dataset), "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "test.json").read_text())
    assert summary["model"] == "lr" and 0 <= summary["test"]["auc"] <= 1
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(tiny_dataset)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["auc"] == pytest.approx(summary["test"]["auc"])


def test_evaluate_accepts_the_dataset_after_teacher_score(tiny_dataset: Path, tmp_path: Path) -> None:
    """``teacher score`` adds a column, not a feature: a checkpoint trained before still evaluates on the data."""
    from prerank.cli import teacher as _teacher  # noqa: F401  (registers the commands)

    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--model", "lr", "--data", str(tiny_dataset), "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["teacher", "score", "-t", str(out / "best.pt"), "-d", str(tiny_dataset)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(tiny_dataset)])
    assert res.exit_code == 0, res.output


def test_compare_writes_records_and_table(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(tiny_dataset), "--models", "lr,two_tower", "--seeds", "2", "--out", str(out)]
    res = runner.invoke(app, [*args, *FAST])
    assert res.exit_code == 0, res.output
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 4
    need = {"model", "seed", "auc", "logloss", "gauc", "relaimpr", "train_seconds", "train_samples_per_second"}
    need |= {"params", "epochs", "item_cache_bytes_per_item", "score_flops_per_candidate"}
    for r in records:
        assert need <= set(r)
    assert all(r["relaimpr"] == pytest.approx(0.0) for r in records if r["model"] == "two_tower")
    assert {r["model"]: r["lr"] for r in records} == {"lr": 0.01, "two_tower": 0.001}  # LR's own default
    table = (out / "results.md").read_text()
    assert "| lr | 2 |" in table and "| two_tower | 2 |" in table
    assert "p50 ms/request" in table
    # latency once per model, on its seed-0 checkpoint exported to OUT/artifacts/MODEL; the same in every seed's record
    for r in records:
        assert r["latency_seed"] == 0 and r["latency_candidates"] == 1000 and r["latency_runtime"] == "onnx"
        assert r["latency_p50_ms"] > 0 and r["artifact"] == str(out / "artifacts" / r["model"])
    assert_png(out / "auc_vs_latency.png")
    # resume: nothing left to do, nothing lost
    res = runner.invoke(app, [*args, *FAST, "--resume"])
    assert res.exit_code == 0 and len(json.loads((out / "results.json").read_text())) == 4


def test_compare_tunes_every_model_on_the_same_grid(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid"
    args = ["compare", "--data", str(tiny_dataset), "--models", "lr,two_tower", "--seeds", "1", "--out", str(out)]
    grid = ["--grid", "lr=0.001,0.03", "--grid", "weight_decay=0,1e-5", "--latency-candidates", "0"]
    res = runner.invoke(app, [*args, *FAST, *grid])
    assert res.exit_code == 0, res.output
    tuning = json.loads((out / "tuning.json").read_text())
    records = json.loads((out / "results.json").read_text())
    for model in ("lr", "two_tower"):
        points = tuning[model]["points"]
        assert len(points) == 4  # the same 2 x 2 grid for every model
        best = max(points, key=lambda p: p["best_valid"])
        assert tuning[model]["chosen"] == best["point"]
        record = next(r for r in records if r["model"] == model)
        assert record["tuned"] == best["point"]
        assert record["lr"] == best["options"]["lr"] and record["weight_decay"] == best["options"]["weight_decay"]
        # the first seed's run is the chosen point's tuning run, read back rather than trained again
        assert record["checkpoint"] == str(out / "tune" / model / best["point"].replace(", ", "_") / "best.pt")
        assert record["best_valid"] == best["best_valid"]
    assert not (out / "runs").exists()
    assert "tuned on valid" in (out / "results.md").read_text()
    # resume: the grid's points are not trained again
    res = runner.invoke(app, [*args, *FAST, *grid, "--resume"])
    assert res.exit_code == 0 and "tuning" not in res.output.replace("tuning.json", "")
    bad = runner.invoke(app, [*args, *FAST, "--grid", "lrate=0.1"])
    assert bad.exit_code == 2 and "lrate" in bad.output
    bad = runner.invoke(app, [*args, *FAST, *grid, "--then-grid", "lr=0.1"])
    assert bad.exit_code == 2 and "both stages" in bad.output


def test_compare_reports_the_teachers_row_and_relaimpr_against_it(tiny_dataset: Path, tmp_path: Path) -> None:
    from prerank.models.registry import build_model
    from prerank.schema import Schema
    from prerank.train.checkpoint import save_checkpoint

    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, "ranker", build_model("ranker", Schema.load(tiny_dataset), {"hidden": [8]}))
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(tiny_dataset), "--models", "lr", "--seeds", "1", "--out", str(out)]
    res = runner.invoke(app, [*args, *FAST])
    assert res.exit_code == 0, res.output
    # the teacher added on resume, when every run is done: its row and the RelaImpr against it are written
    res = runner.invoke(app, [*args, "--teacher", str(teacher), *FAST, "--resume"])
    assert res.exit_code == 0, res.output
    records = json.loads((out / "results.json").read_text())
    first, student = records
    assert first["is_teacher"] and first["model"] == "teacher (ranker)" and first["seed"] is None
    assert student["relaimpr_teacher"] == pytest.approx((student["auc"] - 0.5) / (first["auc"] - 0.5) * 100 - 100)
    assert "| teacher (ranker) | 1 |" in (out / "results.md").read_text()
    res = runner.invoke(app, [*args, "--teacher", str(teacher), *FAST, "--resume"])  # the teacher is not added twice
    assert res.exit_code == 0 and len(json.loads((out / "results.json").read_text())) == 2


def test_compare_adds_the_popularity_row_once(tiny_dataset: Path, tmp_path: Path) -> None:
    from prerank.evaluate import metrics
    from prerank.train.compare import POPULARITY, popularity_predictions

    out = tmp_path / "cmp"
    args = ["compare", "--data", str(tiny_dataset), "--models", "lr", "--seeds", "1", "--out", str(out), "--popularity"]
    res = runner.invoke(app, [*args, *FAST, "--latency-candidates", "0"])
    assert res.exit_code == 0, res.output
    records = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in records] == [POPULARITY, "lr"]
    pred = popularity_predictions(tiny_dataset)
    assert records[0]["auc"] == pytest.approx(metrics.auc(pred["label"], pred["logits"]))
    assert records[0]["seed"] is None and f"| {POPULARITY} | 1 |" in (out / "results.md").read_text()
    res = runner.invoke(app, [*args, *FAST, "--latency-candidates", "0", "--resume"])  # not added twice
    assert res.exit_code == 0 and len(json.loads((out / "results.json").read_text())) == 2


def test_compare_evaluates_a_teacher_of_another_feature_set_on_its_aligned_test_rows(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """``--teacher-data``: the teacher of the wide set is evaluated on the wide set's test split, beside students of
    the narrow set; without it, a clear error that names the option."""
    from conftest import narrow_dataset
    from prerank.models.registry import build_model
    from prerank.schema import Schema
    from prerank.train.checkpoint import save_checkpoint
    from prerank.train.trainer import evaluate_split

    model = build_model("ranker", Schema.load(tiny_dataset), {"hidden": [8]})
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, "ranker", model)
    narrow = narrow_dataset(tiny_dataset, tmp_path / "narrow")
    args = ["compare", "--data", str(narrow), "--models", "lr", "--seeds", "1", "--teacher", str(teacher), *FAST]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--teacher-data" in " ".join(res.output.split())
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "cmp"), "--teacher-data", str(tiny_dataset)])
    assert res.exit_code == 0, res.output
    first = json.loads((tmp_path / "cmp" / "results.json").read_text())[0]
    assert first["is_teacher"] and first["data"] == str(tiny_dataset)
    assert first["auc"] == pytest.approx(evaluate_split(model.eval(), tiny_dataset, "test", 512)["auc"])


def test_demo_prints_one_table_and_writes_the_plot(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--rows", "3000", "--models", "lr,two_tower", "--max-steps", "5"]
    res = runner.invoke(app, [*args, "--threads", "1", "--candidates", "200", "--no-progress"])
    assert res.exit_code == 0, res.output
    header = "| model | seeds | test AUC | test GAUC | p50 ms/request | cache B/item |"
    assert res.stdout.count(header) == 1, res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("| lr ") or line.startswith("| two_tower ")]
    assert len(rows) == 2 and all(len(r.strip("|").split("|")) == 6 for r in rows)
    records = json.loads((out / "results.json").read_text())
    assert {r["model"] for r in records} == {"lr", "two_tower"}
    assert all(r["latency_candidates"] == 200 and r["latency_p50_ms"] > 0 for r in records)
    assert all(r["auto_schedule"] == ["batch_size", "epochs"] and r["batch_size"] == 64 for r in records)
    assert (out / "demo.md").read_text().startswith(header)
    assert_png(out / "auc_vs_latency.png")


def test_per_model_option_and_unknown_model(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    base = [
        "compare",
        "--data",
        str(tiny_dataset),
        "--seeds",
        "1",
        "--out",
        str(out),
        *FAST,
        "--latency-candidates",
        "0",
    ]
    res = runner.invoke(
        app,
        [*base, "--models", "lr,two_tower", "--model-option", "two_tower.similarity=cosine"]
        + ["--train-option", "lr.lr=0.05"],
    )
    assert res.exit_code == 0, res.output
    lrs = {r["model"]: r["lr"] for r in json.loads((out / "results.json").read_text())}
    assert lrs == {"lr": 0.05, "two_tower": 0.001}
    res = runner.invoke(app, [*base, "--models", "nope"])
    assert res.exit_code == 2 and "unknown models" in res.output


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", "--model", "lr", "--data", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "error:" in res.output


def test_every_command_documents_its_options() -> None:
    from prerank.cli import main  # noqa: F401

    for command in ("train", "evaluate", "compare", "demo", "models"):
        res = runner.invoke(app, [command, "--help"])
        assert res.exit_code == 0, command
