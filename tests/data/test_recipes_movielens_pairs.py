"""Cross fields of unlogged (anchor row, movie) pairs (issue 22): equal to the recipe's on logged pairs, leak-free,
and filled by ``cascade build --cross compute``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from cascade_pairs import computed_cascade
from test_recipes_movielens import _unique_ts, make_ratings, write_ml1m
from typer.testing import CliRunner

from prerank.cli import app
from prerank.cli import cascade as _cascade  # noqa: F401  (registers the commands)
from prerank.data.cascade import CascadeConfig, build_cascade
from prerank.data.parquet import DataError
from prerank.data.recipes import RecipeError, cross_features, prepare
from prerank.data.recipes.common import Entries, target_mean, target_mean_at
from prerank.data.recipes.movielens_pairs import DEFAULT_CROSS, WIDE_CROSS, MovieLensCross
from prerank.models.base import ConfigError
from prerank.models.registry import build_model
from prerank.schema import Schema
from prerank.train.checkpoint import save_checkpoint

SIZE = {"n_users": 16, "n_movies": 30}
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def ratings():
    return _unique_ts(make_ratings(n_users=16, n_movies=30, per_user=25))


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory, ratings) -> Path:
    return write_ml1m(tmp_path_factory.mktemp("raw"), ratings, **SIZE)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory, raw: Path) -> Path:
    return prepare("ml-1m", raw, tmp_path_factory.mktemp("wide") / "out", "temporal", seed=3, features="wide")


def _dataset_rows(cross: MovieLensCross, s: int) -> np.ndarray:
    """Recipe row of each row of split ``s`` in the dataset's order (requests contiguous, by time)."""
    p = cross.stats.parts[s]
    return p[np.lexsort((p, cross.rows.ts[p], cross.rows.user[p]))]


def test_target_mean_at_equals_target_mean_on_its_own_rows() -> None:
    rng = np.random.default_rng(0)
    train = Entries.single(rng.integers(0, 7, 200))
    label, fold = rng.integers(0, 2, 200).astype(float), rng.integers(0, 5, 200)
    evals = Entries.single(rng.integers(0, 9, 30))
    tr, (ev,) = target_mean(train, label, fold, [evals], n_folds=5, smoothing=3.0)
    np.testing.assert_array_equal(target_mean_at(train, label, fold, train, fold, n_folds=5, smoothing=3.0), tr)
    at_eval = target_mean_at(train, label, fold, evals, np.full(30, -1), n_folds=5, smoothing=3.0)
    np.testing.assert_array_equal(at_eval, ev)


def test_logged_pairs_equal_the_recipes_cross_fields(wide: Path, raw: Path) -> None:
    cross = cross_features(wide, raw)
    schema = Schema.load(wide)
    assert set(cross.names) == {f.name for f in schema.features if f.tower == "cross"} == {*DEFAULT_CROSS, *WIDE_CROSS}
    for s, split in enumerate(SPLITS):
        table = ds.dataset(wide / split).to_table()
        r = _dataset_rows(cross, s)
        np.testing.assert_array_equal(cross.anchor_rows(split, table)[np.asarray(table["item_id"]) > 0],
                                      r[np.asarray(table["item_id"]) > 0])  # fmt: skip
        own, paired = cross.logged(r), cross.pairs(r, np.asarray(table["item_id"]))
        known = np.asarray(table["item_id"]) > 0
        for name in cross.names:
            logged = np.asarray(table[name])
            np.testing.assert_allclose(own[name], logged, rtol=1e-6, atol=1e-7, err_msg=f"{split} {name}")
            # the catalogue's attributes of a known movie are the logged row's
            np.testing.assert_array_equal(paired[name][known], own[name][known], err_msg=f"{split} {name}")
        assert all(np.ptp(np.asarray(table[name])) > 0 for name in cross.names)  # so the checks above can fail


def test_unlogged_pairs_read_no_label_of_their_anchor(tmp_path: Path, ratings, wide: Path, raw: Path) -> None:
    """Flip one training row's rating: the pairs of that row with every movie stay, other rows' pairs move."""
    base = cross_features(wide, raw)
    train = ds.dataset(wide / "train").to_table()
    level, users = np.asarray(train["label_level"]), np.asarray(train["request_id"])
    before = np.array([(users[:i] == u).sum() for i, u in enumerate(users)])
    target = int(np.nonzero((level >= 4) & (before >= 5))[0][0])
    key = (train["request_id"][target].as_py(), train["ts"][target].as_py())
    raw_row = next(i for i, k in enumerate(zip(ratings.user, ratings.ts, strict=True)) if k == key)
    raw_b = write_ml1m(tmp_path / "b", ratings.with_rating(raw_row, 1), **SIZE)
    flipped = MovieLensCross.from_raw(raw_b, wide)  # the same rows, split and folds; one label differs
    r = _dataset_rows(base, 0)[target]
    movies = np.arange(base.enc.item_vocab.size)
    anchor = np.full(len(movies), r)
    a, b = base.pairs(anchor, movies), flipped.pairs(anchor, movies)
    for name in base.names:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    later = _dataset_rows(base, 1)  # validation anchors read the flipped row (out-of-fold, past-only, cooc)
    many = np.repeat(later, len(movies)), np.tile(movies, len(later))
    a, b = base.pairs(*many), flipped.pairs(*many)
    moved = {name for name in base.names if not np.array_equal(a[name], b[name])}
    assert {"user_genre_affinity", "item_past_rate", "user_genre_past_rate", "hist_cooc"} <= moved


def test_unlogged_pairs_never_read_test_labels(tmp_path: Path, ratings, wide: Path, raw: Path) -> None:
    base = cross_features(wide, raw)
    test_rows = _dataset_rows(base, 2)
    keys = {(int(base.rows.user[i]), int(base.rows.ts[i])) for i in test_rows}
    r2 = ratings
    for i, k in enumerate(zip(ratings.user, ratings.ts, strict=True)):
        if (int(k[0]), int(k[1])) in keys:
            r2 = r2.with_rating(i, 5 if ratings.rating[i] < 3 else 1)
    flipped = MovieLensCross.from_raw(write_ml1m(tmp_path / "b", r2, **SIZE), wide)
    movies = np.arange(base.enc.item_vocab.size)
    everyone = np.arange(len(base.rows.user))
    many = np.repeat(everyone, len(movies)), np.tile(movies, len(everyone))
    a, b = base.pairs(*many), flipped.pairs(*many)
    for name in base.names:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_other_raw_files_are_refused(tmp_path: Path, wide: Path) -> None:
    other = write_ml1m(tmp_path / "other", _unique_ts(make_ratings(n_users=10, n_movies=20, per_user=20)), 10, 20)
    with pytest.raises(RecipeError, match="do not reproduce"):
        cross_features(wide, other)


def test_cascade_compute_fills_cross_fields_of_unlogged_rows(tmp_path: Path, wide: Path, raw: Path) -> None:
    cross, unexposed = computed_cascade(wide, raw, tmp_path / "cascade")
    for split, rest in unexposed.items():
        # each unexposed row's cross fields are those of its anchor (an impression of its request with the same
        # user side and time) paired with its movie
        logged = ds.dataset(wide / split).to_table()
        at = cross.anchor_rows(split, logged)
        key = {(u, ts, tuple(h)): a for u, ts, h, a in zip(
            logged["request_id"].to_pylist(), logged["ts"].to_pylist(), logged["hist_item_id"].to_pylist(), at,
            strict=True)}  # fmt: skip
        anchors = np.array(
            [
                key[(u, ts, tuple(h))]
                for u, ts, h in zip(
                    rest["request_id"].to_pylist(),
                    rest["ts"].to_pylist(),
                    rest["hist_item_id"].to_pylist(),
                    strict=True,
                )
            ]
        )
        want = cross.pairs(anchors, np.asarray(rest["item_id"]))
        for name in cross.names:
            np.testing.assert_allclose(np.asarray(rest[name]), want[name], rtol=1e-6, err_msg=f"{split} {name}")
        assert np.ptp(np.asarray(rest["user_genre_affinity"])) > 0  # not padding


def test_cascade_compute_errors(tmp_path: Path, wide: Path, raw: Path, ratings) -> None:
    schema = Schema.load(wide)
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, "cold", build_model("cold", schema))
    small = {"retrieve": 8, "rank_candidates": 3, "prerank_candidates": 4, "random": 5, "cross": "compute"}
    with pytest.raises(ConfigError, match="provider"):
        build_cascade(wide, teacher, tmp_path / "a", CascadeConfig(**small))
    with pytest.raises(ConfigError, match="resplit"):
        CascadeConfig(**small, resplit=(0.7, 0.1, 0.2))
    # a provider built from a recipe run whose labels differ cannot reproduce the impressions' cross fields
    flipped = write_ml1m(tmp_path / "flip", ratings.with_rating(0, 5 if ratings.rating[0] < 3 else 1), **SIZE)
    with pytest.raises(DataError, match="does not reproduce"):
        build_cascade(
            wide, teacher, tmp_path / "b", CascadeConfig(**small), cross_features=cross_features(wide, flipped)
        )
    runner = CliRunner()
    args = ["cascade", "build", "--data", str(wide), "--teacher", str(teacher), "--retrieve", "8",
            "--rank-candidates", "3", "--prerank-candidates", "4", "--random", "5"]  # fmt: skip
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "c"), "--cross", "compute"])
    assert res.exit_code != 0 and "--raw" in res.output
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "d"), "--cross", "compute", "--raw", str(raw),
                              "--unknown-items", "skip"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "user_genre_affinity" in Schema.load(tmp_path / "d").names
