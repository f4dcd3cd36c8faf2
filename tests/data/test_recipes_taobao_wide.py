"""The wide Taobao UserBehavior feature set (FSCD, issue 22): size, cost types, leak-freeness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from test_recipes_taobao import DAY, DAY0, H, tables, write_csv

from prerank.data.parquet import ParquetSplit, make_loader
from prerank.data.recipes import prepare
from prerank.schema import Schema

BEHAVIOURS = ("pv", "pv", "pv", "fav", "cart", "buy")


def random_events(seed: int = 0, users: int = 12, items: int = 25, per_user: int = 30) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for u in range(1, users + 1):
        for _ in range(per_user):
            item = int(rng.integers(1, items + 1))
            t = DAY0 + int(rng.integers(0, 9)) * DAY + int(rng.integers(0, 20)) * H + int(rng.integers(0, 3600))
            out.append((u, item, 100 + item % 5, BEHAVIOURS[int(rng.integers(0, len(BEHAVIOURS)))], t))
    return out


def wide(tmp: Path, events: list[tuple], name: str = "out") -> Path:
    return prepare("taobao-user-behavior", write_csv(tmp / f"{name}.csv", events), tmp / name, features="wide")


@pytest.fixture(scope="module")
def events() -> list[tuple]:
    return random_events()


def test_wide_set_has_40_fields_of_every_cost_type(tmp_path: Path, events: list[tuple]) -> None:
    root = wide(tmp_path, events)
    schema = Schema.load(root)
    assert len(schema.features) >= 40
    assert {f.cost_type for f in schema.features} == {"I", "II", "III", "IV"}
    assert all(f.description for f in schema.features)
    for split in ("train", "valid", "test"):
        assert sum(len(b) for b in make_loader(root, split, batch_size=16)) == ParquetSplit(root, split).num_rows
    items = ds.dataset(root / "items.parquet").to_table()
    assert {f.name for f in schema.tower("item")} <= set(items.column_names)
    default = prepare("taobao-user-behavior", tmp_path / "out.csv", tmp_path / "default")
    assert set(Schema.load(default).names) < set(schema.names)
    assert len(Schema.load(default).names) == 13


def test_past_only_fields_are_empty_on_a_users_first_day(tmp_path: Path, events: list[tuple]) -> None:
    rows = tables(wide(tmp_path, events))["train"]
    first_day = {}
    for r in rows:
        first_day[r["request_id"] // 100] = min(first_day.get(r["request_id"] // 100, 99), r["request_id"] % 100)
    first = [r for r in rows if r["request_id"] % 100 == first_day[r["request_id"] // 100]]
    later = [r for r in rows if r["request_id"] % 100 != first_day[r["request_id"] // 100]]
    assert first and later
    for r in first:
        assert r["user_past_rows"] == 0 and r["user_past_days"] == 0 and r["user_days_since"] == 1.0
        assert r["user_cat_days_since"] == 1.0 and r["hist_cat_cooc"] == 0 and r["hist_pos_item_id"] == []
    assert all(r["user_past_rows"] > 0 for r in later)  # so the checks above can fail


def test_no_field_reads_its_own_rows_label(tmp_path: Path, events: list[tuple]) -> None:
    """Turn one positive training row into a view: none of its own fields may move, other rows' fields do."""
    a = tables(wide(tmp_path, events, "a"))["train"]
    target = next(i for i, r in enumerate(a) if r["label"] == 1 and 2 <= r["request_id"] % 100 <= 4)
    row = a[target]
    user, day = row["request_id"] // 100, row["request_id"] % 100
    items = ds.dataset(tmp_path / "a" / "items.parquet").to_table()
    raw_item = dict(zip(items.column("item_id").to_pylist(), items.column("raw_item_id").to_pylist(), strict=True))
    raw_item = raw_item[row["item_id"]]
    muted = [
        (u, i, c, "pv" if (u, i, (t - DAY0) // DAY) == (user, raw_item, day) else b, t) for u, i, c, b, t in events
    ]
    b = tables(wide(tmp_path, muted, "b"))["train"]
    assert b[target]["label"] == 0 and b[target]["item_id"] == row["item_id"]
    moved = set()
    for name in row:
        if name in ("label", "label_level"):
            continue
        assert b[target][name] == row[name], name
        if [r[name] for r in a] != [r[name] for r in b]:
            moved.add(name)
    assert {"user_past_pos_rate", "item_past_pos_rate", "hist_pos_item_id", "user_mean_level"} <= moved


def test_test_labels_are_never_used_by_the_wide_set(tmp_path: Path, events: list[tuple]) -> None:
    a = tables(wide(tmp_path, events, "a"))
    muted = [(u, i, c, "pv" if t >= DAY0 + 8 * DAY else b, t) for u, i, c, b, t in events]
    b = tables(wide(tmp_path, muted, "b"))
    assert sum(r["label"] for r in b["test"]) == 0 < sum(r["label"] for r in a["test"])
    for s in a:
        strip = lambda rows: [{k: v for k, v in r.items() if k not in ("label", "label_level")} for r in rows]  # noqa: E731
        assert strip(a[s]) == strip(b[s]), s


@pytest.mark.realdata
def test_real_taobao_sample_wide(tmp_path: Path, taobao_sample: Path) -> None:
    raw = taobao_sample
    root = prepare("taobao-user-behavior", raw, tmp_path / "taobao", features="wide")
    schema = Schema.load(root)
    assert len(schema.features) >= 40
    assert {f.cost_type for f in schema.features} == {"I", "II", "III", "IV"}
    for split in ("train", "test"):
        t = ds.dataset(root / split).to_table()
        for f in schema.features:
            if f.kind == "dense":
                assert np.isfinite(np.asarray(t.column(f.name))).all(), (f.name, split)
