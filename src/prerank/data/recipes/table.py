"""The ``table`` recipe: your own interaction log (CSV or Parquet) -> a prerank dataset.

``prerank data prepare table --interactions FILE [--users FILE] [--items FILE] --user-col U --item-col I
[--label-col L | --implicit] [--time-col T] [--split ...] [--negatives K] --out D``

Inference rules (everything is recorded in ``report.json`` and printed by the CLI):

* Files are read by extension: ``.parquet``/``.pq`` with pyarrow Parquet, ``.csv``/``.tsv``
  (optionally ``.gz``/``.bz2``) with pyarrow CSV.
* Towers come from where a column lives: the users file -> ``user``, the items file -> ``item``,
  every other column of the interactions file -> ``context``. The id columns become ``user_id``
  (tower user) and ``item_id`` (tower item; the serving item cache is keyed by that name) whatever
  their raw names; the raw names are kept in ``report.json`` and ``schema.extra``.
* Kinds come from the Arrow type: integer, string, boolean or dictionary -> ``categorical``;
  list -> ``sequence`` (multi-valued; one vocabulary over the values, ``max_len`` = the longest
  training list, at most 64); floating point -> ``dense``. Other types (timestamps outside the
  time column, structs, binary...) are dropped and listed in the report, and so are columns
  named like a reserved column (``request_id``, ``label``, ``ts``...) or an output feature.
* Categorical vocabularies are fitted on the **training rows only**: values seen there get ids
  ``1..K`` (sorted), anything else (unseen in training, null, empty string) maps to 0. List
  values unseen in training are left out of the list.
* Dense columns are standardised with the mean and standard deviation of the training rows;
  NaN, null and infinite values become 0 after scaling (the mean) and are counted in a warning.
* Labels (``--label-col``) must be 0/1 (boolean, integer or float); anything else is an error.
  With ``--implicit`` every logged row is a positive and ``--negatives K`` (default 4) negatives
  per positive are drawn, seeded, uniformly or by training popularity from the training items,
  never an item the user interacted with anywhere in the log; a negative copies its positive's
  user, time, split and context columns.
* ``request_id`` is the user (a dense index over the sorted raw user ids): GAUC groups by user.
* Splits, never leaking the future into training when there is a time column:
  ``leave-last-out`` (default with ``--time-col --implicit``): per user, rows by time (ties in file order),
  the last row -> test (users with at least 2 rows), the one before -> valid (at least 3 rows);
  ``global-time`` (default with ``--time-col --label-col``): rows up to the
  ``1 - valid_frac - test_frac`` time quantile -> train, up to the ``1 - test_frac`` quantile ->
  valid, later -> test (0.8/0.1/0.1); ``random`` (default without a time column): rows at random
  by seed (0.8/0.1/0.1). An empty split is an error; a valid or test split where no
  request (user) has both a positive and a negative row gets a warning (GAUC is undefined there:
  leave-last-out with logged labels does this, one row per user).
* ``hist_item_id`` (with a time column): the user's last ``max_hist`` positive items strictly
  before the row's time; train and valid rows read training positives, test rows training and
  validation positives (never the test split); items unseen in training are left out. It shares
  ``item_id``'s vocabulary.
* Item statistics (default on; ``--no-item-stats`` leaves them out), two dense item features read
  from the training split only: ``item_mean_label``, the item's smoothed positive rate
  ``(positives + m * prior) / (rows + m)`` with ``m = 20`` pseudo-rows of the training mean, and
  ``item_count``, its number of training rows, ``log1p``-scaled by the largest count. With
  ``--implicit`` both count the sampled negatives too (the rate is then the item's share of
  positives among its rows). Valid and test rows and the item catalogue read the whole training
  split; a training row reads the rate **out of fold** (5 folds of whole users, the unit a new
  request is drawn from), so it never sees its own label nor another label of its user. Why: on
  a small log most ids are seen a handful of times, and an id embedding learns an item's
  popularity slowly and noisily; the smoothed rate hands every model (and the item cache) the
  popularity prior that a popularity scorer uses, so a personalised model starts from it instead
  of having to rediscover it (docs/results.md, "Small data").

Output: ``train/ valid/ test/`` Parquet, ``items.parquet`` (one row per training item id 1..K with
its ``raw_item_id`` and item features), ``schema.json``, ``meta.json``, ``report.json`` (what was
inferred) and ``vocab.json`` (per categorical/sequence feature, the raw value of each id: id ``i``
is ``vocab[feature][i - 1]``; use it to encode serving requests).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from prerank.data.parquet import write_dataset
from prerank.data.recipes.common import (
    Entries,
    Progress,
    RecipeError,
    SplitStats,
    Vocab,
    balanced_folds,
    fscd_cost,
    history,
    label_rate,
    no_progress,
    staging_dir,
)
from prerank.io import atomic_write_text
from prerank.schema import RESERVED, FeatureSpec, Schema

SPLIT_MODES: tuple[str, ...] = ("leave-last-out", "global-time", "random")
SAMPLING: tuple[str, ...] = ("uniform", "popularity")
SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "test")
MAX_SEQ_LEN = 64
#: Output names the recipe itself produces; an input column of that name (other than the ids) is dropped.
OWN_NAMES = ("user_id", "item_id", "hist_item_id", "item_mean_label", "item_count")


class TableError(RecipeError):
    """The table recipe cannot run on these files (names the file, the column and the problem)."""


@dataclass(frozen=True)
class TableConfig:
    """Options of :func:`prepare_table` (the CLI flags)."""

    user_col: str
    item_col: str
    label_col: str | None = None
    implicit: bool = False
    time_col: str | None = None
    split: str | None = None
    negatives: int | None = None
    negative_sampling: str = "uniform"
    max_hist: int = 20
    valid_frac: float = 0.1
    test_frac: float = 0.1
    seed: int = 0
    item_stats: bool = True
    stat_folds: int = 5
    stat_smoothing: float = 20.0


# --------------------------------------------------------------------------------------------- reading


def read_table(path: str | Path, what: str) -> pa.Table:
    """Read a CSV (by extension, optionally compressed) or Parquet file; :class:`TableError` if it cannot."""
    path = Path(path)
    if not path.exists():
        raise TableError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise TableError(f"{what} file {path} is not a file")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2"):
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    try:
        if ext in (".parquet", ".pq"):
            return pq.read_table(path)
        if ext in (".csv", ".tsv"):
            parse = pacsv.ParseOptions(delimiter="\t" if ext == ".tsv" else ",")
            return pacsv.read_csv(path, parse_options=parse)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise TableError(f"cannot read {what} file {path}: {e}") from e
    raise TableError(f"{what} file {path}: unknown extension {ext or '(none)'!r}; use .csv, .tsv, .parquet or .pq")


def _require(table: pa.Table, cols: list[str | None], what: str) -> None:
    missing = [c for c in cols if c is not None and c not in table.column_names]
    if missing:
        raise TableError(f"{what} has no column(s) {missing} (columns: {table.column_names})")


def _check_unique(table: pa.Table, key: str, what: str) -> None:
    col = table.column(key)
    if col.null_count:
        raise TableError(f"{what}: key column {key!r} has {col.null_count} empty values")
    counts = pc.value_counts(col.combine_chunks())
    dup = pc.filter(counts, pc.greater(pc.struct_field(counts, [1]), 1))
    if len(dup):
        first = dup[0].as_py()["values"]
        raise TableError(
            f"{what}: duplicate keys in column {key!r}: {len(dup)} value(s) appear more than once (first: {first!r})"
        )


def _key_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Raw values of a categorical column as numpy: int64 when integer without nulls, else str ('' = missing)."""
    t = col.type
    if pa.types.is_dictionary(t):
        col = pc.cast(col, t.value_type)
        t = t.value_type
    if pa.types.is_integer(t) and col.null_count == 0:
        return np.asarray(pc.cast(col, pa.int64()).to_numpy(), dtype=np.int64)
    text = pc.fill_null(pc.cast(col, pa.string()), "")
    return np.asarray(text.to_pylist(), dtype=object).astype(str)


def _labels(col: pa.ChunkedArray, name: str) -> np.ndarray:
    t = col.type
    if col.null_count:
        raise TableError(f"label column {name!r} has {col.null_count} empty values; labels must be 0 or 1")
    if pa.types.is_boolean(t):
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float32)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise TableError(f"label column {name!r} has type {t}; labels must be 0/1 numbers or booleans")
    y = np.asarray(pc.cast(col, pa.float64()).to_numpy(), dtype=np.float64)
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        seen = sorted(set(np.unique(y[bad]).tolist()))[:5]
        raise TableError(
            f"label column {name!r} is not binary: {int(bad.sum())} values other than 0/1 (e.g. {seen}); "
            "binarise it first (e.g. rating > 3) or use --implicit"
        )
    return y.astype(np.float32)


def _times(col: pa.ChunkedArray, name: str) -> np.ndarray:
    """A time column as int64 (seconds for timestamps and dates, the raw number otherwise)."""
    if col.null_count:
        raise TableError(f"time column {name!r} has {col.null_count} empty values")
    t = col.type
    try:
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            col = pc.cast(col, pa.timestamp("s"))
            t = col.type
        if pa.types.is_date(t):
            col = pc.cast(pc.cast(col, pa.date32()), pa.timestamp("s"))
            t = col.type
        if pa.types.is_timestamp(t):
            return np.asarray(pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64()).to_numpy(), dtype=np.int64)
        if pa.types.is_integer(t):
            return np.asarray(pc.cast(col, pa.int64()).to_numpy(), dtype=np.int64)
        if pa.types.is_floating(t):
            v = np.asarray(col.to_numpy(), dtype=np.float64)
            if not np.isfinite(v).all():
                raise TableError(f"time column {name!r} has NaN or infinite values")
            return np.floor(v).astype(np.int64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise TableError(f"time column {name!r} ({t}) cannot be read as a time: {e}") from e
    raise TableError(f"time column {name!r} has type {t}; use integers, floats, dates or timestamps")


# --------------------------------------------------------------------------------------------- splits


def split_leave_last_out(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Per user by time: last row -> test (2) if >= 2 rows, the one before -> valid (1) if >= 3."""
    n = len(user)
    order = np.lexsort((np.arange(n), ts, user))
    u_sorted = user[order]
    starts = np.r_[0, np.nonzero(u_sorted[1:] != u_sorted[:-1])[0] + 1] if n else np.zeros(0, dtype=np.int64)
    counts = np.diff(np.r_[starts, n])
    pos = np.arange(n) - np.repeat(starts, counts)
    n_u = np.repeat(counts, counts)
    s = np.zeros(n, dtype=np.int8)
    s[(pos == n_u - 1) & (n_u >= 2)] = 2
    s[(pos == n_u - 2) & (n_u >= 3)] = 1
    out = np.empty_like(s)
    out[order] = s
    return out


def split_global_time(ts: np.ndarray, valid_frac: float, test_frac: float) -> np.ndarray:
    """Rows up to the ``1 - valid - test`` time quantile -> train, up to ``1 - test`` -> valid, later -> test."""
    q_valid, q_test = np.quantile(ts, [1 - valid_frac - test_frac, 1 - test_frac], method="lower")
    return np.where(ts <= q_valid, 0, np.where(ts <= q_test, 1, 2)).astype(np.int8)


def split_random(n: int, valid_frac: float, test_frac: float, rng: np.random.Generator) -> np.ndarray:
    perm = rng.permutation(n)
    n_test, n_valid = int(round(test_frac * n)), int(round(valid_frac * n))
    s = np.zeros(n, dtype=np.int8)
    s[perm[:n_test]] = 2
    s[perm[n_test : n_test + n_valid]] = 1
    return s


# --------------------------------------------------------------------------------------------- negatives


def sample_negatives(
    user: np.ndarray,
    k: int,
    n_items: int,
    interacted: np.ndarray,
    weights: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` negative item codes in ``1..n_items`` for each positive row of ``user`` (dense user indices).

    ``interacted`` holds ``user * (n_items + 1) + item_code`` of every logged (user, item) pair;
    a sampled item is never one of them. ``weights`` (length ``n_items``) draws by popularity,
    ``None`` uniformly. Users who interacted with every item get no negatives.
    Returns ``(row, item)``: the positive each negative belongs to and its item code.
    """
    stride = n_items + 1
    bad_keys = np.unique(interacted)
    n_bad = np.bincount(bad_keys // stride, minlength=int(user.max(initial=-1)) + 1)
    inter_items = bad_keys % stride
    # a user whose interacted items cover every positive-weight item cannot get a negative
    if weights is None:
        full = n_bad >= n_items
    else:
        w_by_user = np.bincount(bad_keys // stride, weights=weights[inter_items - 1], minlength=len(n_bad))
        full = w_by_user >= weights.sum() - 1e-9
    rows = np.repeat(np.arange(len(user)), k)
    rows = rows[~full[user[rows]]]
    p = None if weights is None else weights / weights.sum()
    items = np.zeros(len(rows), dtype=np.int64)
    todo = np.arange(len(rows))
    for _ in range(1000):
        if not len(todo):
            break
        draw = rng.choice(n_items, size=len(todo), p=p) + 1
        hit = np.isin(user[rows[todo]].astype(np.int64) * stride + draw, bad_keys)
        items[todo[~hit]] = draw[~hit]
        todo = todo[hit]
    if len(todo):  # pathological: almost every item taken; draw exactly from what is left
        for t in todo:
            u = user[rows[t]]
            taken = inter_items[bad_keys // stride == u]
            free = np.setdiff1d(np.arange(1, n_items + 1), taken)
            pw = None if p is None else p[free - 1] / p[free - 1].sum()
            items[t] = rng.choice(free, p=pw)
    return rows, items


# --------------------------------------------------------------------------------------------- features


@dataclass
class _Column:
    """An input column on its way to a feature: where it comes from, what it became or why it was dropped."""

    column: str
    source: str
    tower: str
    feature: str = ""
    kind: str = ""
    vocab_size: int = 0
    max_len: int = 0
    arrow_type: str = ""
    notes: dict[str, Any] = field(default_factory=dict)


def _kind_of(t: pa.DataType) -> str | None:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t):
        return "categorical"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "dense"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "sequence" if _kind_of(t.value_type) == "categorical" else None
    return None


def _encode_sequence(col: pa.ChunkedArray, train: np.ndarray) -> tuple[pa.Array, Vocab, int]:
    """A list column -> ``list<int32>`` of training-vocabulary ids (unseen values dropped); vocabulary, max_len."""
    arr = col.combine_chunks()
    if arr.null_count:
        arr = arr.fill_null(pa.scalar([], arr.type))
    offsets = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
    offsets = offsets - offsets[0]
    values = arr.flatten()
    raw = _key_values(values)
    row_of = np.repeat(np.arange(len(arr)), np.diff(offsets))
    in_train = train[row_of]
    vocab = Vocab.fit(raw[in_train], missing="" if raw.dtype.kind == "U" else None)
    codes = vocab.encode(raw)
    keep = codes > 0
    lengths = np.bincount(row_of[keep], minlength=len(arr))
    new_offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    out = pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(codes[keep].astype(np.int32), pa.int32()))
    train_len = lengths[train]
    max_len = int(min(max(train_len.max(initial=1), 1), MAX_SEQ_LEN))
    return out, vocab, max_len


def _encode_dense(col: pa.ChunkedArray, train: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    v = np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = ~np.isfinite(v)
    ok_train = train & ~bad
    mean = float(v[ok_train].mean()) if ok_train.any() else 0.0
    std = float(v[ok_train].std()) if ok_train.any() else 1.0
    std = std if std > 1e-12 else 1.0
    z = np.where(bad, 0.0, (np.where(bad, 0.0, v) - mean) / std)
    return z.astype(np.float32), {"mean": mean, "std": std, "missing_filled": int(bad.sum())}


# --------------------------------------------------------------------------------------------- recipe


def _check_config(cfg: TableConfig, has_time: bool) -> tuple[str, int]:
    if cfg.implicit == (cfg.label_col is not None):
        raise TableError("give exactly one of --label-col (0/1 labels) and --implicit (every row is a positive)")
    # leave-last-out leaves one row per user in valid/test: with logged labels no request would hold both a
    # positive and a negative (GAUC undefined), so it is the default only for implicit feedback (+ negatives)
    split = cfg.split or (("leave-last-out" if cfg.implicit else "global-time") if has_time else "random")
    if split not in SPLIT_MODES:
        raise TableError(f"unknown --split {split!r}; choose one of {SPLIT_MODES}")
    if split != "random" and not has_time:
        raise TableError(f"--split {split} needs a time column (--time-col)")
    if cfg.negative_sampling not in SAMPLING:
        raise TableError(f"unknown --negative-sampling {cfg.negative_sampling!r}; choose one of {SAMPLING}")
    negatives = cfg.negatives if cfg.negatives is not None else (4 if cfg.implicit else 0)
    if negatives < 0:
        raise TableError(f"--negatives must be >= 0, got {negatives}")
    if negatives and not cfg.implicit:
        raise TableError("--negatives samples negatives for --implicit feedback; with --label-col the log has them")
    if cfg.implicit and negatives == 0:
        raise TableError("--implicit with --negatives 0 leaves only positives; a model cannot learn from them")
    if cfg.max_hist < 1:
        raise TableError(f"--max-hist must be >= 1, got {cfg.max_hist}")
    if not (cfg.valid_frac > 0 and cfg.test_frac > 0 and cfg.valid_frac + cfg.test_frac < 1):
        raise TableError("valid_frac and test_frac must be positive and sum to less than 1")
    return split, negatives


def prepare_table(
    interactions: str | Path,
    out: str | Path,
    config: TableConfig,
    *,
    users: str | Path | None = None,
    items: str | Path | None = None,
    progress: Progress = no_progress,
) -> Path:
    """Build a prerank dataset from an interaction log (plus optional user and item tables); returns ``out``.

    See the module docstring for every inference rule. Raises :class:`TableError` (a ``ValueError``)
    naming the file, the column and the problem.
    """
    cfg = config
    t_start = time.perf_counter()
    steps = 6
    progress("reading files", 0, steps)
    log = read_table(interactions, "interactions")
    _require(log, [cfg.user_col, cfg.item_col, cfg.label_col, cfg.time_col], f"interactions file {interactions}")
    split_mode, n_neg = _check_config(cfg, cfg.time_col is not None)
    if log.num_rows == 0:
        raise TableError(f"interactions file {interactions} has no rows")
    for key in (cfg.user_col, cfg.item_col):
        if log.column(key).null_count:
            raise TableError(
                f"interactions file {interactions}: column {key!r} has {log.column(key).null_count} empty values"
            )
    side: dict[str, pa.Table] = {}
    for what, path, key in (("users", users, cfg.user_col), ("items", items, cfg.item_col)):
        if path is None:
            continue
        t = read_table(path, what)
        _require(t, [key], f"{what} file {path}")
        _check_unique(t, key, f"{what} file {path}")
        side[what] = t

    warnings: list[str] = []
    report_cols: list[_Column] = []
    dropped: list[dict[str, str]] = []
    n = log.num_rows
    raw_user = _key_values(log.column(cfg.user_col))
    raw_item = _key_values(log.column(cfg.item_col))
    user_keys, user_idx = np.unique(raw_user, return_inverse=True)
    user_idx = user_idx.reshape(-1).astype(np.int64)
    ts = _times(log.column(cfg.time_col), cfg.time_col) if cfg.time_col else None
    label = np.ones(n, dtype=np.float32) if cfg.implicit else _labels(log.column(cfg.label_col), cfg.label_col)

    progress("splitting", 1, steps)
    rng = np.random.default_rng(cfg.seed)
    if split_mode == "leave-last-out":
        split = split_leave_last_out(user_idx, ts)
    elif split_mode == "global-time":
        split = split_global_time(ts, cfg.valid_frac, cfg.test_frac)
    else:
        split = split_random(n, cfg.valid_frac, cfg.test_frac, rng)
    for s, name in enumerate(SPLIT_NAMES):
        if not (split == s).any():
            hint = {
                "leave-last-out": "every user has fewer than 3 interactions",
                "global-time": "too few distinct times",
                "random": "too few rows",
            }[split_mode]
            raise TableError(f"the {name} split is empty after --split {split_mode} on {n} rows ({hint})")
    train = split == 0

    progress("vocabularies and features", 2, steps)
    item_vocab = Vocab.fit(raw_item[train], missing="" if raw_item.dtype.kind == "U" else None)
    user_vocab = Vocab.fit(raw_user[train], missing="" if raw_user.dtype.kind == "U" else None)
    item_code = item_vocab.encode(raw_item)
    vocabs: dict[str, Vocab] = {"user_id": user_vocab, "item_id": item_vocab}
    codes: dict[str, Any] = {"user_id": user_vocab.encode(raw_user), "item_id": item_code}
    specs: list[FeatureSpec] = [
        FeatureSpec(
            "user_id", "user", "categorical", vocab_size=max(user_vocab.size, 2), cost_type="I",
            description=f"user id (raw column {cfg.user_col!r}), training vocabulary",
        ),
        FeatureSpec(
            "item_id", "item", "categorical", vocab_size=max(item_vocab.size, 2), cost_type="II",
            description=f"item id (raw column {cfg.item_col!r}), training vocabulary",
        ),
    ]  # fmt: skip
    report_cols.append(_Column(cfg.user_col, "interactions", "user", "user_id", "categorical", user_vocab.size))
    report_cols.append(_Column(cfg.item_col, "interactions", "item", "item_id", "categorical", item_vocab.size))
    if cfg.label_col:
        report_cols.append(_Column(cfg.label_col, "interactions", "", "label", "label"))
    if cfg.time_col:
        report_cols.append(_Column(cfg.time_col, "interactions", "", "ts", "time"))

    # Candidate columns: (source, tower, name, per-row column). Side tables are joined onto the log rows.
    used = {cfg.user_col, cfg.item_col, cfg.label_col, cfg.time_col}
    candidates: list[tuple[str, str, str, pa.ChunkedArray]] = []
    for name in log.column_names:
        if name not in used:
            candidates.append(("interactions", "context", name, log.column(name)))
    for what, key, raw_keys, tower in (
        ("users", cfg.user_col, raw_user, "user"),
        ("items", cfg.item_col, raw_item, "item"),
    ):
        if what not in side:
            continue
        t = side[what]
        keys = _key_values(t.column(key))
        if keys.dtype.kind != raw_keys.dtype.kind:  # e.g. int ids in one file, strings in the other
            keys, raw_keys = keys.astype(str), raw_keys.astype(str)
        order = np.argsort(keys, kind="stable")
        pos = np.clip(np.searchsorted(keys[order], raw_keys), 0, max(len(keys) - 1, 0))
        hit = keys[order][pos] == raw_keys if len(keys) else np.zeros(n, dtype=bool)
        if (~hit).any():
            warnings.append(f"{int((~hit).sum())} interaction rows have a {what[:-1]} missing from the {what} file")
        take = pa.array(np.where(hit, order[pos], 0), pa.int64(), mask=~hit)  # null index -> null value
        for name in t.column_names:
            if name == key:
                continue
            candidates.append((what, tower, name, t.column(name).take(take)))

    seen_names = set(OWN_NAMES)
    for source, tower, name, col in candidates:
        kind = _kind_of(col.type)
        entry = _Column(name, source, tower, arrow_type=str(col.type))
        reason = None
        if name in RESERVED:
            reason = f"reserved column name {name!r}"
        elif name in seen_names:
            reason = f"name {name!r} collides with another feature"
        elif kind is None:
            reason = f"unsupported type {col.type}"
        if reason:
            dropped.append({"column": name, "source": source, "reason": reason})
            continue
        seen_names.add(name)
        entry.feature, entry.kind = name, kind
        cost = fscd_cost(tower, complex_=False)
        if kind == "categorical":
            raw = _key_values(col)
            vocab = Vocab.fit(raw[train], missing="" if raw.dtype.kind == "U" else None)
            if vocab.size < 2:
                dropped.append({"column": name, "source": source, "reason": "no value in the training rows"})
                continue
            codes[name] = vocab.encode(raw)
            vocabs[name] = vocab
            entry.vocab_size = vocab.size
            spec = FeatureSpec(name, tower, "categorical", vocab_size=vocab.size, cost_type=cost,
                               description=f"{source} column {name!r} ({col.type}), training vocabulary")  # fmt: skip
        elif kind == "sequence":
            arr, vocab, max_len = _encode_sequence(col, train)
            size = vocab.size
            if size < 2:
                dropped.append({"column": name, "source": source, "reason": "no value in the training rows"})
                continue
            codes[name] = arr
            vocabs[name] = vocab
            entry.vocab_size, entry.max_len = size, max_len
            spec = FeatureSpec(
                name, tower, "sequence", vocab_size=size, max_len=max_len, cost_type=cost, n_values=max_len,
                description=f"{source} list column {name!r}, training vocabulary",
            )  # fmt: skip
        else:
            values, stats = _encode_dense(col, train)
            codes[name] = values
            entry.notes = stats
            if stats["missing_filled"]:
                warnings.append(
                    f"dense column {name!r}: {stats['missing_filled']} NaN/empty values set to 0 (the mean)"
                )
            spec = FeatureSpec(name, tower, "dense", cost_type=cost,
                               description=f"{source} column {name!r}, standardised (train mean {stats['mean']:.4g}, "
                               f"std {stats['std']:.4g})")  # fmt: skip
        specs.append(spec)
        report_cols.append(entry)

    has_hist = cfg.time_col is not None
    if has_hist:
        specs.append(
            FeatureSpec(
                "hist_item_id", "user", "sequence", max_len=cfg.max_hist, shares="item_id", cost_type="III",
                n_values=cfg.max_hist,
                description=f"last {cfg.max_hist} positive items of the user strictly before the row's time "
                "(training positives; test rows also validation positives)",
            )
        )  # fmt: skip

    # ---- negatives (implicit): rows added after the split, copying their positive's row
    progress("negatives and histories", 3, steps)
    base_rows = np.arange(n)
    row_label = label.copy()
    row_item_code = item_code
    if cfg.implicit:
        stride = item_vocab.size
        logged = item_code > 0  # items unseen in training are never drawn anyway
        interacted = user_idx[logged] * stride + item_code[logged]
        weights = None
        if cfg.negative_sampling == "popularity":
            weights = np.bincount(item_code[train], minlength=item_vocab.size)[1:].astype(np.float64)
        neg_of, neg_item = sample_negatives(user_idx, n_neg, item_vocab.size - 1, interacted, weights, rng)
        short = n * n_neg - len(neg_of)
        if short:
            warnings.append(f"{short} negatives not drawn: their users interacted with every training item")
        base_rows = np.r_[base_rows, neg_of]
        row_label = np.r_[label, np.zeros(len(neg_of), dtype=np.float32)]
        row_item_code = np.r_[item_code, neg_item]

    # ---- per-row columns (positives then negatives); item features of negatives come from the catalogue
    cat_table = _catalogue(item_vocab, specs, codes, item_code, train, n)
    feats: dict[str, Any] = {}
    for f in specs:
        if f.name == "hist_item_id":
            continue
        if f.name == "item_id":
            feats[f.name] = pa.array(row_item_code, pa.int64())
        elif f.tower == "item" and len(base_rows) > n:
            own = codes[f.name] if isinstance(codes[f.name], pa.Array) else pa.array(codes[f.name])
            neg = cat_table.column(f.name).take(pa.array(row_item_code[n:] - 1, pa.int64())).combine_chunks()
            feats[f.name] = pa.concat_arrays([pc.cast(own, neg.type), neg])
        else:
            v = codes[f.name]
            feats[f.name] = v.take(pa.array(base_rows)) if isinstance(v, pa.Array) else pa.array(v[base_rows])
    row_split = split[base_rows]
    row_user = user_idx[base_rows]
    row_ts = ts[base_rows] if ts is not None else None

    parts = [np.nonzero(row_split == s)[0] for s in range(3)]
    hist: list[pa.Array] = []
    if has_hist:
        pos_ev = (row_label == 1) & (row_item_code > 0)
        for s, p in enumerate(parts):
            ev = pos_ev & (row_split <= max(s - 1, 0))
            hist.append(history(row_user[p], row_ts[p], row_user[ev], row_ts[ev], row_item_code[ev], cfg.max_hist))

    stats: dict[str, list[np.ndarray]] = {}
    if cfg.item_stats:
        stats = _item_statistics(cfg, parts, row_user, row_label, row_item_code, item_vocab.size - 1)
        specs.extend(_ITEM_STAT_SPECS)
        for name, values in stats.items():
            cat_table = cat_table.append_column(name, pa.array(values[3], pa.float32()))

    progress("writing Parquet", 4, steps)
    schema = Schema(
        features=tuple(specs),
        name="table",
        extra={
            "recipe": "table",
            "raw_columns": {
                "user_id": cfg.user_col,
                "item_id": cfg.item_col,
                "label": cfg.label_col or "(implicit)",
                "ts": cfg.time_col,
            },
        },  # fmt: skip
    )
    tables: dict[str, pa.Table] = {}
    for s, (name, p) in enumerate(zip(SPLIT_NAMES, parts, strict=True)):
        cols: dict[str, pa.Array] = {
            "request_id": pa.array(row_user[p] + 1, pa.int64()),
            "label": pa.array(row_label[p], pa.float32()),
        }
        if row_ts is not None:
            cols["ts"] = pa.array(row_ts[p], pa.int64())
        for f in specs:
            if f.name == "hist_item_id":
                cols[f.name] = hist[s]
            elif f.name in stats:
                cols[f.name] = pa.array(stats[f.name][s], pa.float32())
            else:
                col = feats[f.name].take(pa.array(p, pa.int64()))
                cols[f.name] = pc.cast(col, {"categorical": pa.int64(), "dense": pa.float32(),
                                            "sequence": pa.list_(pa.int32())}[f.kind])  # fmt: skip
        sort_keys = (p, row_ts[p], row_user[p]) if row_ts is not None else (p, row_user[p])
        tables[name] = pa.table(cols).take(pa.array(np.lexsort(sort_keys)))

    rows = {k: t.num_rows for k, t in tables.items()}
    for name, p in zip(SPLIT_NAMES[1:], parts[1:], strict=True):
        if not _has_mixed_request(row_user[p], row_label[p]):
            warnings.append(
                f"no {name} request (user) has both a positive and a negative row, so GAUC is undefined there "
                f"(--split {split_mode}); "
                + (
                    "prerank train fails without one; use --split global-time, or --implicit with negatives"
                    if split_mode == "leave-last-out"
                    else "prerank train fails without one; use a larger log"
                )
            )
    report = {
        "recipe": "table",
        "files": {
            "interactions": str(interactions),
            "users": str(users) if users else None,
            "items": str(items) if items else None,
        },  # fmt: skip
        "split": split_mode,
        "label": f"column {cfg.label_col!r}"
        if cfg.label_col
        else f"implicit: logged rows positive, {n_neg} {cfg.negative_sampling} negatives per positive",
        "request_id": "user (dense index over the sorted raw user ids)",
        "history": f"hist_item_id: last {cfg.max_hist} earlier positives" if has_hist else None,
        "item_statistics": (
            f"item_mean_label (smoothed, m={cfg.stat_smoothing:g}; out of fold, {cfg.stat_folds} folds of users, "
            "for training rows) and item_count (log1p-scaled), from the training split"
            if cfg.item_stats
            else None
        ),
        "columns": [asdict(c) for c in report_cols],
        "dropped": dropped,
        "rows": rows,
        "input_rows": n,
        "negatives": int(len(base_rows) - n),
        "users": len(user_keys),
        "train_users": user_vocab.size - 1,
        "train_items": item_vocab.size - 1,
        "label_rate": {k: label_rate(row_label[p]) for k, p in zip(SPLIT_NAMES, parts, strict=True)},
        "warnings": warnings,
    }
    meta = {
        "recipe": "table",
        "protocol": split_mode,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "counts": {
            "input_rows": n,
            "negatives": report["negatives"],
            "users": len(user_keys),
            "train_users": user_vocab.size - 1,
            "train_items": item_vocab.size - 1,
        },  # fmt: skip
        "label_rate": report["label_rate"],
        "request_id": "user",
    }
    with staging_dir(Path(out)) as tmp:
        meta["prepare_seconds"] = round(time.perf_counter() - t_start, 2)
        report["prepare_seconds"] = meta["prepare_seconds"]
        write_dataset(tmp, schema, tables, items=cat_table, meta=meta)
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=2, default=str))
        # raw value of every id, to encode requests at serving time: id i is vocab[name][i - 1]
        vocab_json = {k: v.values.tolist() for k, v in vocabs.items() if k in schema}
        atomic_write_text(tmp / "vocab.json", json.dumps(vocab_json))
    progress("done", steps, steps)
    return Path(out)


_ITEM_STAT_SPECS = (
    FeatureSpec("item_mean_label", "item", "dense", cost_type="IV",
                description="smoothed positive rate of the item's training rows (out of fold for training rows)"),
    FeatureSpec("item_count", "item", "dense", cost_type="IV",
                description="number of training rows of the item, log1p-scaled by the largest"),
)  # fmt: skip


def _item_statistics(
    cfg: TableConfig,
    parts: list[np.ndarray],
    user: np.ndarray,
    label: np.ndarray,
    item_code: np.ndarray,
    n_items: int,
) -> dict[str, list[np.ndarray]]:
    """``item_mean_label`` and ``item_count`` for train, valid, test rows and the catalogue (ids ``1..n_items``).

    Folds are whole users (``request_id`` is the user here): a training row's rate excludes every row of
    its user, as a valid or test request of a new user sees none of its own rows (:func:`balanced_folds`).
    """
    train = parts[0]
    folds = balanced_folds(len(train), cfg.stat_folds, np.random.default_rng(cfg.seed + 1), groups=user[train])
    split_stats = SplitStats(
        parts, label[train], folds, cfg.stat_folds, cfg.stat_smoothing, Entries.single(np.arange(1, n_items + 1))
    )

    def by_item(rows: np.ndarray) -> Entries:
        return Entries.single(item_code[rows])

    return {
        "item_mean_label": split_stats.mean(by_item, catalogue=True),
        "item_count": split_stats.count(by_item, catalogue=True),
    }


def _has_mixed_request(user: np.ndarray, label: np.ndarray) -> bool:
    pos = np.bincount(user, weights=label, minlength=int(user.max(initial=0)) + 1)
    cnt = np.bincount(user, minlength=len(pos))
    return bool(((pos > 0) & (pos < cnt)).any())


def _catalogue(
    item_vocab: Vocab, specs: list[FeatureSpec], codes: dict[str, Any], item_code: np.ndarray, train: np.ndarray, n: int
) -> pa.Table:
    """``items.parquet``: one row per training item id ``1..K`` (row ``i`` is id ``i + 1``) with its item features.

    Item features are functions of the item (they come from the items file), so each item's value is
    read from one of its rows, a training row where there is one.
    """
    n_items = item_vocab.size - 1
    first = np.full(item_vocab.size, -1, dtype=np.int64)
    rows = np.arange(n)
    order = np.lexsort((rows, ~train))  # training rows first
    codes_sorted = item_code[order]
    uniq, at = np.unique(codes_sorted, return_index=True)
    first[uniq] = order[at]
    pick = first[1:]
    raw = item_vocab.values
    cols: dict[str, pa.Array] = {
        "item_id": pa.array(np.arange(1, n_items + 1), pa.int64()),
        "raw_item_id": pa.array(raw.tolist(), pa.int64() if raw.dtype.kind in "iu" else pa.string()),
    }
    for f in specs:
        if f.tower != "item" or f.name == "item_id":
            continue
        v = codes[f.name]
        typ = {"categorical": pa.int64(), "dense": pa.float32(), "sequence": pa.list_(pa.int32())}[f.kind]
        cols[f.name] = pc.cast(v.take(pa.array(pick)) if isinstance(v, pa.Array) else pa.array(v[pick]), typ)
    return pa.table(cols)
