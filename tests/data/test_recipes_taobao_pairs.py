"""Cross fields of unlogged (request, item) pairs on Taobao UserBehavior (issue 22): equal to the recipe's on
logged pairs, leak-free, and filled by ``cascade build --cross compute``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from cascade_pairs import cold_teacher, computed_cascade
from test_recipes_taobao import DAY, DAY0, write_csv
from test_recipes_taobao_wide import random_events
from typer.testing import CliRunner

from prerank.cli import app
from prerank.cli import cascade as _cascade  # noqa: F401  (registers the commands)
from prerank.data.cascade import CascadeConfig, build_cascade
from prerank.data.parquet import DataError
from prerank.data.recipes import RecipeError, cross_features, prepare
from prerank.data.recipes.taobao_pairs import DEFAULT_CROSS, WIDE_CROSS, TaobaoCross
from prerank.schema import Schema

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def events() -> list[tuple]:
    ev = random_events(seed=1, users=14, items=30, per_user=40)
    # the log gives a few items two categories: item 3's rows of one user carry another category
    return [(u, i, 999 if (u, i) == (2, 3) else c, b, t) for u, i, c, b, t in ev]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory, events: list[tuple]) -> Path:
    return write_csv(tmp_path_factory.mktemp("raw") / "UserBehavior.csv", events)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory, raw: Path) -> Path:
    return prepare("taobao-user-behavior", raw, tmp_path_factory.mktemp("wide") / "out", seed=3, features="wide")


def _items(root: Path) -> np.ndarray:
    return np.asarray(pq.read_table(root / "items.parquet").column("item_id"))


def _mute(events: list[tuple], keep) -> list[tuple]:
    """Events with every fav/cart/buy for which ``keep(user, item, day)`` is false turned into a view."""
    return [(u, i, c, b if keep(u, i, (t - DAY0) // DAY) else "pv", t) for u, i, c, b, t in events]


def _all_pairs(cross: TaobaoCross, split: int, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.nonzero(cross.split == split)[0]
    return np.repeat(rows, len(items)), np.tile(items, len(rows))


def test_logged_pairs_equal_the_recipes_cross_fields(wide: Path, raw: Path) -> None:
    cross = cross_features(wide, raw)
    assert isinstance(cross, TaobaoCross)
    schema = Schema.load(wide)
    assert set(cross.names) == {f.name for f in schema.features if f.tower == "cross"} == {*DEFAULT_CROSS, *WIDE_CROSS}
    two_categories = 0
    for split in SPLITS:
        table = ds.dataset(wide / split).to_table()
        known = np.asarray(table["item_id"]) > 0
        table = table.filter(pa.array(known))
        got = cross(split, table, np.asarray(table["item_id"]))  # what the cascade builder checks
        for name in cross.names:
            np.testing.assert_allclose(
                got[name], np.asarray(table[name]), rtol=1e-6, atol=1e-7, err_msg=f"{split} {name}"
            )
        items = pq.read_table(wide / "items.parquet")
        catalogue = dict(zip(items["item_id"].to_pylist(), items["category_id"].to_pylist(), strict=True))
        logged = zip(table["item_id"].to_pylist(), table["category_id"].to_pylist(), strict=True)
        two_categories += sum(catalogue[i] != c for i, c in logged)
    assert two_categories > 0  # a logged row whose category is not its item's catalogue category was checked
    train = ds.dataset(wide / "train").to_table()
    assert all(np.ptp(np.asarray(train[name])) > 0 for name in cross.names)  # so the checks above can fail


def test_unlogged_pairs_read_no_label_of_their_anchor(tmp_path: Path, events: list[tuple], wide: Path, raw: Path):
    """Turn one positive training row into a view: none of its request's pairs with any item moves; later
    requests' pairs move."""
    base = cross_features(wide, raw)
    train = ds.dataset(wide / "train").to_table().to_pylist()
    row = next(r for r in train if r["label"] == 1 and 2 <= r["request_id"] % 100 <= 5)
    user, day = row["request_id"] // 100, row["request_id"] % 100
    raw_item = int(base.vocabs["item_id"].values[row["item_id"] - 1])
    muted = _mute(events, lambda u, i, d: (u, i, d) != (user, raw_item, day))
    flipped = TaobaoCross.from_raw(write_csv(tmp_path / "b.csv", muted), wide)  # same rows, split, folds
    assert flipped.label.sum() < base.label.sum()
    items = _items(wide)
    anchor = base.anchor_rows("train", pa.table({"request_id": [row["request_id"]]}))
    a, b = base.pairs(np.repeat(anchor, len(items)), items), flipped.pairs(np.repeat(anchor, len(items)), items)
    for name in base.names:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    many = _all_pairs(base, 1, items)  # validation anchors read the flipped row (out-of-fold, past-only, cooc)
    a, b = base.pairs(*many), flipped.pairs(*many)
    moved = {name for name in base.names if not np.array_equal(a[name], b[name])}
    assert {"user_cat_rate", "user_cat_level", "item_past_pos_rate", "user_item_pos_before"} <= moved


def test_unlogged_pairs_never_read_test_labels(tmp_path: Path, events: list[tuple], wide: Path, raw: Path) -> None:
    base = cross_features(wide, raw)
    flipped = TaobaoCross.from_raw(write_csv(tmp_path / "b.csv", _mute(events, lambda u, i, d: d < 8)), wide)
    assert flipped.label[flipped.split == 2].sum() == 0 < base.label[base.split == 2].sum()
    items = _items(wide)
    for s in range(3):
        a, b = base.pairs(*_all_pairs(base, s, items)), flipped.pairs(*_all_pairs(flipped, s, items))
        for name in base.names:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{SPLITS[s]} {name}")


def test_refusals(tmp_path: Path, wide: Path, raw: Path) -> None:
    with pytest.raises(RecipeError, match="do not reproduce|does not reproduce"):
        cross_features(wide, write_csv(tmp_path / "other.csv", random_events(seed=5, users=6, items=10)))
    cross = cross_features(wide, raw)
    with pytest.raises(RecipeError, match="unknown id 0"):
        cross.pairs(np.array([0]), np.array([0]))
    with pytest.raises(RecipeError, match="of the recipe re-run"):
        cross.anchor_rows("valid", pa.table({"request_id": [ds.dataset(wide / "train").to_table()["request_id"][0]]}))
    other = tmp_path / "other"
    shutil.copytree(wide, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps(meta | {"recipe": "synthetic"}))
    with pytest.raises(RecipeError, match="implemented for"):
        cross_features(other, raw)


def test_cascade_compute_fills_cross_fields_of_unlogged_rows(tmp_path: Path, wide: Path, raw: Path) -> None:
    cross, unexposed = computed_cascade(wide, raw, tmp_path / "cascade")
    for split, rest in unexposed.items():
        # an unexposed row's cross fields are those of its request paired with its item (every source of a
        # Taobao cross field is the request's: user, day, fold, history)
        want = cross.pairs(cross.anchor_rows(split, rest), np.asarray(rest["item_id"]))
        for name in cross.names:
            np.testing.assert_allclose(np.asarray(rest[name]), want[name], rtol=1e-6, err_msg=f"{split} {name}")
        assert np.ptp(np.asarray(rest["user_cat_days_since"])) > 0  # not padding


def test_cascade_compute_errors(tmp_path: Path, events: list[tuple], wide: Path, raw: Path) -> None:
    teacher = cold_teacher(wide, tmp_path / "teacher.pt")
    small = {"retrieve": 8, "rank_candidates": 3, "prerank_candidates": 4, "random": 5, "cross": "compute",
             "unknown_items": "skip"}  # fmt: skip
    # a provider built from a log whose training labels differ cannot reproduce the impressions' cross fields
    flipped = write_csv(tmp_path / "flip.csv", _mute(events, lambda u, i, d: d > 0))
    with pytest.raises(DataError, match="does not reproduce"):
        build_cascade(
            wide, teacher, tmp_path / "b", CascadeConfig(**small), cross_features=cross_features(wide, flipped)
        )
    runner = CliRunner()
    args = ["cascade", "build", "--data", str(wide), "--teacher", str(teacher), "--retrieve", "8",
            "--rank-candidates", "3", "--prerank-candidates", "4", "--random", "5",
            "--unknown-items", "skip"]  # fmt: skip
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "c"), "--cross", "compute"])
    assert res.exit_code != 0 and "--raw" in res.output
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "d"), "--cross", "compute", "--raw", str(flipped)])
    assert res.exit_code != 0 and "does not reproduce" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "e"), "--cross", "compute", "--raw", str(tmp_path / "no")])
    assert res.exit_code != 0 and "does not exist" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "f"), "--cross", "compute", "--raw", str(raw)])
    assert res.exit_code == 0, res.output
    assert "hist_cat_cooc" in Schema.load(tmp_path / "f").names


@pytest.mark.realdata
def test_real_taobao_sample_pairs(tmp_path: Path, taobao_sample: Path) -> None:
    raw = taobao_sample
    root = prepare("taobao-user-behavior", raw, tmp_path / "wide", features="wide")
    cross = cross_features(root, raw)
    for split in SPLITS:
        table = ds.dataset(root / split).to_table()
        table = table.filter(pa.array(np.asarray(table["item_id"]) > 0))
        got = cross(split, table, np.asarray(table["item_id"]))
        for name in cross.names:
            np.testing.assert_allclose(
                got[name], np.asarray(table[name]), rtol=1e-6, atol=1e-7, err_msg=f"{split} {name}"
            )
