"""The wide MovieLens feature set (FSCD, issue 22): size, cost types, leak-freeness, every model on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from test_recipes_movielens import _unique_ts, check_loadable, load_all, make_ratings, read_split, write_ml1m

from conftest import SHARED_DATA
from prerank.data.align import check_aligned
from prerank.data.parquet import make_loader
from prerank.data.recipes import RecipeError, prepare
from prerank.data.recipes.movielens_wide import TIMED
from prerank.models.registry import MODELS, build_model
from prerank.schema import Schema

PAST_ONLY_EMPTY = {  # value of each past-only field on a user's first training row
    "user_past_count": 0.0,
    "user_genre_past_count": 0.0,
    "user_since_last": 1.0,
    "hist_cooc": 0.0,
    "hist_genre_sim": 0.0,
}


@pytest.fixture(scope="module")
def ratings():
    return _unique_ts(make_ratings(n_users=16, n_movies=30, per_user=25))


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory, ratings) -> Path:
    tmp = tmp_path_factory.mktemp("wide")
    return prepare("ml-1m", write_ml1m(tmp / "raw", ratings, n_users=16, n_movies=30), tmp / "out", "temporal",
                   seed=3, features="wide")  # fmt: skip


def test_wide_set_has_40_fields_of_every_cost_type(wide: Path) -> None:
    schema = check_loadable(wide)
    assert len(schema.features) >= 40
    assert {f.cost_type for f in schema.features} == {"I", "II", "III", "IV"}
    assert all(f.description for f in schema.features)
    default = Schema.load(wide.parent / "default") if (wide.parent / "default").exists() else None
    assert default is None or set(default.names) < set(schema.names)
    items = ds.dataset(wide / "items.parquet").to_table()
    assert {f.name for f in schema.tower("item")} <= set(items.column_names)  # the catalogue serves every item field
    meta = json.loads((wide / "meta.json").read_text())
    assert meta["features"] == "wide" and schema.name.endswith("-wide")


def test_default_set_is_unchanged_by_the_option(tmp_path: Path, ratings) -> None:
    raw = write_ml1m(tmp_path / "raw", ratings, n_users=16, n_movies=30)
    a = prepare("ml-1m", raw, tmp_path / "a", "temporal", seed=3)
    b = prepare("ml-1m", raw, tmp_path / "b", "temporal", seed=3, features="default")
    assert len(Schema.load(a).features) == 17
    for split in ("train", "valid", "test"):
        assert ds.dataset(a / split).to_table().equals(ds.dataset(b / split).to_table())


def test_wide_needs_a_known_set(tmp_path: Path, ratings) -> None:
    raw = write_ml1m(tmp_path / "raw", ratings, n_users=16, n_movies=30)
    with pytest.raises(RecipeError, match="feature set"):
        prepare("ml-1m", raw, tmp_path / "b", "temporal", features="huge")


def test_past_only_fields_are_empty_on_a_users_first_row(wide: Path) -> None:
    train = ds.dataset(wide / "train").to_table()  # rows sorted by user, then time
    users = np.asarray(train.column("request_id"))
    first = np.r_[0, np.nonzero(np.diff(users))[0] + 1]
    for name, value in PAST_ONLY_EMPTY.items():
        np.testing.assert_array_equal(np.asarray(train.column(name))[first], value, err_msg=name)
    for name in ("hist_item_id", "hist_neg_item_id", "hist_genres"):
        assert all(len(train.column(name)[int(i)].as_py()) == 0 for i in first), name
    later = np.setdiff1d(np.arange(train.num_rows), first)
    assert (np.asarray(train.column("user_past_count"))[later] > 0).all()  # so the check above can fail


def test_no_field_reads_its_own_rows_label(tmp_path: Path, ratings) -> None:
    """Flip one training row's rating: none of its own fields may move, while other rows' fields do."""
    base = prepare("ml-1m", write_ml1m(tmp_path / "a", ratings, n_users=16, n_movies=30), tmp_path / "da",
                   "temporal", seed=3, features="wide")  # fmt: skip
    train = ds.dataset(base / "train").to_table()
    level = np.asarray(train.column("label_level"))
    users = np.asarray(train.column("request_id"))
    # a positive training row in the middle of its user's history: its fields are non-trivial, and later rows
    # of the user see it in their past-only fields
    before = np.array([(users[:i] == u).sum() for i, u in enumerate(users)])
    after = np.array([(users[i + 1 :] == u).sum() for i, u in enumerate(users)])
    target = int(np.nonzero((level >= 4) & (before >= 5) & (after >= 5))[0][0])
    key = (train.column("request_id")[target].as_py(), train.column("ts")[target].as_py())
    raw_row = next(i for i, k in enumerate(zip(ratings.user, ratings.ts, strict=True)) if k == key)
    flipped = prepare("ml-1m", write_ml1m(tmp_path / "b", ratings.with_rating(raw_row, 1), n_users=16, n_movies=30),
                      tmp_path / "db", "temporal", seed=3, features="wide")  # fmt: skip
    train2 = ds.dataset(flipped / "train").to_table()
    assert train2.column("label")[target].as_py() == 0.0
    schema = Schema.load(base)
    moved = []
    for f in schema.features:
        assert train.column(f.name)[target] == train2.column(f.name)[target], f.name
        if not train.column(f.name).equals(train2.column(f.name)):
            moved.append(f.name)
    # the flip reaches other rows through out-of-fold, past-only and co-occurrence statistics
    assert {"user_mean_rating", "item_past_rate", "user_genre_past_rate", "hist_cooc", "hist_neg_item_id"} <= set(moved)


def test_test_labels_are_never_used_by_the_wide_set(tmp_path: Path, ratings) -> None:
    raw_a = write_ml1m(tmp_path / "a", ratings, n_users=16, n_movies=30)
    t = load_all(prepare("ml-1m", raw_a, tmp_path / "da", "temporal", seed=3, features="wide"))
    test = t["test"]
    lookup = {k: i for i, k in enumerate(zip(ratings.user, ratings.ts, strict=True))}
    r2 = ratings
    for i in range(test.num_rows):
        r2 = r2.with_rating(lookup[(test.column("request_id")[i].as_py(), test.column("ts")[i].as_py())], 5)
    raw_b = write_ml1m(tmp_path / "b", r2, n_users=16, n_movies=30)
    flipped = load_all(prepare("ml-1m", raw_b, tmp_path / "db", "temporal", seed=3, features="wide"))
    assert float(np.asarray(flipped["test"].column("label")).mean()) == 1.0
    for split in ("train", "valid", "test"):
        feats = [c for c in t[split].column_names if c not in ("label", "label_level")]
        assert t[split].select(feats).equals(flipped[split].select(feats)), split


# ------------------------------------------------------------------ the paper protocol: out-of-fold sequences

SEQUENCES = ("hist_item_id", "hist_neg_item_id", "hist_genres")


def _paper_wide(tmp_path: Path, ratings, name: str = "w") -> Path:
    raw = write_ml1m(tmp_path / f"raw_{name}", ratings, n_users=16, n_movies=30)
    return prepare("ml-1m", raw, tmp_path / name, "paper", seed=3, features="wide")


@pytest.fixture(scope="module")
def paper_wide(tmp_path_factory: pytest.TempPathFactory, ratings) -> Path:
    return _paper_wide(tmp_path_factory.mktemp("paper_wide"), ratings)


def test_paper_wide_set_is_the_default_set_plus_untimed_fields(tmp_path: Path, ratings, paper_wide: Path) -> None:
    """Row for row the default ``paper`` set (so a teacher of it can score the default set), every default column
    unchanged, no field that needs a timestamp, and ``hist_item_id`` for DIN."""
    schema = check_loadable(paper_wide)
    default = prepare("ml-1m", write_ml1m(tmp_path / "raw", ratings, n_users=16, n_movies=30), tmp_path / "d",
                      "paper", seed=3)  # fmt: skip
    assert check_aligned(paper_wide, default) == {
        s: read_split(default, s).num_rows for s in ("train", "valid", "test")
    }
    base = Schema.load(default)
    assert set(base.names) < set(schema.names) and not set(schema.names) & TIMED
    assert len(schema.features) == 42 and {f.cost_type for f in schema.features} == {"I", "II", "III", "IV"}
    assert schema["hist_item_id"].shares == "item_id" and schema.name == "ml-1m-paper-wide"
    wide_t, default_t = load_all(paper_wide), load_all(default)
    for split in ("train", "valid", "test"):
        columns = default_t[split].column_names
        assert wide_t[split].select(columns).equals(default_t[split]), split
    train = wide_t["train"]
    lengths = np.array([len(h) for h in train.column("hist_item_id").to_pylist()])
    assert lengths.max() <= 20 and (lengths > 0).mean() > 0.9


def _by_user(table) -> dict[int, list[int]]:
    users = np.asarray(table.column("request_id"))
    return {int(u): np.nonzero(users == u)[0].tolist() for u in np.unique(users)}


def test_paper_sequences_are_out_of_fold(paper_wide: Path) -> None:
    """A training row never lists its own movie, nor a movie of the rows it shares a fold with; valid and test
    rows list every training positive (each user has fewer than 20 here)."""
    t = load_all(paper_wide)
    train = t["train"]
    item, label = np.asarray(train.column("item_id")), np.asarray(train.column("label"))
    hist = train.column("hist_item_id").to_pylist()
    neg = train.column("hist_neg_item_id").to_pylist()
    left_out_some = 0
    for u, rows in _by_user(train).items():
        positives = {int(item[r]) for r in rows if label[r] == 1}
        negatives = {int(item[r]) for r in rows if label[r] == 0}
        for r in rows:
            assert int(item[r]) not in hist[r] and int(item[r]) not in neg[r]
            assert set(hist[r]) <= positives and set(neg[r]) <= negatives
            left_out_some += len(set(hist[r])) < len(positives) - (label[r] == 1)
        for split in ("valid", "test"):
            for r in _by_user(t[split]).get(u, []):
                assert sorted(t[split].column("hist_item_id")[r].as_py()) == sorted(positives), (split, u)
    assert left_out_some > 0  # the row's fold holds other positives of the user: they are left out too


def test_paper_no_field_reads_its_own_rows_label_nor_its_folds(tmp_path: Path, ratings, paper_wide: Path) -> None:
    """Flip one positive training row to rating 1: none of its fields moves, and no sequence of a training row in
    its fold (the user's rows whose list lacked the movie) moves; the movie moves from the positives to the
    negatives of the user's other rows."""
    train = read_split(paper_wide, "train")
    level, users = np.asarray(train.column("label_level")), np.asarray(train.column("request_id"))
    target = int(np.nonzero(level >= 4)[0][0])
    key = (users[target], train.column("ts")[target].as_py())
    raw_row = next(i for i, k in enumerate(zip(ratings.user, ratings.ts, strict=True)) if k == key)
    flipped = _paper_wide(tmp_path, ratings.with_rating(raw_row, 1), "f")
    train2 = read_split(flipped, "train")
    assert train2.column("label")[target].as_py() == 0.0
    moved = [f.name for f in Schema.load(paper_wide).features if not train.column(f.name).equals(train2.column(f.name))]
    for name in Schema.load(paper_wide).names:
        assert train.column(name)[target] == train2.column(name)[target], name
    movie = train.column("item_id")[target].as_py()
    same_fold = other_folds = 0
    for r in np.nonzero(users == key[0])[0]:
        before = {n: train.column(n)[int(r)].as_py() for n in SEQUENCES}
        after = {n: train2.column(n)[int(r)].as_py() for n in SEQUENCES}
        if movie in before["hist_item_id"]:
            other_folds += 1
            assert movie not in after["hist_item_id"] and movie in after["hist_neg_item_id"]
        elif r != target:
            same_fold += 1
            assert before == after
    assert same_fold and other_folds  # both kinds of row exist, so both checks ran
    assert {"user_mean_rating", "item_mean_rating", "hist_cooc", "hist_item_id", "hist_neg_item_id"} <= set(moved)


def test_paper_valid_and_test_labels_are_never_used(tmp_path: Path, ratings, paper_wide: Path) -> None:
    t = load_all(paper_wide)
    lookup = {k: i for i, k in enumerate(zip(ratings.user, ratings.ts, strict=True))}
    r2 = ratings
    for split in ("valid", "test"):
        for u, ts, level in zip(
            *(t[split].column(c).to_pylist() for c in ("request_id", "ts", "label_level")), strict=True
        ):
            r2 = r2.with_rating(lookup[(u, ts)], 1 if level >= 4 else 5)
    flipped = load_all(_paper_wide(tmp_path, r2, "f"))
    for split in ("valid", "test"):
        assert (np.asarray(flipped[split].column("label")) != np.asarray(t[split].column("label"))).all()
    for split in ("train", "valid", "test"):
        feats = [c for c in t[split].column_names if c not in ("label", "label_level")]
        assert t[split].select(feats).equals(flipped[split].select(feats)), split


@pytest.mark.parametrize("dataset", ["wide", "paper_wide"])
def test_every_registered_model_trains_on_the_wide_set(dataset: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(dataset)
    schema = Schema.load(root)
    batch = next(iter(make_loader(root, "train", batch_size=32)))
    for name in MODELS:
        torch.manual_seed(0)
        model = build_model(name, schema)
        logits = model(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label)
        loss.backward()
        assert logits.shape == (32,) and torch.isfinite(loss), name


@pytest.mark.realdata
def test_real_ml100k_wide(tmp_path: Path) -> None:
    raw = SHARED_DATA / "ml-100k"
    if not (raw / "ml-100k.inter.gz").exists():
        pytest.skip(f"real ML-100K not found at {raw} (see ../shared/data/ml-100k/PROVENANCE.md)")
    root = prepare("ml-100k", raw, tmp_path / "wide", "temporal", seed=0, features="wide")
    schema = check_loadable(root, batch_size=8192)
    assert len(schema.features) >= 40
    assert {f.cost_type for f in schema.features} == {"I", "II", "III", "IV"}
    t = load_all(root)
    for f in schema.features:
        if f.kind == "dense":
            for split in ("train", "test"):
                assert np.isfinite(np.asarray(t[split].column(f.name))).all(), (f.name, split)
