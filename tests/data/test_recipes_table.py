"""The ``table`` recipe: a user's own CSV/Parquet interaction log -> a prerank dataset."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from prerank.cli import app
from prerank.cli import data as _data  # noqa: F401  (registers the commands)
from prerank.cli import train as _train  # noqa: F401
from prerank.data.parquet import ParquetSplit, make_loader
from prerank.data.recipes.table import TableConfig, TableError, prepare_table, sample_negatives
from prerank.schema import Schema

runner = CliRunner()
N_USERS, N_ITEMS, PER_USER = 12, 15, 8


def _log(seed: int = 0) -> dict[str, list]:
    """PER_USER rows per user with distinct, increasing times; item ids are strings, user ids ints."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = defaultdict(list)
    for u in range(1, N_USERS + 1):
        items = rng.choice(N_ITEMS, size=PER_USER, replace=False) + 1
        for k, i in enumerate(items):
            cols["uid"].append(u)
            cols["sku"].append(f"s{i:02d}")
            cols["y"].append(int((u + i + k) % 2))
            cols["t"].append(1_000 * u + 10 * k)
            cols["device"].append(["ios", "web"][k % 2])
            cols["dwell"].append(k + 0.5 if k != 3 else float("nan"))
            cols["tags"].append([f"tag{(i + j) % 4}" for j in range(1 + k % 3)])
    # user 1's last row: an item and a device value that appear in no other row (test only)
    cols["sku"][PER_USER - 1] = "s99"
    cols["device"][PER_USER - 1] = "tv"
    return dict(cols)


def _write(path: Path, cols: dict[str, list]) -> Path:
    table = pa.table(cols)
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def _side_files(tmp: Path) -> tuple[Path, Path]:
    users = _write(
        tmp / "users.csv",
        {"uid": list(range(1, N_USERS + 1)), "country": ["de", "fr", "us"] * (N_USERS // 3), "score": [0.5] * N_USERS},
    )
    skus = [f"s{i:02d}" for i in range(1, N_ITEMS + 1)] + ["s99"]
    items = _write(tmp / "items.parquet", {"sku": skus, "cat": [i % 3 for i in range(len(skus))]})
    return users, items


def _prepare(tmp: Path, **kw) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    log = kw.pop("log", None) or _write(tmp / "log.parquet", _log())
    cfg = {"user_col": "uid", "item_col": "sku", "label_col": "y", "time_col": "t", "split": "leave-last-out"}
    cfg |= kw.pop("cfg", {})
    return prepare_table(log, tmp / "ds", TableConfig(**cfg), **kw)


def test_kinds_towers_and_report(tmp_path: Path) -> None:
    users, items = _side_files(tmp_path)
    out = _prepare(tmp_path, users=users, items=items)
    schema = Schema.load(out)
    got = {f.name: (f.tower, f.kind) for f in schema.features}
    assert got == {
        "user_id": ("user", "categorical"),
        "item_id": ("item", "categorical"),
        "device": ("context", "categorical"),
        "dwell": ("context", "dense"),
        "tags": ("context", "sequence"),
        "country": ("user", "categorical"),
        "score": ("user", "dense"),
        "cat": ("item", "categorical"),
        "hist_item_id": ("user", "sequence"),
        "item_mean_label": ("item", "dense"),
        "item_count": ("item", "dense"),
    }
    assert schema["hist_item_id"].shares == "item_id" and schema["tags"].vocab_size == 5  # 4 tags + padding
    report = json.loads((out / "report.json").read_text())
    raw = {c["feature"]: c["column"] for c in report["columns"]}
    assert raw["user_id"] == "uid" and raw["item_id"] == "sku" and raw["label"] == "y" and raw["ts"] == "t"
    assert report["rows"] == {"train": N_USERS * (PER_USER - 2), "valid": N_USERS, "test": N_USERS}
    assert any("dwell" in w and "NaN" in w for w in report["warnings"])
    assert any("GAUC is undefined" in w for w in report["warnings"])  # leave-last-out + logged labels
    for split in ("train", "valid", "test", "items"):
        ParquetSplit(out, split)  # loads and passes the schema checks
    cat = pq.read_table(out / "items.parquet").to_pydict()
    assert cat["item_id"] == list(range(1, schema["item_id"].vocab_size))
    assert "s99" not in cat["raw_item_id"]  # only training items are catalogued
    assert all(c > 0 for c in cat["cat"])  # every catalogued item has its items-file category
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["item_id"] == cat["raw_item_id"] and vocab["device"] == ["ios", "web"] and vocab["user_id"][0] == 1
    batch = next(iter(make_loader(out, "train", 1000)))
    assert abs(float(batch.features["dwell"].mean())) < 0.2  # standardised with train statistics


def test_csv_and_parquet_agree(tmp_path: Path) -> None:
    a = _prepare(tmp_path / "a")
    (tmp_path / "b").mkdir()
    csv_cols = {k: v for k, v in _log().items() if k != "tags"}  # CSV has no list columns
    csv_out = _prepare(tmp_path / "b", log=_write(tmp_path / "b" / "log.csv", csv_cols))
    pq_cols = pq.read_table(a / "train").drop(["tags"]).to_pydict()
    assert pq.read_table(csv_out / "train").to_pydict() == pq_cols


def test_vocabularies_fitted_on_train_only(tmp_path: Path) -> None:
    out = _prepare(tmp_path)
    test = pq.read_table(out / "test").to_pydict()
    row = test["request_id"].index(1)  # user 1 (dense index 0 -> request 1)
    assert test["item_id"][row] == 0 and test["device"][row] == 0  # only seen in test -> unknown
    schema = Schema.load(out)
    assert schema["item_id"].vocab_size == 1 + len(_train_items())
    assert schema["device"].vocab_size == 3  # ios, web (+ padding); "tv" is test-only


def _train_items() -> set[str]:
    cols = _log()
    return {s for k, s in enumerate(cols["sku"]) if k % PER_USER < PER_USER - 2}


def test_leave_last_out_puts_last_row_in_test(tmp_path: Path) -> None:
    out = _prepare(tmp_path)
    last, second = {}, {}
    for u in range(1, N_USERS + 1):
        last[u], second[u] = 1_000 * u + 10 * (PER_USER - 1), 1_000 * u + 10 * (PER_USER - 2)
    test, valid = pq.read_table(out / "test").to_pydict(), pq.read_table(out / "valid").to_pydict()
    assert sorted(zip(test["request_id"], test["ts"], strict=True)) == sorted(last.items())
    assert sorted(zip(valid["request_id"], valid["ts"], strict=True)) == sorted(second.items())
    train = pq.read_table(out / "train").to_pydict()
    assert max(train["ts"][i] for i, r in enumerate(train["request_id"]) if r == 1) < second[1]


def test_other_splits(tmp_path: Path) -> None:
    g = _prepare(tmp_path / "g", cfg={"split": None})  # default with a time column and labels
    assert json.loads((g / "report.json").read_text())["split"] == "global-time"
    tr, te = pq.read_table(g / "train").column("ts").to_numpy(), pq.read_table(g / "test").column("ts").to_numpy()
    assert tr.max() < te.min()
    r = _prepare(tmp_path / "r", cfg={"time_col": None, "split": None})
    rows = json.loads((r / "meta.json").read_text())["rows"]
    assert sum(rows.values()) == N_USERS * PER_USER and rows["test"] == round(0.1 * N_USERS * PER_USER)
    assert "hist_item_id" not in Schema.load(r)


def test_history_holds_only_earlier_positives(tmp_path: Path) -> None:
    cols = _log()
    out = _prepare(tmp_path, cfg={"max_hist": 50})
    raw_of = dict(enumerate(pq.read_table(out / "items.parquet").column("raw_item_id").to_pylist(), start=1))
    for split in ("train", "valid", "test"):
        t = pq.read_table(out / split).to_pydict()
        for u, ts, hist in zip(t["request_id"], t["ts"], t["hist_item_id"], strict=True):
            expected = [
                s
                for uu, s, y, tt in zip(cols["uid"], cols["sku"], cols["y"], cols["t"], strict=True)
                if uu == u and y == 1 and tt < ts and s in raw_of.values()
            ]
            assert [raw_of[h] for h in hist] == expected, (split, u, ts)


def test_item_statistics_read_training_labels_out_of_fold(tmp_path: Path) -> None:
    cols = _log()
    out = _prepare(tmp_path, cfg={"split": "global-time"})
    tables = {s: pq.read_table(out / s).to_pydict() for s in ("train", "valid", "test")}
    train = tables["train"]
    y = np.array(train["label"], dtype=float)
    items = np.array(train["item_id"])
    prior, m = y.mean(), 20.0
    # valid, test and the catalogue: the item's smoothed rate over the whole training split
    for split in ("valid", "test"):
        t = tables[split]
        for i, rate in zip(t["item_id"], t["item_mean_label"], strict=True):
            rows = items == i
            assert rate == pytest.approx((y[rows].sum() + m * prior) / (rows.sum() + m), abs=1e-6)
    cat = pq.read_table(out / "items.parquet").to_pydict()
    for i, rate, count in zip(cat["item_id"], cat["item_mean_label"], cat["item_count"], strict=True):
        rows = items == i
        assert rate == pytest.approx((y[rows].sum() + m * prior) / (rows.sum() + m), abs=1e-6)
        assert count == pytest.approx(np.log1p(rows.sum()) / np.log1p(np.bincount(items).max()), abs=1e-6)
    # a training row's rate never reads a label of its own user: flip every label of one user, the user's own
    # rates stay, another user's rate of a shared item moves
    user = train["request_id"][0]  # request_id = dense user index + 1 = the raw uid here (uids are 1..N)
    flipped = dict(cols)
    flipped["y"] = [1 - v if u == user else v for u, v in zip(cols["uid"], cols["y"], strict=True)]
    out2 = _prepare(tmp_path / "flip", log=_write(tmp_path / "flip.parquet", flipped), cfg={"split": "global-time"})
    train2 = pq.read_table(out2 / "train").to_pydict()
    own = [k for k, u in enumerate(train["request_id"]) if u == user]
    assert own and all(train2["item_mean_label"][k] == train["item_mean_label"][k] for k in own)
    user_items = {train["item_id"][k] for k in own}
    others = [k for k, (u, i) in enumerate(zip(train["request_id"], train["item_id"], strict=True))
              if u != user and i in user_items]  # fmt: skip
    assert any(train2["item_mean_label"][k] != train["item_mean_label"][k] for k in others)
    none = _prepare(tmp_path / "none", cfg={"split": "global-time", "item_stats": False})
    assert "item_mean_label" not in Schema.load(none)
    assert "item_count" not in pq.read_table(none / "items.parquet").column_names


def test_implicit_negatives(tmp_path: Path) -> None:
    cols = {k: v for k, v in _log().items() if k != "y"}
    log = _write(tmp_path / "log.parquet", cols)
    interacted = defaultdict(set)
    for u, s in zip(cols["uid"], cols["sku"], strict=True):
        interacted[u].add(s)
    for mode in ("uniform", "popularity"):
        out = prepare_table(
            log,
            tmp_path / mode,
            TableConfig("uid", "sku", implicit=True, time_col="t", negatives=3, negative_sampling=mode, seed=1),
        )
        raw_of = dict(enumerate(pq.read_table(out / "items.parquet").column("raw_item_id").to_pylist(), start=1))
        for split in ("train", "valid", "test"):
            t = pq.read_table(out / split).to_pydict()
            y = np.array(t["label"])
            assert (y == 0).sum() == 3 * (y == 1).sum()
            for u, i, lab in zip(t["request_id"], t["item_id"], t["label"], strict=True):
                if lab == 0:
                    assert i > 0 and raw_of[i] not in interacted[u]
        again = prepare_table(
            log,
            tmp_path / f"{mode}2",
            TableConfig("uid", "sku", implicit=True, time_col="t", negatives=3, negative_sampling=mode, seed=1),
        )
        assert pq.read_table(again / "train").equals(pq.read_table(out / "train"))  # seeded


def test_sample_negatives_skips_full_users() -> None:
    rng = np.random.default_rng(0)
    user = np.array([0, 0, 1])
    interacted = np.array([0 * 4 + 1, 0 * 4 + 2, 0 * 4 + 3, 1 * 4 + 1])  # user 0 has every item 1..3
    rows, items = sample_negatives(user, 5, 3, interacted, None, rng)
    assert set(rows.tolist()) == {2} and set(items.tolist()) <= {2, 3} and len(items) == 5


def test_errors_name_the_problem(tmp_path: Path) -> None:
    good = _write(tmp_path / "log.parquet", _log())
    cfg = {"user_col": "uid", "item_col": "sku", "label_col": "y", "time_col": "t"}

    def fails(match: str, log: Path = good, out: str = "o", **kw) -> None:
        c = cfg | kw.pop("cfg", {})
        with pytest.raises(TableError, match=match):
            prepare_table(log, tmp_path / out, TableConfig(**c), **kw)

    fails(r"no column\(s\) \['nope'\]", cfg={"item_col": "nope"})
    fails("no column", users=_write(tmp_path / "u.csv", {"user": [1, 2]}))
    fails("duplicate keys in column 'uid'", users=_write(tmp_path / "u2.csv", {"uid": [1, 1, 2], "a": [1, 2, 3]}))
    fails("duplicate keys in column 'sku'", items=_write(tmp_path / "i.parquet", {"sku": ["s01", "s01"]}))
    fails(r"label column 'dwell' is not binary", cfg={"label_col": "dwell"})
    bad_label = _write(tmp_path / "l.csv", {"uid": [1, 2], "sku": ["a", "b"], "y": ["yes", "no"], "t": [1, 2]})
    fails("label column 'y' has type string", log=bad_label)
    one_row_each = _write(
        tmp_path / "one.csv", {"uid": [1, 2, 3], "sku": ["a", "b", "c"], "y": [1, 0, 1], "t": [1, 2, 3]}
    )
    fails("the valid split is empty", log=one_row_each)
    garbage = tmp_path / "bad.parquet"
    garbage.write_bytes(b"not parquet at all")
    fails("cannot read interactions file", log=garbage)
    fails("does not exist", log=tmp_path / "missing.csv")
    fails("unknown extension", log=_write(tmp_path / "x.csv", {"a": [1]}).rename(tmp_path / "x.json"))
    empty = tmp_path / "empty.csv"
    empty.write_text("uid,sku,y,t\n")
    fails("has no rows", log=empty)
    fails("exactly one of --label-col", cfg={"implicit": True})
    fails("needs a time column", cfg={"time_col": None, "split": "leave-last-out"})
    fails("--negatives samples negatives for --implicit", cfg={"negatives": 2})


def test_cli_prepare_errors_and_train(tmp_path: Path) -> None:
    users, items = _side_files(tmp_path)
    log = _write(tmp_path / "log.csv", {k: v for k, v in _log().items() if k != "tags"})
    out, run = tmp_path / "ds", tmp_path / "run"
    base = ["data", "prepare", "table", "--interactions", str(log), "--user-col", "uid", "--item-col", "sku"]
    res = runner.invoke(app, [*base, "--label-col", "nope", "--out", str(out), "--no-progress"])
    assert res.exit_code == 2 and "['nope']" in " ".join(res.output.split())
    args = [*base, "--users", str(users), "--items", str(items), "--label-col", "y", "--time-col", "t"]
    res = runner.invoke(app, [*args, "--out", str(out), "--no-progress"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "hist_item_id" in res.output and "context" in res.output and "wrote" in res.output
    train = ["train", "--model", "two_tower", "--data", str(out), "--out", str(run)]
    res = runner.invoke(app, [*train, "--epochs", "1", "--max-steps", "5", "--batch-size", "16", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (run / "best.pt").exists()


def test_parquet_types_and_dropped_columns(tmp_path: Path) -> None:
    import datetime as dt

    n = 60
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    log = {
        "u": [i % 6 for i in range(n)],
        "i": [i % 9 + 100 for i in range(n)],
        "y": [i % 3 == 0 for i in range(n)],  # booleans are 0/1 labels
        "when": [start + dt.timedelta(hours=i) for i in range(n)],  # timezone-aware timestamps
        "day": [dt.date(2024, 1, 1)] * n,  # a date that is not the time column: dropped
        "label": [1] * n,  # reserved name: dropped
        "flag": pa.array(["a", "b", "c"] * 20).dictionary_encode(),
    }
    items = {"i": list(range(100, 109)), "genres": [[f"g{j % 4}", f"g{(j + 1) % 4}"] for j in range(9)]}
    out = prepare_table(
        _write(tmp_path / "l.parquet", log),
        tmp_path / "ds",
        TableConfig("u", "i", label_col="y", time_col="when", split="leave-last-out"),
        items=_write(tmp_path / "it.parquet", items),
    )
    schema = Schema.load(out)
    assert (schema["genres"].tower, schema["genres"].kind, schema["genres"].max_len) == ("item", "sequence", 2)
    assert schema["flag"].kind == "categorical" and "day" not in schema and "label" not in schema
    dropped = {d["column"]: d["reason"] for d in json.loads((out / "report.json").read_text())["dropped"]}
    assert "unsupported type date32" in dropped["day"] and "reserved" in dropped["label"]
    cat = pq.read_table(out / "items.parquet").to_pydict()
    assert cat["raw_item_id"] == list(range(100, 109)) and all(len(g) == 2 for g in cat["genres"])
    for split in ("train", "valid", "test", "items"):
        ParquetSplit(out, split)
