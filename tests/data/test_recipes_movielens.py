"""MovieLens recipes: every raw layout, both protocols, and the absence of label leakage."""

from __future__ import annotations

import gzip
import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from conftest import SHARED_DATA
from prerank.data.parquet import ParquetSplit, make_loader
from prerank.data.recipes import RecipeError, prepare
from prerank.data.recipes.movielens import ML100K_GENRES
from prerank.models.registry import build_model
from prerank.schema import Schema

GENRES = ("Action", "Comedy", "Drama", "Children's", "Sci-Fi")


@dataclass
class Ratings:
    """Raw ratings in file order; ``ts`` 0 = unknown (written empty in the staged CSV)."""

    user: list[int]
    item: list[int]
    rating: list[int]
    ts: list[int]

    def with_rating(self, row: int, value: int) -> Ratings:
        rating = list(self.rating)
        rating[row] = value
        return replace(self, rating=rating)


def make_ratings(n_users: int = 14, n_movies: int = 16, per_user: int = 12, seed: int = 0) -> Ratings:
    rng = np.random.default_rng(seed)
    out = Ratings([], [], [], [])
    for u in range(1, n_users + 1):
        movies = rng.choice(np.arange(1, n_movies + 1), size=per_user, replace=False)
        t = 900_000_000 + int(rng.integers(0, 10_000))
        for m in movies:
            t += int(rng.integers(0, 3)) * 60  # some equal timestamps: ties must keep file order
            out.user.append(u)
            out.item.append(int(m))
            out.rating.append(int(rng.integers(1, 6)))
            out.ts.append(t)
    return out


def _title(m: int) -> str:
    return f"Caf\u00e9 Movie {m} ({1950 + 3 * m})"


def _genres(m: int) -> list[str]:
    return [GENRES[m % len(GENRES)]] + ([GENRES[(m + 2) % len(GENRES)]] if m % 3 == 0 else [])


def write_ml1m(folder: Path, r: Ratings, n_users: int = 14, n_movies: int = 16, layout: str = "grouplens") -> Path:
    """ML-1M raw files: ``grouplens`` (ratings.dat), ``staged`` (csv.gz, empty ts where 0) or ``zip``."""
    folder.mkdir(parents=True, exist_ok=True)
    users = "".join(
        f"{u}::{'MF'[u % 2]}::{[1, 18, 25, 35][u % 4]}::{u % 5}::{48000 + u}\n" for u in range(1, n_users + 1)
    )
    movies = "".join(f"{m}::{_title(m)}::{'|'.join(_genres(m))}\n" for m in range(1, n_movies + 1))
    ratings = "".join(f"{u}::{m}::{x}::{t}\n" for u, m, x, t in zip(r.user, r.item, r.rating, r.ts, strict=True))
    files = {"users.dat": users.encode(), "movies.dat": movies.encode("latin-1"), "ratings.dat": ratings.encode()}
    if layout == "staged":
        rows = (f"{u},{m},{x},{t if t else ''}\n" for u, m, x, t in zip(r.user, r.item, r.rating, r.ts, strict=True))
        del files["ratings.dat"]
        csv = "UserID,MovieID,Rating,Timestamp\n" + "".join(rows)
        files["ratings_all_uir_with_partial_ts.csv.gz"] = gzip.compress(csv.encode())
    if layout == "zip":
        path = folder / "ml-1m.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(f"ml-1m/{name}", data)
        return path
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def write_ml100k(folder: Path, r: Ratings, n_users: int = 14, n_movies: int = 16, layout: str = "grouplens") -> Path:
    """ML-100K raw files: ``grouplens`` (u.data, u.user, u.item), ``recbole`` (atomic files) or ``zip``."""
    folder.mkdir(parents=True, exist_ok=True)
    occupations = ("writer", "student", "other")
    ages = {u: 15 + 4 * u for u in range(1, n_users + 1)}
    rows = list(zip(r.user, r.item, r.rating, r.ts, strict=True))
    if layout == "recbole":
        files = {
            "ml-100k.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            + "".join(f"{u}\t{m}\t{x}\t{t}\n" for u, m, x, t in rows),
            "ml-100k.user": "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
            + "".join(
                f"{u}\t{ages[u]}\t{'MF'[u % 2]}\t{occupations[u % 3]}\t{10000 + u}\n" for u in range(1, n_users + 1)
            ),
            "ml-100k.item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
            + "".join(
                f"{m}\t{_title(m)[:-7]}\t{1950 + 3 * m}\t{' '.join(_genres(m))}\n" for m in range(1, n_movies + 1)
            ),
        }
        data = {k: v.encode("latin-1") for k, v in files.items()}
        data["ml-100k.inter.gz"] = gzip.compress(data.pop("ml-100k.inter"))
    else:
        flags = lambda m: "|".join("1" if g in _genres(m) else "0" for g in ML100K_GENRES)  # noqa: E731
        data = {
            "u.data": "".join(f"{u}\t{m}\t{x}\t{t}\n" for u, m, x, t in rows).encode(),
            "u.user": "".join(
                f"{u}|{ages[u]}|{'MF'[u % 2]}|{occupations[u % 3]}|{10000 + u}\n" for u in range(1, n_users + 1)
            ).encode(),
            "u.item": "".join(
                f"{m}|{_title(m)}|01-Jan-{1950 + 3 * m}||http://x/{m}|{flags(m)}\n" for m in range(1, n_movies + 1)
            ).encode("latin-1"),
        }
    if layout == "zip":
        path = folder / "ml-100k.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, blob in data.items():
                zf.writestr(f"ml-100k/{name}", blob)
        return path
    for name, blob in data.items():
        (folder / name).write_bytes(blob)
    return folder


def read_split(root: Path, split: str) -> pa.Table:
    return ds.dataset(root / split).to_table()


def load_all(root: Path) -> dict[str, pa.Table]:
    return {s: read_split(root, s) for s in ("train", "valid", "test")}


def check_loadable(root: Path, batch_size: int = 7) -> Schema:
    """Every split and the catalogue pass ParquetSplit validation and stream through make_loader."""
    schema = Schema.load(root)
    for split in ("train", "valid", "test"):
        n = sum(len(b) for b in make_loader(root, split, batch_size=batch_size))
        assert n == ParquetSplit(root, split).num_rows > 0
    assert ParquetSplit(root, "items").num_rows > 0
    return schema


# ------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["staged", "zip"])
def test_ml1m_layouts_give_the_same_dataset(tmp_path: Path, layout: str) -> None:
    r = make_ratings()
    base = prepare("ml-1m", write_ml1m(tmp_path / "dat", r), tmp_path / "a", "paper", seed=3)
    other = prepare("ml-1m", write_ml1m(tmp_path / layout, r, layout=layout), tmp_path / "b", "paper", seed=3)
    for split in ("train", "valid", "test"):
        assert read_split(base, split).equals(read_split(other, split))
    assert json.loads((other / "meta.json").read_text())["layout"] == ("staged" if layout == "staged" else "grouplens")


@pytest.mark.parametrize("layout", ["recbole", "zip"])
def test_ml100k_layouts_give_the_same_dataset(tmp_path: Path, layout: str) -> None:
    r = make_ratings()
    base = prepare("ml-100k", write_ml100k(tmp_path / "u", r), tmp_path / "a", "temporal", seed=1)
    raw = write_ml100k(tmp_path / layout, r, layout=layout)
    other = prepare("ml-100k", raw, tmp_path / "b", "temporal", seed=1)
    for split in ("train", "valid", "test"):
        assert read_split(base, split).equals(read_split(other, split))


def test_zip_found_inside_folder_and_latin1_titles(tmp_path: Path) -> None:
    write_ml1m(tmp_path / "raw", make_ratings(), layout="zip")
    root = prepare("ml-1m", tmp_path / "raw", tmp_path / "out")
    items = ParquetSplit(root, "items").read_table(ParquetSplit(root, "items").row_groups[0])
    # titles "Cafe Movie m (1950 + 3m)": years parsed from the ISO-8859-1 title, bucketed
    assert set(items.column("year_bucket").to_pylist()) - {0}


def test_missing_file_is_named(tmp_path: Path) -> None:
    raw = write_ml1m(tmp_path / "raw", make_ratings())
    (raw / "movies.dat").unlink()
    with pytest.raises(RecipeError, match=r"movies\.dat"):
        prepare("ml-1m", raw, tmp_path / "out")
    with pytest.raises(RecipeError, match=r"u\.data.*ml-100k\.zip"):
        prepare("ml-100k", raw, tmp_path / "out")
    with pytest.raises(RecipeError, match="does not exist"):
        prepare("ml-1m", tmp_path / "nowhere", tmp_path / "out")


def test_unknown_recipe_protocol_and_bad_out(tmp_path: Path) -> None:
    raw = write_ml1m(tmp_path / "raw", make_ratings())
    with pytest.raises(RecipeError, match="unknown recipe 'ml-20m'"):
        prepare("ml-20m", raw, tmp_path / "out")
    with pytest.raises(RecipeError, match="no protocol 'leave-one-out'"):
        prepare("ml-1m", raw, tmp_path / "out", "leave-one-out")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(RecipeError, match="refusing to overwrite"):
        prepare("ml-1m", raw, precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_malformed_ratings_are_reported(tmp_path: Path) -> None:
    raw = write_ml1m(tmp_path / "raw", make_ratings())
    (raw / "ratings.dat").write_text("1::2::7::900000000\n")
    with pytest.raises(RecipeError, match="outside 1..5"):
        prepare("ml-1m", raw, tmp_path / "out")
    (raw / "ratings.dat").write_text("1::two::4::900000000\n")
    with pytest.raises(RecipeError, match="ratings.dat"):
        prepare("ml-1m", raw, tmp_path / "out")


# ------------------------------------------------------------------------------------------- paper


def test_paper_protocol_splits_labels_and_loads(tmp_path: Path) -> None:
    r = make_ratings()
    root = prepare("ml-1m", write_ml1m(tmp_path / "raw", r), tmp_path / "out", "paper", seed=0)
    schema = check_loadable(root)
    t = load_all(root)
    n_kept = sum(x != 3 for x in r.rating)
    n = {k: v.num_rows for k, v in t.items()}
    assert sum(n.values()) == n_kept
    assert n["test"] == round(0.2 * n_kept)
    assert n["valid"] == round(0.1 * (n_kept - n["test"]))
    for table in t.values():
        level = np.asarray(table.column("label_level"))
        assert 3 not in level
        np.testing.assert_array_equal(np.asarray(table.column("label")), (level > 3).astype(np.float32))
    assert schema.has_label_level
    assert len(schema.tower("cross")) >= 4
    assert all(f.description for f in schema.features)
    costs = {f.name: f.cost_type for f in schema.features}
    assert (costs["gender"], costs["item_id"], costs["user_mean_label"], costs["user_genre_affinity"]) == (
        "I",
        "II",
        "III",
        "IV",
    )
    meta = json.loads((root / "meta.json").read_text())
    assert meta["protocol"] == "paper" and meta["seed"] == 0 and meta["rows"] == n
    assert set(meta["label_rate"]) == {"train", "valid", "test"}
    again = prepare("ml-1m", tmp_path / "raw", tmp_path / "again", "paper", seed=0)
    other = prepare("ml-1m", tmp_path / "raw", tmp_path / "other", "paper", seed=1)
    assert read_split(again, "test").equals(t["test"])
    assert not read_split(other, "test").equals(t["test"])


def test_prepared_dataset_feeds_a_model(tmp_path: Path) -> None:
    root = prepare("ml-1m", write_ml1m(tmp_path / "raw", make_ratings()), tmp_path / "out", "temporal")
    schema = Schema.load(root)
    batch = next(iter(make_loader(root, "train", batch_size=16)))
    model = build_model("two_tower", schema)
    logits = model(batch)
    assert logits.shape == (16,) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------- leakage


def _row_lookup(table: pa.Table) -> dict[tuple[int, int], int]:
    """(request_id, ts) -> row, for tables whose rows are unique on it."""
    keys = list(zip(table.column("request_id").to_pylist(), table.column("ts").to_pylist(), strict=True))
    assert len(set(keys)) == len(keys)
    return {k: i for i, k in enumerate(keys)}


def _unique_ts(r: Ratings) -> Ratings:
    return replace(r, ts=[t + i for i, t in enumerate(r.ts)])


OOF_FEATURES = ("user_mean_label", "item_mean_label", "user_genre_affinity", "item_group_rate")


def test_out_of_fold_statistic_ignores_the_rows_own_label(tmp_path: Path) -> None:
    r = _unique_ts(make_ratings())
    base = prepare("ml-1m", write_ml1m(tmp_path / "a", r), tmp_path / "da", "paper", seed=5)
    train = read_split(base, "train")
    target = int(np.nonzero(np.asarray(train.column("label_level")) >= 4)[0][0])
    key = (train.column("request_id")[target].as_py(), train.column("ts")[target].as_py())
    raw_row = next(i for i, (u, t) in enumerate(zip(r.user, r.ts, strict=True)) if (u, t) == key)
    flipped = prepare("ml-1m", write_ml1m(tmp_path / "b", r.with_rating(raw_row, 1)), tmp_path / "db", "paper", seed=5)
    train2 = read_split(flipped, "train")
    assert train2.column("label")[target].as_py() == 0.0
    changed_elsewhere = False
    for name in OOF_FEATURES:
        a, b = np.asarray(train.column(name)), np.asarray(train2.column(name))
        assert a[target] == b[target], name
        changed_elsewhere |= bool((a != b).any())
    assert changed_elsewhere  # the flip is visible to rows of other folds, so the check above can fail


@pytest.mark.parametrize("protocol", ["paper", "temporal"])
def test_test_labels_are_never_used(tmp_path: Path, protocol: str) -> None:
    r = _unique_ts(make_ratings(n_movies=30, per_user=25))  # >= 2 test rows per user (temporal)
    base = prepare("ml-1m", write_ml1m(tmp_path / "a", r, n_movies=30), tmp_path / "da", protocol, seed=2)
    t = load_all(base)
    test = t["test"]
    lookup = {(u, ts): i for i, (u, ts) in enumerate(zip(r.user, r.ts, strict=True))}
    flips = [
        lookup[(test.column("request_id")[i].as_py(), test.column("ts")[i].as_py())]
        for i in range(test.num_rows)
        if test.column("label_level")[i].as_py() >= 4
    ]
    r2 = r
    for row in flips:
        r2 = r2.with_rating(row, 1)
    flipped = load_all(prepare("ml-1m", write_ml1m(tmp_path / "b", r2, n_movies=30), tmp_path / "db", protocol, seed=2))
    assert float(np.asarray(flipped["test"].column("label")).sum()) == 0.0
    for split in ("train", "valid", "test"):
        feats = [c for c in t[split].column_names if c not in ("label", "label_level")]
        assert t[split].select(feats).equals(flipped[split].select(feats)), split


def test_eval_rows_use_whole_training_split(tmp_path: Path) -> None:
    root = prepare("ml-1m", write_ml1m(tmp_path / "raw", make_ratings()), tmp_path / "out", "paper", seed=4)
    t = load_all(root)
    m = json.loads((root / "meta.json").read_text())["config"]["smoothing"]
    tr_user = np.asarray(t["train"].column("request_id"))
    tr_label = np.asarray(t["train"].column("label"), dtype=np.float64)
    prior = tr_label.mean()
    for split in ("valid", "test"):
        users = np.asarray(t[split].column("request_id"))
        expected = [(tr_label[tr_user == u].sum() + m * prior) / ((tr_user == u).sum() + m) for u in users]
        np.testing.assert_allclose(np.asarray(t[split].column("user_mean_label")), expected, rtol=1e-5)


def test_vocabularies_come_from_training_rows_only(tmp_path: Path) -> None:
    r = make_ratings()
    # movie 99 is rated only by user 1, as their last rating: it lands in test (temporal protocol)
    r = Ratings(r.user + [1], r.item + [99], r.rating + [5], r.ts + [999_999_999])
    root = prepare("ml-1m", write_ml1m(tmp_path / "raw", r, n_movies=99), tmp_path / "out", "temporal")
    t = load_all(root)
    items = ds.dataset(root / "items.parquet").to_table()
    train_codes = set(t["train"].column("item_id").to_pylist())
    assert set(items.column("item_id").to_pylist()) == train_codes
    assert 99 not in items.column("raw_item_id").to_pylist()
    (row,) = t["test"].filter(pa.compute.equal(t["test"].column("ts"), 999_999_999)).to_pylist()
    assert row["item_id"] == 0  # unseen movie -> unknown id ...
    assert row["item_count"] == 0.0  # ... no training rows ...
    prior = float(np.mean(t["train"].column("label")))
    assert row["item_mean_label"] == pytest.approx(prior, rel=1e-5)  # ... so the training prior
    assert row["genres"]  # side information of the movies file is still there
    schema = Schema.load(root)
    assert schema["item_id"].vocab_size == len(train_codes) + 1
    assert schema["user_id"].vocab_size == len(set(t["train"].column("request_id").to_pylist())) + 1


# ------------------------------------------------------------------------------------------- temporal


def test_temporal_split_order_and_complete_users(tmp_path: Path) -> None:
    r = make_ratings()
    incomplete = {3, 7}
    ts = [0 if (u in incomplete and i % 4 == 0) else t for i, (u, t) in enumerate(zip(r.user, r.ts, strict=True))]
    r = replace(r, ts=ts)
    root = prepare("ml-1m", write_ml1m(tmp_path / "raw", r, layout="staged"), tmp_path / "out", "temporal")
    check_loadable(root)
    t = load_all(root)
    users = set()
    for table in t.values():
        users |= set(table.column("request_id").to_pylist())
    assert users == set(r.user) - incomplete
    meta = json.loads((root / "meta.json").read_text())
    assert meta["counts"]["dropped_users_without_full_timestamps"] == len(incomplete)
    for u in users:
        ts = {s: np.asarray(t[s].filter(pa.compute.equal(t[s].column("request_id"), u)).column("ts")) for s in t}
        n = sum(len(v) for v in ts.values())
        assert len(ts["test"]) == len(ts["valid"]) == int(np.floor(0.1 * n + 0.5))
        if len(ts["test"]):
            assert ts["train"].max() <= ts["valid"].min() <= ts["valid"].max() <= ts["test"].min()


def test_temporal_history_is_strictly_earlier_positives(tmp_path: Path) -> None:
    r = make_ratings(n_movies=30, per_user=25)  # >= 2 valid and test rows per user
    root = prepare("ml-1m", write_ml1m(tmp_path / "raw", r, n_movies=30), tmp_path / "out", "temporal")
    t = load_all(root)
    schema = Schema.load(root)
    assert schema["hist_item_id"].shares == "item_id" and schema["hist_item_id"].max_len == 20
    # events per split, by raw rows: (user, ts, item code, order in file)
    items = ds.dataset(root / "items.parquet").to_table()
    code_of = dict(zip(items.column("raw_item_id").to_pylist(), items.column("item_id").to_pylist(), strict=True))
    split_of = {}
    for s, table in t.items():
        for row in table.select(["request_id", "ts", "item_id"]).to_pylist():
            split_of.setdefault((row["request_id"], row["ts"], row["item_id"]), s)
    events = []
    for i, (u, m, x, ts) in enumerate(zip(r.user, r.item, r.rating, r.ts, strict=True)):
        code = code_of.get(m, 0)
        if x > 3 and code:
            events.append((u, ts, i, code, split_of[(u, ts, code)]))
    allowed = {"train": {"train"}, "valid": {"train"}, "test": {"train", "valid"}}
    checked = 0
    for s, table in t.items():
        for row in table.select(["request_id", "ts", "hist_item_id"]).to_pylist():
            exp = [
                c
                for u, ts, _, c, es in sorted(events, key=lambda e: (e[1], e[2]))
                if u == row["request_id"] and ts < row["ts"] and es in allowed[s]
            ]
            assert row["hist_item_id"] == exp[-20:]
            checked += bool(exp)
    assert checked > 10


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_ml100k_paper(tmp_path: Path) -> None:
    raw = SHARED_DATA / "ml-100k"
    if not (raw / "ml-100k.inter.gz").exists():
        pytest.skip(f"real ML-100K not found at {raw} (see ../shared/data/ml-100k/PROVENANCE.md)")
    root = prepare("ml-100k", raw, tmp_path / "ml100k", "paper", seed=0)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["counts"]["raw_ratings"] == 100_000
    assert meta["counts"]["dropped_rating_3"] == 27_145
    assert sum(meta["rows"].values()) == 72_855  # 100,000 ratings minus the 27,145 threes
    assert meta["rows"]["test"] == 14_571
    assert meta["counts"]["users"] == 943
    check_loadable(root, batch_size=8192)
