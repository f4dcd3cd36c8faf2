"""MovieLens-1M and MovieLens-100K recipes (protocols ``paper`` and ``temporal``).

Accepted raw layouts (detected from the file names, in a folder, its ``ml-1m``/``ml-100k``
sub-folder, or a zip):

* ML-1M GroupLens: ``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``-separated, ISO-8859-1),
  or ``ml-1m.zip`` holding them.
* ML-1M staged (``../shared/data/ml-1m``): ``ratings_all_uir_with_partial_ts.csv.gz`` (header
  ``UserID,MovieID,Rating,Timestamp``, the timestamp empty where unknown) + ``users.dat`` + ``movies.dat``.
* ML-100K GroupLens: ``u.data`` (tab), ``u.user`` and ``u.item`` (``|``, 19 genre flags,
  ISO-8859-1), or ``ml-100k.zip``.
* ML-100K RecBole atomic files: ``ml-100k.inter[.gz]``, ``ml-100k.user``, ``ml-100k.item``.

Protocols (rating 3 is dropped in both; label = rating > 3; ``label_level`` = the rating):

* ``paper`` (IntTower / FIT evaluation on ML-1M): random 80/20 train/test split of the rows by
  ``seed``; 10% of the training rows, drawn at random, become ``valid`` (not a cold-item slice).
  ``request_id`` = user id, so GAUC groups by user.
* ``temporal``: only users *all* of whose ratings carry a timestamp (read from the data: on the
  staged ML-1M file, users 1..2999 plus the few later users that are complete). Each user's rows
  sorted by time (ties keep file order): the last 10% -> test, the 10% before -> valid, the rest
  train (``round(0.1 n)`` rows each). Adds ``hist_item_id``. ``request_id`` = user id: MovieLens
  has no sessions, and a user x day id would leave most test requests with a single row.

``--features wide`` (:mod:`.movielens_wide`) adds 34 fields under ``temporal``; under ``paper`` 25 plus an
out-of-fold ``hist_item_id`` (a training row reads the user's training positives in the other folds), the
default set's rows unchanged and in the same order.

Features. Cost types follow FSCD Table 1 as read in :data:`prerank.schema.COST_O` (see
:func:`.common.fscd_cost`): I simple user ids, II simple item ids, III complex user features
(statistics, sequences; once per request), IV complex item-correlated features (item statistics
and user x item crosses; per candidate). Every statistic is fitted on the training split only,
out-of-fold for training rows (see :mod:`.common`):

======================  =====  =====  =================================================================
name                    tower  type   meaning
======================  =====  =====  =================================================================
user_id                 user   I      user id (train vocabulary)
gender, age,            user   I      demographics; ML-100K ages are cut into ML-1M's age groups
occupation, zip_prefix                (1, 18, 25, 35, 45, 50, 56); zip_prefix = first two characters
user_mean_label         user   III    smoothed positive rate of the user's training rows
user_count              user   III    log-scaled number of the user's training rows
hist_item_id            user   III    (temporal) last 20 positively rated items strictly before the row;
                                      (paper, wide set only) 20 training positives of the user, out-of-fold
item_id                 item   II     movie id (train vocabulary)
genres                  item   II     the movie's genres (multi-valued, mean pooling)
year_bucket             item   II     release year in fixed buckets (no fitting)
item_mean_label         item   IV     smoothed positive rate of the movie's training rows
item_count              item   IV     log-scaled number of the movie's training rows
user_genre_affinity     cross  IV     smoothed positive rate of the user's training rows in the movie's genres
user_genre_count        cross  IV     log-scaled mean number of the user's training rows per genre of the movie
item_group_rate         cross  IV     smoothed positive rate of the movie among training rows of the user's
                                      age x gender group
year_gap                cross  IV     (movie year - mean year of the user's training movies) / 10, clipped to
                                      [-5, 5]; 0 when either is unknown
======================  =====  =====  =================================================================

Smoothing: ``(positives + m * prior) / (rows + m)`` with ``m = 10`` pseudo-rows of the training
mean; counts are ``log1p(count) / log1p(largest training count)``.

History events never come from the test split: train and valid rows see training positives, test
rows training and validation positives (both lie wholly before a user's test rows), always
strictly earlier than the row's timestamp. Items unseen in training have id 0 and are left out of
histories (0 is padding).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prerank.data.parquet import write_dataset
from prerank.data.recipes.common import (
    Entries,
    Progress,
    RecipeError,
    SplitStats,
    Vocab,
    balanced_folds,
    check_feature_set,
    fscd_cost,
    history,
    label_rate,
    no_progress,
    padded_to_list,
    staging_dir,
)
from prerank.data.recipes.movielens_wide import wide_features
from prerank.data.recipes.rawfiles import Source, read_delimited
from prerank.schema import FeatureSpec, Schema, Tower

PROTOCOLS: tuple[str, ...] = ("paper", "temporal")

#: ML-1M age groups (users.dat codes); ML-100K raw ages are cut into the same groups.
AGE_GROUPS = np.array([1, 18, 25, 35, 45, 50, 56])
#: Release-year bucket edges: decades before 1980, then finer where most movies are.
YEAR_EDGES = np.array([1930, 1940, 1950, 1960, 1970, 1980, 1985, 1990, 1993, 1995, 1996, 1997, 1998, 1999, 2000])
#: Genre flag order of ML-100K ``u.item`` (as listed in its ``u.genre``).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

LAYOUTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "ml-1m": (
        ("staged", ("ratings_all_uir_with_partial_ts.csv", "users.dat", "movies.dat")),
        ("grouplens", ("ratings.dat", "users.dat", "movies.dat")),
    ),
    "ml-100k": (
        ("recbole", ("ml-100k.inter", "ml-100k.user", "ml-100k.item")),
        ("grouplens", ("u.data", "u.user", "u.item")),
    ),
}


@dataclass(frozen=True)
class MovieLensConfig:
    """Knobs of the MovieLens recipes (defaults are the documented protocol)."""

    test_frac: float = 0.2
    valid_frac: float = 0.1
    temporal_frac: float = 0.1
    n_folds: int = 5
    smoothing: float = 10.0
    hist_len: int = 20


@dataclass
class RawMovieLens:
    """Parsed raw files. Ratings per row; users and movies one row per id (genres as names)."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    ts: np.ndarray
    has_ts: np.ndarray
    user_ids: np.ndarray
    gender: np.ndarray
    age: np.ndarray
    occupation: np.ndarray
    zip_code: np.ndarray
    movie_ids: np.ndarray
    year: np.ndarray
    genres: list[list[str]]
    layout: str
    files: list[str]


# --------------------------------------------------------------------------------------------- reading


def _locate(raw: Path, name: str) -> tuple[Source, str, tuple[str, ...]]:
    """The first layout whose ratings file is present: in the folder, else in ``{name}.zip`` there."""
    src = Source.open(raw, name)
    zipped = f"{name}.zip"
    if not src.is_zip and zipped in src.files and not any(src.has(f[0]) for _, f in LAYOUTS[name]):
        src = Source.open(Path(src.files[zipped]), name)
    for layout, files in LAYOUTS[name]:
        if src.has(files[0]):
            missing = [f for f in files if not src.has(f)]
            if missing:
                raise RecipeError(f"{name} raw data in {src.where} ({layout} layout) lacks {missing}")
            return src, layout, files
    expected = "; or ".join(" + ".join(f) + f" ({layout})" for layout, f in LAYOUTS[name])
    raise RecipeError(f"no {name} raw files in {raw}: expected {expected} (each may be gzipped); or {zipped}")


def _col(table: pa.Table, name: str, what: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise RecipeError(f"{what} has no column {name!r} (columns: {table.column_names})")
    return table.column(name)


def _ints(table: pa.Table, name: str, what: str) -> np.ndarray:
    col = _col(table, name, what)
    if col.null_count:
        raise RecipeError(f"{what}: column {name!r} has {col.null_count} empty values")
    try:
        return pc.cast(col, pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise RecipeError(f"{what}: column {name!r} is not integer: {e}") from e


def _strs(table: pa.Table, name: str, what: str) -> np.ndarray:
    return np.asarray(pc.cast(_col(table, name, what), pa.string()).to_pylist(), dtype=object).astype(str)


def _year_from_title(titles: pa.ChunkedArray) -> np.ndarray:
    m = pc.extract_regex(titles, r"\((?P<year>\d{4})\)\s*$")
    years = pc.struct_field(m, [0])
    return np.asarray(pc.fill_null(pc.cast(years, pa.int64()), 0).to_numpy(zero_copy_only=False), dtype=np.int64)


def _year_from_text(col: pa.ChunkedArray) -> np.ndarray:
    """Last four characters as a year (``01-Jan-1995`` or ``1995``); 0 when absent."""
    text = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
    tail = pc.utf8_slice_codeunits(text, -4)
    ok = pc.match_substring_regex(tail, r"^\d{4}$")
    years = pc.if_else(ok, tail, "0")
    return np.asarray(pc.cast(years, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


_Parsed = tuple[pa.Table, pa.Table, pa.Table, np.ndarray, list[list[str]]]
"""ratings (user, item, rating, ts), users (user, gender, age, occupation, zip), movies (item, ...), year, genres."""

LATIN = "latin-1"


def _read_ml1m(src: Source, layout: str, files: tuple[str, ...]) -> _Parsed:
    r_name, u_name, m_name = files
    names = ["user", "item", "rating", "ts"]
    if layout == "staged":
        r = read_delimited(src.read(r_name), r_name, delimiter=",", types={"Timestamp": pa.int64()})
        r = r.rename_columns({"UserID": "user", "MovieID": "item", "Rating": "rating", "Timestamp": "ts"})
    else:
        r = read_delimited(src.read(r_name), r_name, delimiter="::", names=names)
    u = read_delimited(
        src.read(u_name),
        u_name,
        delimiter="::",
        names=["user", "gender", "age", "occupation", "zip"],
        types={"occupation": pa.string(), "zip": pa.string()},
    )
    m = read_delimited(src.read(m_name), m_name, delimiter="::", names=["item", "title", "genres"], encoding=LATIN)
    genres = [g.split("|") if g else [] for g in _strs(m, "genres", m_name)]
    return r, u, m, _year_from_title(_col(m, "title", m_name)), genres


def _read_recbole(src: Source, files: tuple[str, ...]) -> _Parsed:
    r_name, u_name, m_name = files

    def atomic(name: str, rename: dict[str, str], types: dict | None = None, encoding: str = "utf8") -> pa.Table:
        t = read_delimited(src.read(name), name, delimiter="\t", types=types, encoding=encoding)
        return t.rename_columns([rename.get(c.split(":")[0], c.split(":")[0]) for c in t.column_names])

    r = atomic(r_name, {"user_id": "user", "item_id": "item", "timestamp": "ts"})
    u = atomic(u_name, {"user_id": "user", "zip_code": "zip"}, types={"zip_code:token": pa.string()})
    m = atomic(m_name, {"item_id": "item"}, encoding=LATIN)
    genres = [[g for g in s.split(" ") if g and g != "unknown"] for s in _strs(m, "class", m_name)]
    return r, u, m, _year_from_text(_col(m, "release_year", m_name)), genres


def _read_ml100k(src: Source, files: tuple[str, ...]) -> _Parsed:
    r_name, u_name, m_name = files
    r = read_delimited(src.read(r_name), r_name, delimiter="\t", names=["user", "item", "rating", "ts"])
    u = read_delimited(
        src.read(u_name),
        u_name,
        delimiter="|",
        names=["user", "age", "gender", "occupation", "zip"],
        types={"zip": pa.string()},
    )
    flag_names = [f"g{i}" for i in range(len(ML100K_GENRES))]
    m = read_delimited(
        src.read(m_name),
        m_name,
        delimiter="|",
        encoding=LATIN,
        names=["item", "title", "release", "video", "url", *flag_names],
        types={"release": pa.string(), **{g: pa.int8() for g in flag_names}},
    )
    flags = np.stack([_ints(m, g, m_name) for g in flag_names], axis=1)
    genres = [[ML100K_GENRES[j] for j in np.nonzero(row)[0] if j > 0] for row in flags]  # 0 is "unknown"
    return r, u, m, _year_from_text(_col(m, "release", m_name)), genres


def read_movielens(raw: Path, name: str) -> RawMovieLens:
    """Detect the layout of ``raw`` and parse ratings, users and movies (see the module docstring)."""
    src, layout, files = _locate(raw, name)
    if name == "ml-1m":
        r, u, m, year, genres = _read_ml1m(src, layout, files)
    elif layout == "recbole":
        r, u, m, year, genres = _read_recbole(src, files)
    else:
        r, u, m, year, genres = _read_ml100k(src, files)
    r_name, u_name, m_name = files
    ts_col = _col(r, "ts", r_name)
    has_ts = ~np.asarray(ts_col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    ts = np.asarray(pc.fill_null(pc.cast(ts_col, pa.int64()), 0).to_numpy(), dtype=np.int64)
    rating = _ints(r, "rating", r_name)
    bad = (rating < 1) | (rating > 5)
    if bad.any():
        raise RecipeError(f"{r_name}: {int(bad.sum())} ratings outside 1..5 (first: {rating[bad][0]})")
    ages = _ints(u, "age", u_name)
    return RawMovieLens(
        user=_ints(r, "user", r_name),
        item=_ints(r, "item", r_name),
        rating=rating.astype(np.int8),
        ts=ts,
        has_ts=has_ts,
        user_ids=_ints(u, "user", u_name),
        gender=_strs(u, "gender", u_name),
        age=AGE_GROUPS[np.clip(np.searchsorted(AGE_GROUPS, ages, side="right") - 1, 0, None)],
        occupation=_strs(u, "occupation", u_name),
        zip_code=np.char.upper(_strs(u, "zip", u_name)),
        movie_ids=_ints(m, "item", m_name),
        year=year,
        genres=genres,
        layout=layout,
        files=[src.describe(f) for f in files],
    )


# --------------------------------------------------------------------------------------------- splits


def split_paper(n: int, cfg: MovieLensConfig, rng: np.random.Generator) -> np.ndarray:
    """Random rows: ``test_frac`` -> test (2); of the rest, ``valid_frac`` -> valid (1); others train (0)."""
    split = np.zeros(n, dtype=np.int8)
    perm = rng.permutation(n)
    n_test = int(round(cfg.test_frac * n))
    split[perm[:n_test]] = 2
    rest = perm[n_test:]
    split[rng.permutation(rest)[: int(round(cfg.valid_frac * len(rest)))]] = 1
    return split


def split_temporal(user: np.ndarray, ts: np.ndarray, frac: float) -> np.ndarray:
    """Per user, rows by time (ties in input order): last ``round(frac n)`` -> test, the same number before -> valid."""
    order = np.lexsort((np.arange(len(user)), ts, user))
    u_sorted = user[order]
    starts = np.r_[0, np.nonzero(np.diff(u_sorted))[0] + 1]
    counts = np.diff(np.r_[starts, len(user)])
    pos = np.arange(len(user)) - np.repeat(starts, counts)
    n_u = np.repeat(counts, counts)
    k = np.floor(frac * n_u + 0.5).astype(np.int64)
    split_sorted = np.where(pos >= n_u - k, 2, np.where(pos >= n_u - 2 * k, 1, 0)).astype(np.int8)
    split = np.empty_like(split_sorted)
    split[order] = split_sorted
    return split


# --------------------------------------------------------------------------------------------- features


def _lookup(ids: np.ndarray, table_ids: np.ndarray) -> np.ndarray:
    """Index of each id in ``table_ids``; ``len(table_ids)`` where absent (point it at a 'missing' slot)."""
    order = np.argsort(table_ids, kind="stable")
    sorted_ids = table_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
    hit = sorted_ids[pos] == ids if len(sorted_ids) else np.zeros(len(ids), dtype=bool)
    return np.where(hit, order[pos], len(table_ids))


def _genre_matrix(genres: list[list[str]]) -> np.ndarray:
    """``[n_movies + 1, G]`` raw genre codes (1 + index in the sorted genre names), ascending, 0-padded.

    Genres are a set: sorting makes every layout agree. The last row (a movie missing from the
    movies file) is empty.
    """
    names = sorted({g for gs in genres for g in gs})
    code = {g: i + 1 for i, g in enumerate(names)}
    sets = [sorted({code[g] for g in gs}) for gs in genres]
    mat = np.zeros((len(genres) + 1, max(max(map(len, sets), default=1), 1)), dtype=np.int64)
    for i, codes in enumerate(sets):
        mat[i, : len(codes)] = codes
    return mat


def _dense(name: str, tower: Tower, description: str) -> FeatureSpec:
    """A statistic or cross: a complex feature (FSCD type III on the user side, IV per candidate)."""
    return FeatureSpec(name, tower, "dense", cost_type=fscd_cost(tower, complex_=True), description=description)


def _cat(name: str, tower: Tower, vocab: int, description: str) -> FeatureSpec:
    """An id looked up directly: a simple feature (FSCD type I on the user side, II per candidate)."""
    return FeatureSpec(
        name, tower, "categorical", vocab_size=max(vocab, 2), cost_type=fscd_cost(tower, complex_=False),
        description=description,
    )  # fmt: skip


def build_schema(
    name: str,
    protocol: str,
    vocab: dict[str, int],
    genre_len: int,
    hist_len: int,
    wide: dict[str, list[FeatureSpec]] | None = None,
) -> Schema:
    """The MovieLens schema; see the module docstring for every feature (``wide``: extra fields per tower,
    :mod:`.movielens_wide`)."""
    wide = wide or {}
    user = [
        _cat("user_id", "user", vocab["user_id"], "user id, vocabulary fitted on training rows"),
        _cat("gender", "user", vocab["gender"], "gender M/F"),
        _cat("age", "user", vocab["age"], "age group (ML-1M codes 1,18,25,35,45,50,56)"),
        _cat("occupation", "user", vocab["occupation"], "occupation"),
        _cat("zip_prefix", "user", vocab["zip_prefix"], "first two characters of the zip code"),
        _dense("user_mean_label", "user", "smoothed positive rate of the user's training rows (out-of-fold)"),
        _dense("user_count", "user", "log1p(number of the user's training rows) / log1p(max)"),
    ]
    if protocol == "temporal" or wide:
        description = (
            f"last {hist_len} positively rated movies strictly before the row's time "
            "(training positives; test rows also validation positives)"
            if protocol == "temporal"
            else f"{hist_len} positively rated training movies of the user, out-of-fold (a training row reads the "
            "other folds), in one random order per user"
        )
        user.append(
            FeatureSpec(
                "hist_item_id",
                "user",
                "sequence",
                max_len=hist_len,
                shares="item_id",
                cost_type=fscd_cost("user", complex_=True),
                n_values=hist_len,
                description=description,
            )
        )
    item = [
        _cat("item_id", "item", vocab["item_id"], "movie id, vocabulary fitted on training rows"),
        FeatureSpec(
            "genres",
            "item",
            "sequence",
            vocab_size=max(vocab["genres"], 2),
            max_len=genre_len,
            pooling="mean",
            cost_type=fscd_cost("item", complex_=False),
            n_values=genre_len,
            description="the movie's genres (multi-valued)",
        ),
        _cat("year_bucket", "item", len(YEAR_EDGES) + 2, f"release year bucket, edges {YEAR_EDGES.tolist()}"),
        _dense("item_mean_label", "item", "smoothed positive rate of the movie's training rows (out-of-fold)"),
        _dense("item_count", "item", "log1p(number of the movie's training rows) / log1p(max)"),
    ]
    cross = [
        _dense(
            "user_genre_affinity",
            "cross",
            "smoothed positive rate of the user's training rows in the movie's genres (out-of-fold)",
        ),
        _dense(
            "user_genre_count",
            "cross",
            "log-scaled mean number of the user's training rows per genre of the movie",
        ),
        _dense(
            "item_group_rate",
            "cross",
            "smoothed positive rate of the movie among training rows of the user's age x gender group (out-of-fold)",
        ),
        _dense(
            "year_gap",
            "cross",
            "(movie year - mean year of the user's training movies) / 10 in [-5, 5]; 0 if unknown",
        ),
    ]
    features = user + wide.get("user", []) + wide.get("context", []) + item + wide.get("item", [])
    return Schema(
        features=tuple(features + cross + wide.get("cross", [])),
        has_label_level=True,
        name=f"{name}-{protocol}" + ("-wide" if wide else ""),
        extra={"recipe": name, "protocol": protocol, "label": "rating > 3 (rating 3 dropped)"}
        | ({"features": "wide"} if wide else {}),
    )


@dataclass
class _Rows:
    """The kept ratings (rating 3 and, for ``temporal``, incomplete users removed) and their split."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    ts: np.ndarray
    has_ts: np.ndarray
    split: np.ndarray
    counts: dict[str, int]

    @property
    def label(self) -> np.ndarray:
        return (self.rating > 3).astype(np.float32)

    @property
    def parts(self) -> list[np.ndarray]:
        """Row indices of train, valid, test."""
        return [np.nonzero(self.split == s)[0] for s in range(3)]


def select_rows(data: RawMovieLens, protocol: str, cfg: MovieLensConfig, rng: np.random.Generator) -> _Rows:
    """Drop rating 3 (and, for ``temporal``, users with any rating lacking a timestamp); assign splits."""
    keep = data.rating != 3
    users_missing_ts = np.unique(data.user[~data.has_ts])
    if protocol == "temporal":
        keep &= ~np.isin(data.user, users_missing_ts)
        if not keep.any():
            raise RecipeError("no user has timestamps on all ratings; the temporal protocol needs some")
    idx = np.nonzero(keep)[0]
    user, ts = data.user[idx], data.ts[idx]
    split = split_paper(len(idx), cfg, rng) if protocol == "paper" else split_temporal(user, ts, cfg.temporal_frac)
    if not (split == 0).any():
        raise RecipeError(f"the training split is empty ({len(idx)} rows after filtering)")
    counts = {
        "raw_ratings": len(data.rating),
        "dropped_rating_3": int((data.rating == 3).sum()),
        "dropped_users_without_full_timestamps": len(users_missing_ts) if protocol == "temporal" else 0,
        "rows_kept": len(idx),
        "users": len(np.unique(user)),
        "items": len(np.unique(data.item[idx])),
        "rows_without_timestamp": int((~data.has_ts[idx]).sum()),
    }
    return _Rows(user, data.item[idx], data.rating[idx], ts, data.has_ts[idx], split, counts)


@dataclass
class _Encoded:
    """Per-row categorical codes (train vocabularies) plus what the item catalogue needs."""

    codes: dict[str, np.ndarray]
    vocab_sizes: dict[str, int]
    item_vocab: Vocab
    row_year: np.ndarray
    catalogue_genres: np.ndarray
    catalogue_year_bucket: np.ndarray
    catalogue_year: np.ndarray


def encode(data: RawMovieLens, rows: _Rows) -> _Encoded:
    """Fit every vocabulary on the training rows and encode all rows (unseen -> 0)."""
    tr = rows.split == 0
    u_at = _lookup(rows.user, data.user_ids)  # row -> users-table index (len = missing user)
    m_at = _lookup(rows.item, data.movie_ids)
    missing = np.array([""])
    attrs = {
        "gender": data.gender,
        "age": data.age.astype(str),
        "occupation": data.occupation,
        "zip_prefix": data.zip_code.astype("<U2"),
        "zip_region": data.zip_code.astype("<U1"),  # the wide feature set's coarser zip
    }
    attrs = {k: np.concatenate([v, missing])[u_at] for k, v in attrs.items()}
    vocabs = {"user_id": Vocab.fit(rows.user[tr]), "item_id": Vocab.fit(rows.item[tr])}
    vocabs |= {k: Vocab.fit(v[tr], missing="") for k, v in attrs.items()}
    codes = {"user_id": vocabs["user_id"].encode(rows.user), "item_id": vocabs["item_id"].encode(rows.item)}
    codes |= {k: vocabs[k].encode(v) for k, v in attrs.items()}

    raw_genres = _genre_matrix(data.genres)  # last row: a movie missing from the movies file
    train_genres = raw_genres[m_at[tr]]
    vocabs["genres"] = Vocab.fit(train_genres[train_genres > 0])
    movie_genres = vocabs["genres"].encode(raw_genres)
    # genres unseen in training become 0: move them behind the known ones (left-aligned lists)
    movie_genres = np.take_along_axis(movie_genres, np.argsort(movie_genres == 0, axis=1, kind="stable"), axis=1)
    years = np.concatenate([data.year, [0]])
    year_bucket = np.where(years > 0, np.searchsorted(YEAR_EDGES, years, side="right") + 1, 0)
    codes["genres"] = movie_genres[m_at]
    codes["year_bucket"] = year_bucket[m_at]
    catalogue_at = _lookup(vocabs["item_id"].values, data.movie_ids)
    return _Encoded(
        codes=codes,
        vocab_sizes={k: v.size for k, v in vocabs.items()},
        item_vocab=vocabs["item_id"],
        row_year=years[m_at],
        catalogue_genres=movie_genres[catalogue_at],
        catalogue_year_bucket=year_bucket[catalogue_at],
        catalogue_year=years[catalogue_at],
    )


def split_stats(rows: _Rows, enc: _Encoded, cfg: MovieLensConfig, rng: np.random.Generator) -> SplitStats:
    """The training split's statistics helper: out-of-fold folds over the training rows, the item catalogue."""
    parts = rows.parts
    # Rows are the fold unit in both protocols: paper test rows are random rows of training
    # sessions, and temporal test rows mostly share their day with training rows (MovieLens users
    # rate in long sign-up sessions); folding by (user, day) would hide whole users from themselves.
    folds = balanced_folds(len(parts[0]), cfg.n_folds, rng)
    catalogue = Entries.single(np.arange(1, enc.item_vocab.size))
    return SplitStats(parts, rows.label[parts[0]], folds, cfg.n_folds, cfg.smoothing, catalogue)


def statistics(rows: _Rows, enc: _Encoded, stats: SplitStats) -> dict[str, list]:
    """Dense statistics and cross features per split (train, valid, test[, catalogue]); see the module docstring."""
    parts = rows.parts
    c = enc.codes
    u_code, i_code, genres = c["user_id"], c["item_id"], c["genres"]
    n_genres = enc.vocab_sizes["genres"]
    n_gender = enc.vocab_sizes["gender"]
    group = c["age"] * n_gender + c["gender"]
    n_groups = enc.vocab_sizes["age"] * n_gender

    def user_genre(p: np.ndarray) -> Entries:
        return Entries.padded(u_code[p], genres[p], n_genres)

    feats: dict[str, list] = {
        "user_mean_label": stats.mean(lambda p: Entries.single(u_code[p])),
        "user_count": stats.count(lambda p: Entries.single(u_code[p])),
        "item_mean_label": stats.mean(lambda p: Entries.single(i_code[p]), catalogue=True),
        "item_count": stats.count(lambda p: Entries.single(i_code[p]), catalogue=True),
        "user_genre_affinity": stats.mean(user_genre),
        "user_genre_count": stats.count(user_genre, per_entry=True),
        "item_group_rate": stats.mean(lambda p: Entries.single(i_code[p] * n_groups + group[p])),
    }
    # Mean release year of the user's training movies reads no labels: whole training split.
    year = enc.row_year
    known = (rows.split == 0) & (year > 0)
    n_users = enc.vocab_sizes["user_id"]
    year_sum = np.bincount(u_code[known], weights=year[known], minlength=n_users)
    year_n = np.bincount(u_code[known], minlength=n_users)
    user_year = (year_sum / np.maximum(year_n, 1))[u_code]
    gap = np.where((year_n[u_code] > 0) & (year > 0), (year - user_year) / 10.0, 0.0)
    feats["year_gap"] = [np.clip(gap[p], -5, 5).astype(np.float32) for p in parts]
    return feats


def histories(rows: _Rows, item_code: np.ndarray, max_len: int) -> list[pa.Array]:
    """``hist_item_id`` per split: the user's positively rated items strictly before the row's time.

    Train and valid rows read training positives, test rows training and validation positives
    (never the test split); items unseen in training (id 0) are left out.
    """
    pos = (rows.label == 1) & (item_code > 0)
    out = []
    for s, p in enumerate(rows.parts):
        ev = pos & (rows.split <= max(s - 1, 0))
        out.append(history(rows.user[p], rows.ts[p], rows.user[ev], rows.ts[ev], item_code[ev], max_len))
    return out


def prepare_movielens(
    name: str,
    raw: Path,
    out: Path,
    protocol: str,
    seed: int,
    *,
    config: MovieLensConfig | None = None,
    features: str = "default",
    progress: Progress = no_progress,
) -> Path:
    """Prepare ``ml-1m`` or ``ml-100k`` from ``raw`` into the dataset folder ``out``; returns ``out``.

    ``features="wide"`` adds the fields of :mod:`.movielens_wide` (under ``paper`` without the timed ones)."""
    cfg = config or MovieLensConfig()
    if protocol not in PROTOCOLS:
        raise RecipeError(f"recipe {name!r} has no protocol {protocol!r}; choose one of {PROTOCOLS}")
    check_feature_set(features)
    t_start = time.perf_counter()
    steps = 5
    progress(f"reading {name} raw files", 0, steps)
    data = read_movielens(raw, name)
    rng = np.random.default_rng(seed)
    progress("splitting and vocabularies", 1, steps)
    rows = select_rows(data, protocol, cfg, rng)
    enc = encode(data, rows)
    progress("statistics and cross features (out-of-fold for training rows)", 2, steps)
    stats = split_stats(rows, enc, cfg, rng)
    feats = statistics(rows, enc, stats)
    wide, catalogue_extra = None, {}
    if protocol == "temporal":
        progress("behaviour histories", 3, steps)
        feats["hist_item_id"] = histories(rows, enc.codes["item_id"], cfg.hist_len)
    if features == "wide":
        progress("wide feature set (past-only or out-of-fold sequences, out-of-fold statistics)", 3, steps)
        wide, extra, catalogue_extra = wide_features(rows, enc, stats, cfg, feats.get("hist_item_id"), rng)
        feats |= extra

    progress("writing Parquet", 4, steps)
    schema = build_schema(name, protocol, enc.vocab_sizes, enc.codes["genres"].shape[1], cfg.hist_len, wide)
    tables = {}
    for s, (split_name, p) in enumerate(zip(("train", "valid", "test"), rows.parts, strict=True)):
        cols: dict[str, pa.Array] = {
            "request_id": pa.array(rows.user[p], pa.int64()),
            "label": pa.array(rows.label[p], pa.float32()),
            "label_level": pa.array(rows.rating[p], pa.int8()),
            "ts": pa.array(rows.ts[p], pa.int64(), mask=~rows.has_ts[p]),
        }
        for f in schema.features:
            if f.kind == "sequence" and f.name in feats:
                cols[f.name] = feats[f.name][s]
            elif f.kind == "dense":
                cols[f.name] = pa.array(feats[f.name][s], pa.float32())
            elif f.kind == "sequence":
                cols[f.name] = padded_to_list(enc.codes[f.name][p])
            else:
                cols[f.name] = pa.array(enc.codes[f.name][p], pa.int64())
        order = np.lexsort((p, rows.ts[p], rows.user[p]))  # requests contiguous, by time
        tables[split_name] = pa.table(cols).take(pa.array(order))
    items = pa.table(
        {
            "item_id": pa.array(np.arange(1, enc.item_vocab.size), pa.int64()),
            "raw_item_id": pa.array(enc.item_vocab.values, pa.int64()),
            "genres": padded_to_list(enc.catalogue_genres),
            "year_bucket": pa.array(enc.catalogue_year_bucket, pa.int64()),
            "item_mean_label": pa.array(feats["item_mean_label"][3], pa.float32()),
            "item_count": pa.array(feats["item_count"][3], pa.float32()),
        }
    )
    for col, values in catalogue_extra.items():
        dtype = pa.float32() if schema[col].kind == "dense" else pa.int64()
        items = items.append_column(col, pa.array(values, dtype))
    meta = {
        "recipe": name,
        "protocol": protocol,
        "features": features,
        "seed": seed,
        "config": asdict(cfg),
        "layout": data.layout,
        "raw_files": data.files,
        "counts": rows.counts | {"train_users": enc.vocab_sizes["user_id"] - 1, "train_items": enc.item_vocab.size - 1},
        "label_rate": {
            k: label_rate(rows.label[p]) for k, p in zip(("train", "valid", "test"), rows.parts, strict=True)
        },
        "request_id": "user id",
    }
    with staging_dir(out) as tmp:
        meta["prepare_seconds"] = round(time.perf_counter() - t_start, 2)
        write_dataset(tmp, schema, tables, items=items, meta=meta)
    progress("done", steps, steps)
    return Path(out)
