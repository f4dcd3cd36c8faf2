"""Out-of-core Taobao preparation (``--engine duckdb``) writes the dataset of the in-memory path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_recipes_taobao import DAY, DAY0, EVENTS, at, write_csv

from prerank.data.recipes import OutOfCore, RecipeError, prepare
from prerank.data.recipes.taobao import BEHAVIOURS, TaobaoConfig, prepare_taobao
from prerank.data.recipes.taobao_ooc import prepare_taobao_duckdb

#: meta.json entries that say how the dataset was made, not what it holds
HOW = ("prepare_seconds", "engine", "out_of_core")


def assert_same_dataset(a: Path, b: Path) -> None:
    """Same files, same rows in the same order, same values (floats bit for bit), same vocabularies."""
    for split in ("train", "valid", "test"):
        parts = sorted(p.name for p in (a / split).glob("*.parquet"))
        assert parts == sorted(p.name for p in (b / split).glob("*.parquet")), split
        for name in parts:
            fa, fb = pq.ParquetFile(a / split / name), pq.ParquetFile(b / split / name)
            sizes = [fa.metadata.row_group(i).num_rows for i in range(fa.num_row_groups)]
            assert sizes == [fb.metadata.row_group(i).num_rows for i in range(fb.num_row_groups)], name
            ta, tb = fa.read(), fb.read()
            assert ta.schema == tb.schema, name
            for col in ta.column_names:
                assert ta.column(col).equals(tb.column(col)), f"{split}/{name}: column {col!r} differs"
    items_a, items_b = pq.read_table(a / "items.parquet"), pq.read_table(b / "items.parquet")
    assert items_a.equals(items_b)  # the item vocabulary (raw_item_id of each id) and its features
    assert json.loads((a / "schema.json").read_text()) == json.loads((b / "schema.json").read_text())
    meta_a, meta_b = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    assert {k: v for k, v in meta_a.items() if k not in HOW} == {k: v for k, v in meta_b.items() if k not in HOW}
    assert (meta_a["engine"], meta_b["engine"]) == ("memory", "duckdb")


def random_log(path: Path, n: int, seed: int) -> Path:
    """A UserBehavior CSV with what the aggregation must get right: several events of a (user, day, item),
    events at the same second (some of one item under two categories, where file order decides), users and
    items seen only after training, events outside the 9 days, all four behaviours."""
    rng = np.random.default_rng(seed)
    user = rng.integers(1, 60, n)
    item = rng.integers(1, 90, n)
    category = item % 7 + 100
    category[rng.random(n) < 0.05] += 1  # an item logged under another category now and then
    behaviour = rng.choice(len(BEHAVIOURS), n, p=[0.7, 0.1, 0.12, 0.08])
    ts = DAY0 - DAY // 2 + rng.integers(0, 10 * DAY, n) // 600 * 600  # coarse times: many ties
    late = rng.random(n) < 0.1  # users and items that only appear on the evaluation days
    user[late] += 1000
    item[late & (rng.random(n) < 0.5)] += 1000
    ts[late] = DAY0 + 7 * DAY + rng.integers(0, 2 * DAY, int(late.sum()))
    events = [(u, i, c, BEHAVIOURS[b], t) for u, i, c, b, t in zip(user, item, category, behaviour, ts, strict=True)]
    # the first event of a (user, day, item) gives the row's category; at equal times, the first in the file
    ties = [(7, 50, 300, "pv", at(1, 3600)), (7, 50, 301, "cart", at(1, 3600)), (7, 50, 302, "pv", at(1, 60))]
    ties += [(8, 50, 301, "pv", at(2, 3600)), (8, 50, 300, "pv", at(2, 3600)), (8, 51, 300, "pv", at(2, 7200))]
    return write_csv(path, events[: n // 2] + ties + events[n // 2 :] + EVENTS)


@pytest.mark.parametrize(
    ("config", "bucket_rows"),
    [(TaobaoConfig(), 40), (TaobaoConfig(valid_days=2, test_days=2, n_folds=3, smoothing=3.0, hist_len=5), 1)],
)
def test_duckdb_engine_writes_the_same_dataset(tmp_path: Path, config: TaobaoConfig, bucket_rows: int) -> None:
    raw = random_log(tmp_path / "UserBehavior.csv.gz", 4000, seed=1)
    memory = prepare_taobao(raw, tmp_path / "memory", "temporal", 3, config=config)
    ooc = OutOfCore(memory_limit="64MB", bucket_rows=bucket_rows, threads=2, temp_dir=tmp_path)
    duck = prepare_taobao_duckdb(raw, tmp_path / "duckdb", "temporal", 3, config=config, out_of_core=ooc)
    assert_same_dataset(memory, duck)
    meta = json.loads((duck / "meta.json").read_text())
    assert meta["counts"]["dropped_events_outside_2017-11-25..2017-12-03_china_time"] > 0
    assert meta["out_of_core"]["memory_limit"] == "64MB"
    assert not list(tmp_path.glob(".prerank-duckdb-*")), "the staging and spill folder is left behind"


@pytest.mark.realdata
def test_duckdb_engine_on_the_real_sample(tmp_path: Path, taobao_sample: Path) -> None:
    raw = taobao_sample
    memory = prepare("taobao-user-behavior", raw, tmp_path / "memory")
    duck = prepare(
        "taobao-user-behavior", raw, tmp_path / "duckdb", engine="duckdb", out_of_core=OutOfCore(bucket_rows=20_000)
    )
    assert_same_dataset(memory, duck)


def test_errors(tmp_path: Path) -> None:
    raw = write_csv(tmp_path / "UserBehavior.csv")
    cases = [
        (dict(engine="spark"), "unknown engine 'spark'"),
        (dict(engine="duckdb", out_of_core=OutOfCore(memory_limit="lots")), "--memory-limit 'lots'"),
        (dict(engine="duckdb", out_of_core=OutOfCore(temp_dir=tmp_path / "nowhere")), "is not a folder"),
        (dict(engine="duckdb", features="wide"), "--features wide needs --engine memory"),
        (dict(out_of_core=OutOfCore()), "apply to --engine duckdb"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RecipeError, match=message):
            prepare("taobao-user-behavior", raw, tmp_path / "out", **kwargs)
    with pytest.raises(RecipeError, match="taobao-user-behavior only, not 'ml-1m'"):
        prepare("ml-1m", tmp_path, tmp_path / "out", engine="duckdb")
    bad = write_csv(tmp_path / "bad.csv", [*EVENTS[:3], (1, 10, 100, "like", at(0, 3600))])
    with pytest.raises(RecipeError, match="like"):
        prepare("taobao-user-behavior", bad, tmp_path / "out", engine="duckdb")
    late = write_csv(tmp_path / "late.csv", [e for e in EVENTS if e[4] >= DAY0 + 7 * DAY])
    with pytest.raises(RecipeError, match="no events on the training days"):
        prepare("taobao-user-behavior", late, tmp_path / "out", engine="duckdb")
    (tmp_path / "garbage.csv").write_bytes(b"\x00\x01not,a\ncsv")
    with pytest.raises(RecipeError, match="not a UserBehavior CSV"):
        prepare("taobao-user-behavior", tmp_path / "garbage.csv", tmp_path / "out", engine="duckdb")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".prerank-duckdb-*"))


def test_cli_engine_options(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prerank.cli import app
    from prerank.cli import data as _data  # noqa: F401  (registers the commands)

    raw, out, spill = write_csv(tmp_path / "UserBehavior.csv"), tmp_path / "out", tmp_path / "spill"
    spill.mkdir()
    args = ["data", "prepare", "taobao-user-behavior", "--raw", str(raw), "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(app, [*args, "--engine", "duckdb", "--memory-limit", "100MB", "--temp-dir", str(spill)])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["engine"] == "duckdb" and meta["out_of_core"]["memory_limit"] == "100MB"
    assert meta["out_of_core"]["temp_dir"] == str(spill) and list(spill.iterdir()) == []
