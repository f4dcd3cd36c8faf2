"""``prerank data synth-wide``, ``prerank select`` and ``prerank select-finetune`` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prerank.cli import app
from prerank.cli import data as _data  # noqa: F401  (registers the commands)
from prerank.cli import select as _select  # noqa: F401

runner = CliRunner()
FAST = ["--hidden", "16,8", "--batch-size", "256", "--threads", "1", "--no-progress"]
KEYS = {"name", "cost_type", "o", "e", "n", "complexity", "theta", "alpha", "importance", "rank"}


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "wide"
    res = runner.invoke(app, ["data", "synth-wide", "--out", str(out), "--rows", "3000", "--option", "n_noise_cross=2"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def selection(wide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sel")
    res = runner.invoke(app, ["select", "--method", "fscd", "--data", str(wide), "--out", str(out), "--k", "4", *FAST])
    assert res.exit_code == 0, res.output
    return out / "selection.json"


def test_synth_wide_writes_ground_truth(wide: Path) -> None:
    meta = json.loads((wide / "meta.json").read_text())
    truth = meta["ground_truth"]["fields"]
    assert truth["x_star"]["role"] == "star" and truth["x_star"]["cost_type"] == "IV"
    assert sum(t["role"] == "noise" for t in truth.values()) == 3  # 1 user + 2 cross (the option)
    schema = json.loads((wide / "schema.json").read_text())
    assert {f["cost_type"] for f in schema["features"]} == {"I", "II", "III", "IV"}


def test_select_writes_one_entry_per_field(selection: Path, wide: Path) -> None:
    report = json.loads(selection.read_text())
    schema = json.loads((wide / "schema.json").read_text())
    assert [f["name"] for f in report["fields"]] == [f["name"] for f in schema["features"]]
    for entry in report["fields"]:
        assert set(entry) >= KEYS
        assert entry["alpha"] == pytest.approx(entry["complexity"])
    assert sorted(f["rank"] for f in report["fields"]) == list(range(1, len(report["fields"]) + 1))
    top = [f["name"] for f in sorted(report["fields"], key=lambda f: f["rank"])[:4]]
    assert report["selected"] == top and report["method"] == "fscd"
    assert (selection.parent / "selection.pt").exists()


@pytest.mark.parametrize("method", ["dropout_fr", "dfs"])
def test_select_baselines(method: str, wide: Path, tmp_path: Path) -> None:
    args = ["select", "--method", method, "--data", str(wide), "--out", str(tmp_path), "--k", "2", "--max-steps", "3"]
    res = runner.invoke(app, [*args, *FAST])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "selection.json").read_text())["method"] == method


@pytest.mark.parametrize("command", [["select", "finetune"], ["select-finetune"]])  # the spelling, the old one
def test_select_finetune_trains_the_preranker_on_top_k(
    command: list[str], selection: Path, wide: Path, tmp_path: Path
) -> None:
    args = [*command, "--selection", str(selection), "--k", "3", "--data", str(wide), "--out", str(tmp_path)]
    res = runner.invoke(app, [*args, "--hidden", "16,8", "--epochs", "1", "--batch-size", "256", "--no-progress"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "test.json").read_text())
    report = json.loads(selection.read_text())
    assert summary["features"] == report["selected"][:3]
    assert "first.weight" in summary["inherited"] and 0 <= summary["test"]["auc"] <= 1


def test_select_finetune_from_scratch_with_regularisation(selection: Path, wide: Path, tmp_path: Path) -> None:
    args = ["select-finetune", "--selection", str(selection), "--k", "3", "--data", str(wide), "--out", str(tmp_path)]
    res = runner.invoke(app, [*args, "--scratch", "--dropout", "0.3", "--weight-decay", "1e-4", "--epochs", "1", *FAST])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "test.json").read_text())
    assert summary["inherited"] == [] and summary["dropout"] == 0.3 and summary["weight_decay"] == 1e-4


def test_select_errors(wide: Path, selection: Path, tmp_path: Path) -> None:
    base = ["select", "--data", str(wide), "--out", str(tmp_path / "x")]
    res = runner.invoke(app, [*base, "--method", "nope"])
    assert res.exit_code == 2 and "unknown method" in res.output
    res = runner.invoke(app, [*base, "--k", "99", *FAST])
    assert res.exit_code == 2 and "number of fields" in res.output
    # a schema without cost types
    raw = json.loads((wide / "schema.json").read_text())
    for f in raw["features"]:
        f.pop("cost_type")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "schema.json").write_text(json.dumps(raw))
    (bare / "train").symlink_to(wide / "train")
    res = runner.invoke(app, ["select", "--data", str(bare), "--out", str(tmp_path / "y"), *FAST])
    assert res.exit_code == 2 and "cost_type" in res.output
    # dropout_fr does not need costs
    res = runner.invoke(
        app,
        [
            "select",
            "--method",
            "dropout_fr",
            "--data",
            str(bare),
            "--out",
            str(tmp_path / "z"),
            "--max-steps",
            "1",
            *FAST,
        ],
    )
    assert res.exit_code == 0, res.output


def test_select_finetune_errors(wide: Path, selection: Path, tmp_path: Path) -> None:
    base = ["select-finetune", "--data", str(wide), "--out", str(tmp_path / "r")]
    res = runner.invoke(app, [*base, "--selection", str(selection), "--k", "99"])
    assert res.exit_code == 2 and "number of ranked fields" in res.output
    report = json.loads(selection.read_text())
    report["fields"][0]["name"] = "not_a_field"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report))
    res = runner.invoke(app, [*base, "--selection", str(bad), "--k", "2"])
    assert res.exit_code == 2 and "not_a_field" in res.output
    res = runner.invoke(app, [*base, "--selection", str(tmp_path / "missing.json"), "--k", "2"])
    assert res.exit_code == 2 and "no selection file" in res.output
    res = runner.invoke(app, [*base, "--selection", str(selection), "--k", "2", "--dropout", "1.5", *FAST])
    assert res.exit_code == 2 and "dropout" in res.output
    res = runner.invoke(app, [*base, "--selection", str(selection), "--k", "2", "--weight-decay", "-1", *FAST])
    assert res.exit_code == 2 and "weight_decay" in res.output


def test_select_without_data_or_out_is_a_clear_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["select", "--method", "fscd", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "needs --data and --out" in res.output
