"""Taobao UserBehavior recipe: (user, day, item) aggregation, graded labels, day split, strictly-earlier features."""

from __future__ import annotations

import gzip
import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from prerank.data.parquet import ParquetSplit, make_loader
from prerank.data.recipes import RecipeError, prepare
from prerank.data.recipes.taobao import TaobaoConfig, prepare_taobao
from prerank.schema import Schema

H = 3600
DAY = 24 * H
#: 2017-11-25 00:00 China time, computed independently of the recipe's constant
DAY0 = int(datetime(2017, 11, 25, tzinfo=timezone(timedelta(hours=8))).timestamp())


def at(day: int, seconds: int) -> int:
    """Unix time of ``seconds`` after midnight of day ``day`` (China time, day 0 = 2017-11-25)."""
    return DAY0 + day * DAY + seconds


EVENTS = [
    # user, item, category, behaviour, time
    (1, 10, 100, "pv", at(0, 10 * H)),
    (1, 10, 100, "pv", at(0, 10 * H + 300)),
    (1, 10, 100, "cart", at(0, 10 * H + 600)),
    (1, 11, 200, "pv", at(0, 11 * H)),
    (1, 11, 200, "fav", at(1, 9 * H)),
    (1, 10, 100, "pv", at(7, 11 * H)),
    (1, 10, 100, "buy", at(7, 12 * H)),
    (1, 12, 100, "fav", at(8, 8 * H)),
    (1, 10, 100, "pv", at(8, 9 * H)),
    (2, 10, 100, "pv", at(0, 8 * H)),
    (2, 12, 100, "pv", at(2, 8 * H)),
    (2, 13, 300, "buy", at(3, 8 * H)),
    (2, 13, 300, "pv", at(7, 8 * H)),
    (2, 11, 200, "cart", at(8, 8 * H)),
    (3, 14, 300, "pv", at(0, DAY - 1)),  # 23:59:59 China time (15:59:59 UTC) ...
    (3, 14, 300, "pv", at(1, 0)),  # ... and midnight: two days in China, one in UTC
    (3, 13, 300, "fav", at(4, H)),
    (3, 10, 100, "pv", at(5, H)),
    (3, 13, 300, "pv", at(8, H)),
    (3, 14, 300, "pv", at(-1, 23 * H)),  # 2017-11-24: out of range
    (3, 14, 300, "pv", at(9, H)),  # 2017-12-04: out of range
]


def write_csv(path: Path, events: list[tuple] = EVENTS) -> Path:
    text = "".join(",".join(map(str, e)) + "\n" for e in events)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def tables(root: Path) -> dict[str, list[dict]]:
    return {s: ds.dataset(root / s).to_table().to_pylist() for s in ("train", "valid", "test")}


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    return prepare("taobao-user-behavior", write_csv(tmp_path / "raw" / "UserBehavior.csv"), tmp_path / "out")


def decoder(root: Path) -> dict[int, int]:
    items = ds.dataset(root / "items.parquet").to_table()
    return dict(zip(items.column("item_id").to_pylist(), items.column("raw_item_id").to_pylist(), strict=True))


def test_rows_labels_and_split(prepared: Path) -> None:
    raw_item = decoder(prepared)
    rows = {(r["request_id"], raw_item[r["item_id"]]): (s, r) for s, table in tables(prepared).items() for r in table}
    assert len(rows) == 16  # 19 in-range events -> 16 (user, day, item) rows
    expected = {  # (request_id, item) -> split, label_level, label, first event
        (100, 10): ("train", 3, 1.0, at(0, 10 * H)),
        (100, 11): ("train", 1, 0.0, at(0, 11 * H)),
        (101, 11): ("train", 2, 1.0, at(1, 9 * H)),
        (107, 10): ("valid", 4, 1.0, at(7, 11 * H)),
        (108, 12): ("test", 2, 1.0, at(8, 8 * H)),
        (108, 10): ("test", 1, 0.0, at(8, 9 * H)),
        (300, 14): ("train", 1, 0.0, at(0, DAY - 1)),
        (301, 14): ("train", 1, 0.0, at(1, 0)),
        (208, 11): ("test", 3, 1.0, at(8, 8 * H)),
    }
    for key, (split, level, label, ts) in expected.items():
        s, r = rows[key]
        assert (s, r["label_level"], r["label"], r["ts"]) == (split, level, label, ts), key
    for s, r in rows.values():
        day = r["request_id"] % 100
        assert s == ("train" if day <= 6 else "valid" if day == 7 else "test")
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["counts"]["dropped_events_outside_2017-11-25..2017-12-03_china_time"] == 2
    assert meta["counts"]["raw_events"] == len(EVENTS)
    assert meta["rows"] == {"train": 10, "valid": 2, "test": 4}


def test_loads_and_has_documented_features(prepared: Path) -> None:
    schema = Schema.load(prepared)
    for split in ("train", "valid", "test", "items"):
        assert ParquetSplit(prepared, split).num_rows > 0
    assert sum(len(b) for b in make_loader(prepared, "train", batch_size=4)) == 10
    assert schema.has_label_level and all(f.description for f in schema.features)
    assert len(schema.tower("cross")) >= 4
    assert schema["hist_item_id"].shares == "item_id" and schema["hist_category_id"].shares == "category_id"


def _brute_force(all_rows: dict[str, list[dict]]) -> dict[str, list[tuple]]:
    """Features recomputed from the output rows: earlier days, allowed splits only (codes == raw ids here)."""
    order = ("train", "valid", "test")
    events = [(s, r) for s in order for r in all_rows[s]]
    out: dict[str, list[tuple]] = {}
    for si, s in enumerate(order):
        allowed = set(order[: max(si, 1)])
        out[s] = []
        for r in all_rows[s]:
            user, day = divmod(r["request_id"], 100)
            past = sorted(
                (
                    e
                    for es, e in events
                    if es in allowed and e["request_id"] // 100 == user and e["request_id"] % 100 < day
                ),
                key=lambda e: e["ts"],
            )
            out[s].append(
                (
                    [e["item_id"] for e in past],
                    [e["category_id"] for e in past],
                    sum(e["category_id"] == r["category_id"] for e in past),
                    sum(e["category_id"] == r["category_id"] and e["label"] == 1 for e in past),
                    sum(e["item_id"] == r["item_id"] for e in past),
                )
            )
    return out


def test_histories_and_log_features_are_strictly_before_the_day(prepared: Path) -> None:
    rows = tables(prepared)
    expected = _brute_force(rows)
    names = ("user_cat_before", "user_cat_pos_before", "user_item_before")
    reference = [max(e[2 + k] for e in expected["train"]) for k in range(3)]
    nonempty = 0
    for s in rows:
        for r, (items, cats, *counts) in zip(rows[s], expected[s], strict=True):
            assert r["hist_item_id"] == items and r["hist_category_id"] == cats
            for name, count, ref in zip(names, counts, reference, strict=True):
                assert r[name] == pytest.approx(math.log1p(count) / math.log1p(max(ref, 1)), rel=1e-6), name
            nonempty += bool(items)
    assert nonempty >= 8
    raw_item = decoder(prepared)
    (test_row,) = [r for r in rows["test"] if r["request_id"] == 108 and raw_item[r["item_id"]] == 12]
    # user 1 before 2017-12-03: (day 0: 10, 11), (day 1: 11), (day 7, valid: 10), oldest first
    assert [raw_item[i] for i in test_row["hist_item_id"]] == [10, 11, 11, 10]


def test_test_days_never_see_each_other(tmp_path: Path) -> None:
    raw = write_csv(tmp_path / "UserBehavior.csv", [*EVENTS, (1, 13, 300, "pv", at(6, H))])
    root = prepare_taobao(raw, tmp_path / "out", "temporal", 0, config=TaobaoConfig(test_days=2))
    rows = tables(root)
    assert {r["request_id"] % 100 for r in rows["test"]} == {7, 8}
    assert {r["request_id"] % 100 for r in rows["valid"]} == {6}
    for s, expected in _brute_force(rows).items():
        assert [r["hist_item_id"] for r in rows[s]] == [e[0] for e in expected], s
        assert [r["user_item_before"] > 0 for r in rows[s]] == [e[4] > 0 for e in expected], s


def test_test_labels_are_never_used(tmp_path: Path) -> None:
    base = prepare("taobao-user-behavior", write_csv(tmp_path / "a.csv"), tmp_path / "da")
    muted = [(u, i, c, "pv" if t >= DAY0 + 8 * DAY else b, t) for u, i, c, b, t in EVENTS]
    other = prepare("taobao-user-behavior", write_csv(tmp_path / "b.csv", muted), tmp_path / "db")
    a, b = tables(base), tables(other)
    assert sum(r["label"] for r in b["test"]) == 0 < sum(r["label"] for r in a["test"])
    for s in a:
        strip = lambda rows: [{k: v for k, v in r.items() if k not in ("label", "label_level")} for r in rows]  # noqa: E731
        assert strip(a[s]) == strip(b[s]), s


def test_gzip_and_folder_inputs(tmp_path: Path, prepared: Path) -> None:
    gz = write_csv(tmp_path / "gz" / "UserBehavior_part.csv.gz")
    for raw in (gz, gz.parent):
        root = prepare("taobao-user-behavior", raw, tmp_path / "out_gz", seed=0)
        assert tables(root) == tables(prepared)


def test_errors(tmp_path: Path) -> None:
    bad = write_csv(tmp_path / "bad.csv", [*EVENTS[:3], (1, 10, 100, "like", at(0, H))])
    with pytest.raises(RecipeError, match="like"):
        prepare("taobao-user-behavior", bad, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="no UserBehavior"):
        prepare("taobao-user-behavior", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(RecipeError, match="no protocol 'paper'"):
        prepare("taobao-user-behavior", write_csv(tmp_path / "ok.csv"), tmp_path / "out", "paper")
    only_test = write_csv(tmp_path / "late.csv", [e for e in EVENTS if e[4] >= DAY0 + 7 * DAY])
    with pytest.raises(RecipeError, match="no events on the training days"):
        prepare("taobao-user-behavior", only_test, tmp_path / "out")


@pytest.mark.realdata
def test_real_taobao_sample(tmp_path: Path, taobao_sample: Path) -> None:
    raw = taobao_sample
    root = prepare("taobao-user-behavior", raw, tmp_path / "taobao")
    meta = json.loads((root / "meta.json").read_text())
    assert meta["counts"]["raw_events"] == 84_287
    by_kind = meta["counts"]["events_by_behaviour"]
    dropped = meta["counts"]["dropped_events_outside_2017-11-25..2017-12-03_china_time"]
    assert sum(by_kind.values()) + dropped == 84_287
    assert meta["counts"]["users"] == 814
    levels = np.concatenate([ds.dataset(root / s).to_table().column("label_level").to_numpy() for s in meta["rows"]])
    assert set(levels.tolist()) == {1, 2, 3, 4}
