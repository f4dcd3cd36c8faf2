"""``prerank teacher fit`` / ``prerank teacher score`` on the tiny dataset."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from conftest import narrow_dataset
from prerank.cli import app
from prerank.cli import teacher as teacher_cli  # noqa: F401  (registers the commands)
from prerank.data.parquet import make_loader, table_to_batch
from prerank.models.registry import build_model
from prerank.schema import FeatureSpec, Schema
from prerank.train.checkpoint import load_model, save_checkpoint

runner = CliRunner()


def _json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def _teacher(path: Path, schema: Schema) -> Path:
    save_checkpoint(path, "ranker", build_model("ranker", schema, {"hidden": [16]}))
    return path


def _parts(root: Path) -> list[Path]:
    return sorted(root.glob("*/part-*.parquet"))


def test_fit_trains_the_ranker_and_writes_the_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "teacher.pt"
    args = ["teacher", "fit", "--data", str(tiny_dataset), "--out", str(out), "--epochs", "1", "--batch-size", "128"]
    args += ["--max-steps", "3", "--threads", "1", "--no-progress", "--model-option", "hidden=[16,8]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = _json(result.stdout)
    assert 0.0 <= summary["valid_auc"] <= 1.0 and 0.0 <= summary["test_auc"] <= 1.0
    name, model, _ = load_model(out)
    assert name == "ranker" and model.config.hidden == (16, 8)
    assert (tmp_path / "teacher_run" / "best.pt").exists()


def test_fit_ensemble_averages_independently_trained_members(tiny_dataset: Path, tmp_path: Path) -> None:
    """``--ensemble 2``: two rankers trained one by one (seeds 5 and 6), one checkpoint whose logit is their mean."""
    out = tmp_path / "teacher.pt"
    args = ["teacher", "fit", "-d", str(tiny_dataset), "-o", str(out), "--epochs", "1", "--max-steps", "2"]
    args += ["--threads", "1", "--no-progress", "--model-option", "hidden=[8]", "--seed", "5", "--ensemble", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert _json(result.stdout)["model"] == "ensemble"
    name, model, _ = load_model(out)
    assert name == "ensemble" and model.config.members == 2 and model.config.model_config["hidden"] == (8,)
    members = [load_model(tmp_path / "teacher_run" / f"member-{k}" / "best.pt")[1] for k in range(2)]
    batch = next(iter(make_loader(tiny_dataset, "test", 64)))
    with torch.no_grad():
        each = torch.stack([m(batch) for m in members])
        assert not torch.allclose(each[0], each[1])
        torch.testing.assert_close(model(batch), each.mean(0))
    first = runner.invoke(app, [*args[:-2], "--ensemble", "0"])
    assert first.exit_code != 0 and "--ensemble" in first.output


def test_fit_refuses_cascade_data(tiny_dataset: Path, tmp_path: Path) -> None:
    Schema.load(tiny_dataset).with_reserved(has_stage=True).save(tiny_dataset / "schema.json")
    result = runner.invoke(app, ["teacher", "fit", "--data", str(tiny_dataset), "--out", str(tmp_path / "t.pt")])
    assert result.exit_code == 2
    assert "stage" in result.output and not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize("candidates", [False, True])
def test_a_stage_column_of_impressions_only_is_not_cascade_data(
    tiny_dataset: Path, tmp_path: Path, candidates: bool
) -> None:
    """The synthetic default writes ``stage`` 0 on every row: fit and out-of-fold scoring accept it; one candidate
    row (stage 1) makes it cascade data, refused."""
    for i, path in enumerate(_parts(tiny_dataset)):
        table = pq.read_table(path)
        stage = np.zeros(table.num_rows, dtype=np.int8)
        stage[0] = 1 if candidates and i == 0 else 0
        pq.write_table(table.append_column("stage", pa.array(stage)), path)
    Schema.load(tiny_dataset).with_reserved(has_stage=True).save(tiny_dataset / "schema.json")
    out = tmp_path / "t.pt"
    flags = ["--epochs", "1", "--max-steps", "2", "--threads", "1", "--no-progress"]
    fit = runner.invoke(
        app, ["teacher", "fit", "-d", str(tiny_dataset), "-o", str(out), *flags, "--model-option", "hidden=[8]"]
    )
    if candidates:
        assert fit.exit_code == 2 and "not impressions" in fit.output and not out.exists()
        return
    assert fit.exit_code == 0, fit.output
    score = runner.invoke(
        app, ["teacher", "score", "-t", str(out), "-d", str(tiny_dataset), "--out-of-fold", "2", *flags]
    )
    assert score.exit_code == 0, score.output
    assert Schema.load(tiny_dataset).has_teacher_logit


def test_score_adds_the_teacher_logit_to_every_row(tiny_dataset: Path, tmp_path: Path) -> None:
    schema = Schema.load(tiny_dataset)
    teacher = _teacher(tmp_path / "teacher.pt", schema)
    _, model, _ = load_model(teacher)
    before = {p: pq.read_table(p) for p in _parts(tiny_dataset)}
    groups = {p: pq.ParquetFile(p).num_row_groups for p in before}

    result = runner.invoke(
        app, ["teacher", "score", "--teacher", str(teacher), "--data", str(tiny_dataset), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    assert _json(result.stdout)["rows"] == {"test": 128, "train": 512, "valid": 128}
    assert Schema.load(tiny_dataset).has_teacher_logit
    assert json.loads((tiny_dataset / "meta.json").read_text())["teacher"]["model"] == "ranker"
    for path, old in before.items():
        new = pq.read_table(path)
        assert new.schema.field("teacher_logit").type == pa.float32()
        assert new.drop_columns(["teacher_logit"]).equals(old)
        assert pq.ParquetFile(path).num_row_groups == groups[path]
        with torch.no_grad():
            expected = model(table_to_batch(old, schema)).numpy()
        np.testing.assert_allclose(new.column("teacher_logit").to_numpy(), expected, rtol=1e-5, atol=1e-6)
    batch = next(iter(make_loader(tiny_dataset, "valid", 32)))
    assert batch.teacher_logit is not None and batch.teacher_logit.shape == (32,)


def test_scoring_twice_replaces_the_column(tiny_dataset: Path, tmp_path: Path) -> None:
    schema = Schema.load(tiny_dataset)
    first, second = _teacher(tmp_path / "a.pt", schema), _teacher(tmp_path / "b.pt", schema)
    for teacher in (first, second):
        result = runner.invoke(
            app,
            ["teacher", "score", "-t", str(teacher), "-d", str(tiny_dataset), "--batch-size", "50", "--threads", "1"],
        )
        assert result.exit_code == 0, result.output
    _, model, _ = load_model(second)
    part = _parts(tiny_dataset)[0]
    table = pq.read_table(part)
    assert table.column_names.count("teacher_logit") == 1
    with torch.no_grad():
        expected = model(table_to_batch(table, schema)).numpy()
    np.testing.assert_allclose(table.column("teacher_logit").to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_score_refuses_a_teacher_of_another_schema(tiny_dataset: Path, tmp_path: Path) -> None:
    schema = Schema.load(tiny_dataset)
    other = replace(
        schema, features=tuple(replace(f, vocab_size=99) if f.name == "age" else f for f in schema.features)
    )
    other = replace(other, features=(*other.features, FeatureSpec("price", "item", "dense")))
    teacher = _teacher(tmp_path / "other.pt", other)
    before = {p: p.read_bytes() for p in _parts(tiny_dataset)}
    result = runner.invoke(
        app, ["teacher", "score", "--teacher", str(teacher), "--data", str(tiny_dataset), "--threads", "1"]
    )
    assert result.exit_code == 2
    assert "does not match" in result.output and "age" in result.output and "price" in result.output
    assert {p: p.read_bytes() for p in _parts(tiny_dataset)} == before
    assert not Schema.load(tiny_dataset).has_teacher_logit


def test_score_rejects_a_damaged_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = runner.invoke(
        app, ["teacher", "score", "--teacher", str(bad), "--data", str(tiny_dataset), "--threads", "1"]
    )
    assert result.exit_code == 2 and "corrupt" in result.output


@pytest.mark.parametrize("size", ["0", "-3"])
def test_score_rejects_a_bad_batch_size(tiny_dataset: Path, tmp_path: Path, size: str) -> None:
    teacher = _teacher(tmp_path / "t.pt", Schema.load(tiny_dataset))
    result = runner.invoke(
        app, ["teacher", "score", "-t", str(teacher), "-d", str(tiny_dataset), "--batch-size", size, "--threads", "1"]
    )
    assert result.exit_code == 2 and "--batch-size" in result.output


def test_out_of_fold_scores_train_with_fold_teachers_and_the_rest_with_the_teacher(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """Every train row gets a logit from a teacher trained without its fold; valid and test the full teacher's."""
    schema = Schema.load(tiny_dataset)
    teacher = _teacher(tmp_path / "teacher.pt", schema)
    _, model, _ = load_model(teacher)
    args = ["teacher", "score", "-t", str(teacher), "-d", str(tiny_dataset), "--threads", "1", "--out-of-fold", "2"]
    result = runner.invoke(app, [*args, "--epochs", "1", "--max-steps", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert _json(result.stdout)["rows"] == {"test": 128, "train": 512, "valid": 128}
    meta = json.loads((tiny_dataset / "meta.json").read_text())["teacher"]
    assert meta["train_logits"] == "out-of-fold" and meta["folds"] == 2
    assert not (tiny_dataset / ".crossfit").exists() and Schema.load(tiny_dataset).has_teacher_logit
    for path in _parts(tiny_dataset):
        table = pq.read_table(path)
        logits = table.column("teacher_logit").to_numpy()
        assert np.isfinite(logits).all()
        with torch.no_grad():
            in_fold = model(table_to_batch(table.drop_columns(["teacher_logit"]), schema)).numpy()
        if path.parent.name == "train":  # fold teachers are other models than the full teacher
            assert np.abs(logits - in_fold).max() > 1e-3
        else:
            np.testing.assert_allclose(logits, in_fold, rtol=1e-5, atol=1e-6)


def test_fold_assignment_and_bad_fold_counts(tiny_dataset: Path, tmp_path: Path) -> None:
    from prerank.train.crossfit import fold_of_rows

    fold = fold_of_rows(10, 3, seed=0)
    assert sorted(np.bincount(fold).tolist()) == [3, 3, 4]
    assert (fold == fold_of_rows(10, 3, seed=0)).all() and not (fold == fold_of_rows(10, 3, seed=1)).all()
    with pytest.raises(ValueError, match="at least 2 folds"):
        fold_of_rows(10, 1, seed=0)
    with pytest.raises(ValueError, match="fewer than the 5 folds"):
        fold_of_rows(4, 5, seed=0)
    teacher = _teacher(tmp_path / "teacher.pt", Schema.load(tiny_dataset))
    result = runner.invoke(app, ["teacher", "score", "-t", str(teacher), "-d", str(tiny_dataset), "--out-of-fold", "1"])
    assert result.exit_code != 0 and "--out-of-fold" in result.output
    args = ["teacher", "score", "-t", str(teacher), "-d", str(tiny_dataset), "--out-of-fold", "2", "--fold-by", "user"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--fold-by" in result.output and "request" in result.output


def test_folds_by_request_keep_each_request_in_one_fold() -> None:
    from prerank.train.crossfit import fold_of_rows

    groups = np.array([7, 3, 7, 9, 3, 3, 11, 9, 7, 5])
    fold = fold_of_rows(len(groups), 2, seed=0, groups=groups)
    for g in np.unique(groups):
        assert len(set(fold[groups == g].tolist())) == 1  # a request's rows share one fold
    per_request = [fold[groups == g][0] for g in np.unique(groups)]
    assert sorted(np.bincount(per_request).tolist()) == [2, 3]  # 5 requests cut into near-equal parts
    assert not (fold == fold_of_rows(len(groups), 2, seed=0)).all()  # not the per-row assignment
    with pytest.raises(ValueError, match="5 requests, fewer than the 6 folds"):
        fold_of_rows(len(groups), 6, seed=0, groups=groups)


def test_out_of_fold_by_request_scores_a_request_with_one_fold_teacher(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--fold-by request`` every fold teacher trains on whole requests and never on the requests it scores."""
    import prerank.train.crossfit as crossfit

    seen: list[set] = []
    real = crossfit.fit

    def spy(name, config, data_dir, run_dir, cfg, log):  # type: ignore[no-untyped-def]
        trained = set(pq.read_table(Path(data_dir) / "train").column("request_id").to_pylist())
        seen.append(trained)
        return real(name, config, data_dir, run_dir, cfg, log=log)

    monkeypatch.setattr(crossfit, "fit", spy)
    schema = Schema.load(tiny_dataset)
    teacher = _teacher(tmp_path / "teacher.pt", schema)
    args = ["teacher", "score", "-t", str(teacher), "-d", str(tiny_dataset), "--threads", "1", "--out-of-fold", "2"]
    result = runner.invoke(app, [*args, "--fold-by", "request", "--epochs", "1", "--max-steps", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    train = pa.concat_tables([pq.read_table(p) for p in sorted((tiny_dataset / "train").glob("*.parquet"))])
    requests = set(train.column("request_id").to_pylist())
    first, second = seen
    assert first and second and not first & second and first | second == requests  # requests split, none shared
    meta = json.loads((tiny_dataset / "meta.json").read_text())["teacher"]
    assert meta["fold_by"] == "request" and meta["folds"] == 2
    assert np.isfinite(train.column("teacher_logit").to_numpy()).all()


def test_out_of_fold_with_an_ensemble_teacher_trains_its_members_one_by_one(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fold teachers of an ``ensemble`` checkpoint are ensembles whose members were trained independently."""
    import prerank.train.ensemble as ensemble_module

    calls: list[int] = []
    real = ensemble_module.train_ensemble

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(ensemble_module, "train_ensemble", spy)
    schema = Schema.load(tiny_dataset)
    teacher = tmp_path / "teacher.pt"
    config = {"members": 2, "model_config": {"hidden": [8]}}
    save_checkpoint(teacher, "ensemble", build_model("ensemble", schema, config))
    args = ["teacher", "score", "-t", str(teacher), "-d", str(tiny_dataset), "--threads", "1", "--out-of-fold", "2"]
    result = runner.invoke(app, [*args, "--epochs", "1", "--max-steps", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert calls == [2, 2]  # one ensemble of 2 members per fold
    for path in sorted((tiny_dataset / "train").glob("*.parquet")):
        assert np.isfinite(pq.read_table(path).column("teacher_logit").to_numpy()).all()


def _features_from(teacher: Path, data: Path, wide: Path, *extra: str):  # type: ignore[no-untyped-def]
    args = ["teacher", "score", "-t", str(teacher), "-d", str(data), "--features-from", str(wide), "--threads", "1"]
    return runner.invoke(app, [*args, *extra])


def test_features_from_writes_the_wide_teachers_logits_into_the_aligned_rows(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """A teacher of the wide set scores the wide rows; each logit lands on the same row of the narrow set."""
    schema = Schema.load(tiny_dataset)
    teacher = _teacher(tmp_path / "teacher.pt", schema)
    _, model, _ = load_model(teacher)
    narrow = narrow_dataset(tiny_dataset, tmp_path / "narrow")
    plain = runner.invoke(app, ["teacher", "score", "-t", str(teacher), "-d", str(narrow), "--threads", "1"])
    assert plain.exit_code == 2 and "user_cat_affinity" in plain.output  # it cannot read the narrow set itself
    result = _features_from(teacher, narrow, tiny_dataset)
    assert result.exit_code == 0, result.output
    assert _json(result.stdout)["rows"] == {"test": 128, "train": 512, "valid": 128}
    assert Schema.load(narrow).has_teacher_logit and not Schema.load(tiny_dataset).has_teacher_logit
    assert json.loads((narrow / "meta.json").read_text())["teacher"]["features_from"] == str(tiny_dataset)
    for split in ("train", "valid", "test"):
        assert "teacher_logit" not in pq.read_table(tiny_dataset / split).column_names  # the source is read only
        with torch.no_grad():
            expected = model(table_to_batch(pq.read_table(tiny_dataset / split), schema)).numpy()
        got = pq.read_table(narrow / split).column("teacher_logit").to_numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    loader = make_loader(narrow, "valid", 64)
    assert all(b.teacher_logit is not None for b in loader)


@pytest.mark.parametrize("damage", ["label", "rows"])
def test_features_from_refuses_rows_that_are_not_aligned(tiny_dataset: Path, tmp_path: Path, damage: str) -> None:
    """A flipped label or a missing row: a clear error naming where, and no file of either dataset changes."""
    teacher = _teacher(tmp_path / "teacher.pt", Schema.load(tiny_dataset))
    narrow = narrow_dataset(tiny_dataset, tmp_path / "narrow")
    part = sorted((narrow / "valid").glob("*.parquet"))[0]
    table = pq.read_table(part)
    if damage == "label":
        labels = table.column("label").to_numpy().copy()
        labels[5] = 1 - labels[5]
        table = table.set_column(table.column_names.index("label"), "label", pa.array(labels))
    else:
        table = table.slice(1)
    pq.write_table(table, part)
    before = {p: p.read_bytes() for p in _parts(narrow) + _parts(tiny_dataset)}
    result = _features_from(teacher, narrow, tiny_dataset, "--out-of-fold", "2", "--max-steps", "1", "--no-progress")
    assert result.exit_code == 2
    expected = "split 'valid', row 5: column 'label'" if damage == "label" else "127 rows"
    output = " ".join(result.output.split())  # the console wraps long lines
    assert expected in output and "valid" in output and "Traceback" not in output
    assert {p: p.read_bytes() for p in before} == before and not Schema.load(narrow).has_teacher_logit


def test_features_from_out_of_fold(tiny_dataset: Path, tmp_path: Path) -> None:
    """With --out-of-fold, fold teachers are fitted on the wide set; their logits go into the narrow train rows."""
    schema = Schema.load(tiny_dataset)
    teacher = _teacher(tmp_path / "teacher.pt", schema)
    _, model, _ = load_model(teacher)
    narrow = narrow_dataset(tiny_dataset, tmp_path / "narrow")
    result = _features_from(teacher, narrow, tiny_dataset, "--out-of-fold", "2", "--epochs", "1", "--max-steps", "2")
    assert result.exit_code == 0, result.output
    meta = json.loads((narrow / "meta.json").read_text())["teacher"]
    assert meta["train_logits"] == "out-of-fold" and meta["features_from"] == str(tiny_dataset)
    assert not (narrow / ".crossfit").exists() and not (tiny_dataset / ".crossfit").exists()
    for split in ("train", "valid", "test"):
        with torch.no_grad():
            in_fold = model(table_to_batch(pq.read_table(tiny_dataset / split), schema)).numpy()
        got = pq.read_table(narrow / split).column("teacher_logit").to_numpy()
        assert np.isfinite(got).all()
        if split == "train":
            assert np.abs(got - in_fold).max() > 1e-3
        else:
            np.testing.assert_allclose(got, in_fold, rtol=1e-5, atol=1e-6)
