"""``prerank data prepare / download / synth / info`` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prerank.cli import app
from prerank.cli import data as _data  # noqa: F401  (registers the commands)
from prerank.data.parquet import ParquetSplit

runner = CliRunner()


def _ml1m(folder: Path) -> Path:
    """Tiny ML-1M raw files in the GroupLens ``.dat`` layout."""
    folder.mkdir()
    (folder / "users.dat").write_text("".join(f"{u}::{'MF'[u % 2]}::25::{u % 4}::9{u:04d}\n" for u in range(1, 11)))
    (folder / "movies.dat").write_bytes(
        "".join(f"{m}::Film {m} ({1980 + m})::Drama|Comedy\n" for m in range(1, 11)).encode("latin-1")
    )
    ratings = (f"{u}::{m}::{1 + (u * m) % 5}::{970000000 + 100 * m}\n" for u in range(1, 11) for m in range(1, 11))
    (folder / "ratings.dat").write_text("".join(ratings))
    return folder


def test_prepare_then_info(tmp_path: Path) -> None:
    raw, out = _ml1m(tmp_path / "raw"), tmp_path / "ml1m"
    args = ["data", "prepare", "ml-1m", "--raw", str(raw), "--out", str(out), "--protocol", "temporal"]
    res = runner.invoke(app, [*args, "--seed", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["protocol"] == "temporal" and meta["seed"] == 3
    assert ParquetSplit(out, "test").num_rows == meta["rows"]["test"]
    res = runner.invoke(app, ["data", "info", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for name in ("hist_item_id", "user_genre_affinity", "item_group_rate", "temporal"):
        assert name in res.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "prepare", "ml-25m", "--raw", "{raw}", "--out", "{out}"], "unknown recipe"),
        (["data", "prepare", "ml-1m", "--raw", "{raw}", "--out", "{out}", "--protocol", "x"], "no protocol 'x'"),
        (["data", "prepare", "ml-100k", "--raw", "{raw}", "--out", "{out}"], "u.data"),
        (["data", "prepare", "ml-1m", "--raw", "{raw}/nope", "--out", "{out}"], "does not exist"),
        (["data", "download", "taobao-user-behavior", "--cache", "{out}"], "no download"),
        (
            ["data", "prepare", "ml-1m", "--raw", "{raw}", "--out", "{out}", "--engine", "duckdb"],
            "taobao-user-behavior only",
        ),
        (
            ["data", "prepare", "ml-1m", "--raw", "{raw}", "--out", "{out}", "--engine", "spark"],
            "unknown engine 'spark'",
        ),
        (
            ["data", "prepare", "ml-1m", "--raw", "{raw}", "--out", "{out}", "--temp-dir", "{out}"],
            "apply to --engine duckdb",
        ),
    ],
)
def test_user_errors_are_one_line_with_status_2(tmp_path: Path, args: list[str], message: str) -> None:
    raw = _ml1m(tmp_path / "raw")
    argv = [a.format(raw=raw, out=tmp_path / "out") for a in args]
    res = runner.invoke(app, [*argv, "--no-progress"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert text.startswith("error:") and message in text
    assert "Traceback" not in text


def test_download_with_wrong_checksum_leaves_nothing(tmp_path: Path) -> None:
    fake = tmp_path / "ml-1m.zip"
    fake.write_bytes(b"not the GroupLens zip")
    cache = tmp_path / "cache"
    res = runner.invoke(app, ["data", "download", "ml-1m", "--cache", str(cache), "--url", fake.as_uri()])
    assert res.exit_code == 2, res.output
    assert "checksum mismatch" in " ".join(res.output.split())
    assert list(cache.iterdir()) == []


def test_synth_wraps_the_generator(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    options = ["--option", "n_categories=4", "--option", "n_brands=8", "--option", "max_request_size=10"]
    res = runner.invoke(
        app,
        ["data", "synth", "--rows", "300", "--seed", "1", "--out", str(out), "--users", "30", "--items", "20"]
        + [*options, "--no-progress"],
    )
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 1 and meta["options"]["n_users"] == 30 and meta["options"]["n_items"] == 20
    assert sum(ParquetSplit(out, s).num_rows for s in ("train", "valid", "test")) == 300
    res = runner.invoke(app, ["data", "synth", "--rows", "10", "--out", str(out), "--option", "n_planets=3"])
    assert res.exit_code == 2 and "n_planets" in " ".join(res.output.split())


def test_prepare_features_option(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "users.dat").write_text("".join(f"{u}::{'MF'[u % 2]}::25::{u % 3}::4800{u}\n" for u in range(1, 9)))
    (raw / "movies.dat").write_text("".join(f"{m}::Movie {m} (1990)::Drama|Comedy\n" for m in range(1, 11)))
    pairs = [(u, m) for u in range(1, 9) for m in range(1, 11)]
    ratings = [f"{u}::{m}::{1 + (u * m) % 5}::{900_000_000 + 60 * (10 * u + m)}" for u, m in pairs]
    (raw / "ratings.dat").write_text("\n".join(ratings) + "\n")
    base = ["data", "prepare", "ml-1m", "--raw", str(raw), "--no-progress"]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "w"), "--protocol", "temporal", "--features", "wide"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "w" / "meta.json").read_text())["features"] == "wide"
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "p"), "--features", "wide"])  # protocol paper
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["features"] == "wide" and meta["protocol"] == "paper"
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "x"), "--features", "huge"])
    assert res.exit_code == 2 and "feature set" in res.output
