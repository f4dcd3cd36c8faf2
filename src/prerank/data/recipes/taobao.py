"""Taobao UserBehavior recipe (Tianchi dataset 649), protocol ``temporal``.

Raw file: ``UserBehavior.csv`` or any ``UserBehavior*.csv[.gz]`` (no header; columns user_id,
item_id, category_id, behavior_type in pv | fav | cart | buy, timestamp in unix seconds).

Rows and labels
    One row per (user, day, item); a request is (user, day) with days counted in China time
    (UTC+8) from 2017-11-25 (day 0) to 2017-12-03 (day 8). Events outside that window (a few
    timestamps in the original are out of range) are dropped and counted in ``meta.json``.
    ``label_level`` = the strongest behaviour of the row (buy 4 > cart 3 > fav 2 > pv 1);
    ``label`` = 1 if the row has any fav, cart or buy. ``request_id = user_id * 100 + day`` and
    ``ts`` = the row's first event.

Split (by day, global): days 0-6 train, day 7 (2017-12-02) valid, day 8 (2017-12-03) test.

Memory: the CSV is parsed into memory (about 40 bytes per event) and every feature is built in
numpy; the 814-user sample is small, the full 100M-event file needs several GB. For logs larger
than memory, :mod:`.taobao_ooc` (``--engine duckdb``) writes the same dataset out of core.

Features (FSCD cost types as in :func:`.common.fscd_cost`: I/II simple user/item ids, III complex
per-request user features, IV complex per-candidate features):

=====================  =====  =====  =================================================================
name                   tower  type   meaning
=====================  =====  =====  =================================================================
user_id                user   I      user id (train vocabulary)
user_mean_label        user   III    smoothed positive rate of the user's training rows (out-of-fold)
user_count             user   III    log-scaled number of the user's training rows
hist_item_id           user   III    the user's last ``hist_len`` (50) items before the request's day
hist_category_id       user   III    their categories
item_id                item   II     item id (train vocabulary)
category_id            item   II     item category (train vocabulary)
item_mean_label        item   IV     smoothed positive rate of the item's training rows (out-of-fold)
item_count             item   IV     log-scaled number of the item's training rows
user_cat_rate          cross  IV     smoothed positive rate of the user's training rows in the item's
                                     category (out-of-fold)
user_cat_before        cross  IV     log-scaled number of the user's rows in the item's category on
                                     earlier days (aggregation over the behaviour log)
user_cat_pos_before    cross  IV     the same, counting only rows with fav/cart/buy
user_item_before       cross  IV     log-scaled number of earlier days the user interacted with the item
=====================  =====  =====  =================================================================

Out-of-fold folds are drawn per request (user, day), not per row: test requests are days never
seen in training, and a row's own session labels (a user who carts several items that day) are
far more telling than anything a test row can see, so row-level folds would let training rows
learn to over-trust their statistics.

"Earlier" means strictly before the request's day (not merely before the row's first event), so
every row of a request shares one user state, and nothing of the day being predicted leaks into
its features. Behaviour-log features of a row in split ``s`` read events of splits before ``s``
(training rows: earlier training days), so no test event ever enters a feature.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from prerank.data.parquet import write_dataset
from prerank.data.recipes.common import (
    Entries,
    Progress,
    RecipeError,
    SplitStats,
    Vocab,
    balanced_folds,
    check_feature_set,
    count_before,
    fscd_cost,
    history,
    label_rate,
    log_scale,
    no_progress,
    staging_dir,
)
from prerank.data.recipes.taobao_wide import wide_features
from prerank.schema import FeatureSpec, Schema, Tower

PROTOCOLS: tuple[str, ...] = ("temporal",)
#: Graded label of each behaviour (RankTower's hard-label aggregation needs the order).
BEHAVIOURS: tuple[str, ...] = ("pv", "fav", "cart", "buy")
#: 2017-11-25 00:00 in China time (UTC+8) as a unix timestamp; day ``d`` starts at ``DAY0 + d * DAY``.
DAY0 = 1_511_539_200
DAY = 86_400
N_DAYS = 9
COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]


@dataclass(frozen=True)
class TaobaoConfig:
    """Knobs of the Taobao recipe (defaults are the documented protocol)."""

    valid_days: int = 1
    test_days: int = 1
    n_folds: int = 5
    smoothing: float = 10.0
    hist_len: int = 50


def find_raw(raw: Path) -> Path:
    """The UserBehavior CSV: ``raw`` itself, or the one ``UserBehavior*.csv[.gz]`` inside the folder ``raw``."""
    raw = Path(raw)
    if raw.is_file():
        return raw
    if not raw.is_dir():
        raise RecipeError(f"raw data path {raw} does not exist")
    found = sorted(p for p in raw.iterdir() if p.name.startswith("UserBehavior") and p.name.endswith((".csv", ".gz")))
    if not found:
        raise RecipeError(f"no UserBehavior.csv (or UserBehavior*.csv.gz) in {raw}")
    if len(found) > 1:
        raise RecipeError(f"several UserBehavior files in {raw}: {[p.name for p in found]}; pass one file as --raw")
    return found[0]


def read_events(path: Path) -> dict[str, np.ndarray]:
    """Parse the CSV into ``user, item, category, level (1..4), ts`` arrays."""
    read, convert = csv_options()
    try:
        t = pacsv.read_csv(path, read_options=read, convert_options=convert)
    except (pa.ArrowInvalid, OSError) as e:
        raise RecipeError(f"{path} is not a UserBehavior CSV (user,item,category,behavior,timestamp): {e}") from e
    return check_events(t, path)


def csv_options() -> tuple[pacsv.ReadOptions, pacsv.ConvertOptions]:
    """How the headerless UserBehavior CSV is parsed (ids and timestamps int64, behaviour a string)."""
    return (
        pacsv.ReadOptions(column_names=COLUMNS, block_size=1 << 24),
        pacsv.ConvertOptions(
            column_types={c: pa.int64() for c in COLUMNS if c != "behavior_type"} | {"behavior_type": pa.string()}
        ),
    )


def check_events(t: pa.Table, path: Path) -> dict[str, np.ndarray]:
    """Parsed CSV rows -> ``user, item, category, level (1..4), ts`` arrays; :class:`RecipeError` on a bad value."""
    level = pc.index_in(t.column("behavior_type"), value_set=pa.array(BEHAVIOURS))
    if level.null_count:
        bad = pc.unique(pc.filter(t.column("behavior_type"), pc.is_null(level))).to_pylist()[:5]
        raise RecipeError(f"{path}: behavior_type must be one of {BEHAVIOURS}, found {bad}")
    for c in COLUMNS:
        if t.column(c).null_count:
            raise RecipeError(f"{path}: column {c!r} has {t.column(c).null_count} empty values")
    return {
        "user": t.column("user_id").to_numpy(),
        "item": t.column("item_id").to_numpy(),
        "category": t.column("category_id").to_numpy(),
        "level": level.to_numpy().astype(np.int8) + 1,
        "ts": t.column("timestamp").to_numpy(),
    }


def aggregate(ev: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Events (in the day window) -> one row per (user, day, item): max level, first ts, first event's category."""
    order = np.lexsort((ev["ts"], ev["item"], ev["day"], ev["user"]))
    s = {k: v[order] for k, v in ev.items()}
    new = np.ones(len(order), dtype=bool)
    new[1:] = (np.diff(s["user"]) != 0) | (np.diff(s["day"]) != 0) | (np.diff(s["item"]) != 0)
    starts = np.nonzero(new)[0]
    rows = {k: s[k][starts] for k in ("user", "day", "item", "category", "ts")}
    rows["level"] = np.maximum.reduceat(s["level"], starts) if len(starts) else s["level"]
    return rows


def day_window(ev: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The events of days 0..8 (China time), with their ``day``; and the mask of the kept events."""
    day = np.floor_divide(ev["ts"] - DAY0, DAY)
    in_window = (day >= 0) & (day < N_DAYS)
    return {k: v[in_window] for k, v in ev.items()} | {"day": day[in_window]}, in_window


def label_and_split(
    r: dict[str, np.ndarray], cfg: TaobaoConfig, path: Path
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Label (any fav/cart/buy), split by day (0 train, 1 valid, 2 test) and the row indices of each split."""
    label = (r["level"] >= 2).astype(np.float32)
    first_valid = N_DAYS - cfg.test_days - cfg.valid_days
    split = np.where(r["day"] >= N_DAYS - cfg.test_days, 2, np.where(r["day"] >= first_valid, 1, 0)).astype(np.int8)
    parts = [np.nonzero(split == s)[0] for s in range(3)]
    if len(parts[0]) == 0:
        raise RecipeError(f"{path}: no events on the training days 2017-11-25 + 0..{first_valid - 1}")
    return label, split, parts


def encode_rows(
    r: dict[str, np.ndarray], label: np.ndarray, parts: list[np.ndarray], cfg: TaobaoConfig, seed: int
) -> tuple[dict[str, Vocab], tuple[np.ndarray, np.ndarray, np.ndarray], SplitStats]:
    """Vocabularies fitted on the training rows, the user/item/category codes of every row, and the training
    split's statistics with out-of-fold folds drawn per request (user, day) from ``seed``."""
    tr = parts[0]
    vocabs = {"user_id": Vocab.fit(r["user"][tr]), "item_id": Vocab.fit(r["item"][tr])}
    vocabs["category_id"] = Vocab.fit(r["category"][tr])
    codes = tuple(vocabs[k].encode(r[k.removesuffix("_id")]) for k in ("user_id", "item_id", "category_id"))
    catalogue = np.arange(1, vocabs["item_id"].size)
    rng = np.random.default_rng(seed)
    folds = balanced_folds(len(tr), cfg.n_folds, rng, groups=r["user"][tr] * 100 + r["day"][tr])  # by request
    stats = SplitStats(parts, label[tr], folds, cfg.n_folds, cfg.smoothing, Entries.single(catalogue))
    return vocabs, codes, stats  # type: ignore[return-value]


def past_only(
    r: dict[str, np.ndarray],
    split: np.ndarray,
    label: np.ndarray,
    i_code: np.ndarray,
    c_code: np.ndarray,
    hist_len: int,
) -> tuple[dict[str, list[pa.Array]], dict[str, list[np.ndarray]]]:
    """Behaviour histories and earlier-day counts of every row, per split (train, valid, test).

    ``r`` holds aggregated rows in :func:`aggregate`'s order (events of equal time keep it). Every value
    reads only the row's own user, so any set of whole users gives its rows the same values as the whole
    log (the out-of-core path relies on that). Returns the ``list<int32>`` histories and the raw counts
    (before :func:`.common.log_scale`).
    """
    parts = [np.nonzero(split == s)[0] for s in range(3)]
    day_start = DAY0 + r["day"] * DAY
    user_cat = r["user"] * (int(r["category"].max(initial=0)) + 1) + r["category"]
    user_item = r["user"] * (int(r["item"].max(initial=0)) + 1) + r["item"]
    hist: dict[str, list[pa.Array]] = {"hist_item_id": [], "hist_category_id": []}
    before: dict[str, list[np.ndarray]] = {"user_cat_before": [], "user_cat_pos_before": [], "user_item_before": []}
    for s, p in enumerate(parts):
        allowed = split <= max(s - 1, 0)  # earlier splits only (training rows: earlier training days)
        q_time = day_start[p]
        for name, code in (("hist_item_id", i_code), ("hist_category_id", c_code)):
            e = allowed & (code > 0)
            hist[name].append(history(r["user"][p], q_time, r["user"][e], r["ts"][e], code[e], hist_len))
        pos = allowed & (label == 1)
        before["user_cat_before"].append(count_before(user_cat[p], q_time, user_cat[allowed], r["ts"][allowed]))
        before["user_cat_pos_before"].append(count_before(user_cat[p], q_time, user_cat[pos], r["ts"][pos]))
        before["user_item_before"].append(count_before(user_item[p], q_time, user_item[allowed], r["ts"][allowed]))
    return hist, before


def split_table(
    r: dict[str, np.ndarray],
    p: np.ndarray,
    label: np.ndarray,
    schema: Schema,
    seqs: dict[str, pa.Array],
    dense: dict[str, np.ndarray],
    codes: dict[str, np.ndarray],
) -> pa.Table:
    """The rows ``p`` of one split as the table written to Parquet, sorted by user, day, first event time.

    ``seqs`` and ``dense`` hold the split's values (aligned with ``p``), ``codes`` the ids of all rows.
    """
    cols: dict[str, pa.Array] = {
        "request_id": pa.array(r["user"][p] * 100 + r["day"][p], pa.int64()),
        "label": pa.array(label[p], pa.float32()),
        "label_level": pa.array(r["level"][p], pa.int8()),
        "ts": pa.array(r["ts"][p], pa.int64()),
    }
    for f in schema.features:
        if f.kind == "sequence":
            cols[f.name] = seqs[f.name]
        elif f.kind == "dense":
            cols[f.name] = pa.array(dense[f.name], pa.float32())
        else:
            cols[f.name] = pa.array(codes[f.name][p], pa.int64())
    order = np.lexsort((r["ts"][p], r["day"][p], r["user"][p]))
    return pa.table(cols).take(pa.array(order))


def build_schema(vocab: dict[str, int], hist_len: int, wide: list[FeatureSpec] | None = None) -> Schema:
    """The Taobao schema; see the module docstring for every feature (``wide``: extra fields,
    :mod:`.taobao_wide`, placed after the default fields of their tower)."""

    def cat(name: str, tower: Tower, description: str) -> FeatureSpec:
        cost = fscd_cost(tower, complex_=False)
        return FeatureSpec(
            name, tower, "categorical", vocab_size=max(vocab[name], 2), cost_type=cost, description=description
        )

    def dense(name: str, tower: Tower, description: str) -> FeatureSpec:
        return FeatureSpec(name, tower, "dense", cost_type=fscd_cost(tower, complex_=True), description=description)

    def seq(name: str, shares: str, description: str) -> FeatureSpec:
        return FeatureSpec(
            name, "user", "sequence", max_len=hist_len, shares=shares, cost_type=fscd_cost("user", complex_=True),
            n_values=hist_len, description=description,
        )  # fmt: skip

    features = (
        cat("user_id", "user", "user id, vocabulary fitted on training rows"),
        dense("user_mean_label", "user", "smoothed positive rate of the user's training rows (out-of-fold)"),
        dense("user_count", "user", "log1p(number of the user's training rows) / log1p(max)"),
        seq("hist_item_id", "item_id", f"the user's last {hist_len} items on days before the request's day"),
        seq("hist_category_id", "category_id", "categories of the user's items on days before the request's day"),
        cat("item_id", "item", "item id, vocabulary fitted on training rows"),
        cat("category_id", "item", "item category, vocabulary fitted on training rows"),
        dense("item_mean_label", "item", "smoothed positive rate of the item's training rows (out-of-fold)"),
        dense("item_count", "item", "log1p(number of the item's training rows) / log1p(max)"),
        dense("user_cat_rate", "cross", "smoothed positive rate of the user's training rows in the category (OOF)"),
        dense("user_cat_before", "cross", "log-scaled count of the user's rows in the category on earlier days"),
        dense("user_cat_pos_before", "cross", "as user_cat_before, counting fav/cart/buy rows only"),
        dense("user_item_before", "cross", "log-scaled number of earlier days the user saw the item"),
    )  # fmt: skip
    wide = wide or []
    order = ("user", "context", "item", "cross")
    features = tuple(f for t in order for f in (*features, *wide) if f.tower == t)  # default fields first per tower
    return Schema(
        features=features,
        has_label_level=True,
        name="taobao-user-behavior-temporal" + ("-wide" if wide else ""),
        extra={
            "recipe": "taobao-user-behavior",
            "protocol": "temporal",
            "label": "any of fav/cart/buy; label_level buy 4 > cart 3 > fav 2 > pv 1",
        }
        | ({"features": "wide"} if wide else {}),
    )


def check_options(cfg: TaobaoConfig, protocol: str, features: str) -> None:
    """:class:`RecipeError` for an unknown protocol or feature set, or split days that leave no training day."""
    check_feature_set(features)
    if protocol not in PROTOCOLS:
        raise RecipeError(f"recipe 'taobao-user-behavior' has no protocol {protocol!r}; choose one of {PROTOCOLS}")
    if cfg.valid_days < 1 or cfg.test_days < 1 or cfg.valid_days + cfg.test_days >= N_DAYS:
        raise RecipeError(f"valid_days and test_days must be >= 1 and leave training days of the {N_DAYS}")


def prepare_taobao(
    raw: Path,
    out: Path,
    protocol: str,
    seed: int,
    *,
    config: TaobaoConfig | None = None,
    features: str = "default",
    progress: Progress = no_progress,
) -> Path:
    """Prepare Taobao UserBehavior from ``raw`` into the dataset folder ``out``; returns ``out``.

    ``features="wide"`` adds the fields of :mod:`.taobao_wide`."""
    cfg = config or TaobaoConfig()
    check_options(cfg, protocol, features)
    t_start = time.perf_counter()
    steps = 5
    path = find_raw(raw)
    progress(f"reading {path.name}", 0, steps)
    ev = read_events(path)
    n_events = len(ev["ts"])
    ev, in_window = day_window(ev)

    progress("aggregating (user, day, item) rows", 1, steps)
    r = aggregate(ev)
    label, split, parts = label_and_split(r, cfg, path)
    first_valid = N_DAYS - cfg.test_days - cfg.valid_days

    progress("vocabularies and statistics (out-of-fold for training rows)", 2, steps)
    tr = parts[0]
    vocabs, (u_code, i_code, c_code), stats = encode_rows(r, label, parts, cfg, seed)
    catalogue = np.arange(1, vocabs["item_id"].size)
    feats: dict[str, list[np.ndarray]] = {
        "user_mean_label": stats.mean(lambda p: Entries.single(u_code[p])),
        "user_count": stats.count(lambda p: Entries.single(u_code[p])),
        "item_mean_label": stats.mean(lambda p: Entries.single(i_code[p]), catalogue=True),
        "item_count": stats.count(lambda p: Entries.single(i_code[p]), catalogue=True),
        "user_cat_rate": stats.mean(lambda p: Entries.single(u_code[p] * vocabs["category_id"].size + c_code[p])),
    }

    progress("behaviour histories and log aggregates", 3, steps)
    day_start = DAY0 + r["day"] * DAY
    hist, before = past_only(r, split, label, i_code, c_code, cfg.hist_len)
    for name, values in before.items():
        reference = float(values[0].max(initial=0))  # scale fitted on training rows
        feats[name] = [log_scale(v, reference) for v in values]

    codes = {"user_id": u_code, "item_id": i_code, "category_id": c_code}
    first_row = np.unique(i_code[tr], return_index=True)[1]  # rows sorted by user, day: an item's first train row
    catalogue_category = c_code[tr][first_row]
    wide, catalogue_extra = [], {}
    if features == "wide":
        progress("wide feature set (past-only and out-of-fold statistics)", 3, steps)
        sizes = {k: v.size for k, v in vocabs.items()}
        wide, extra, catalogue_extra = wide_features(
            r, label, split, codes, sizes, stats, day_start, hist, cfg.hist_len, cfg.smoothing, catalogue_category
        )
        sequences = {f.name for f in wide if f.kind == "sequence"}
        hist |= {k: v for k, v in extra.items() if k in sequences}
        feats |= {k: v for k, v in extra.items() if k not in sequences}

    progress("writing Parquet", 4, steps)
    schema = build_schema({k: v.size for k, v in vocabs.items()}, cfg.hist_len, wide)
    tables = {}
    for s, split_name in enumerate(("train", "valid", "test")):
        seqs = {k: v[s] for k, v in hist.items()}
        tables[split_name] = split_table(r, parts[s], label, schema, seqs, {k: v[s] for k, v in feats.items()}, codes)
    items = pa.table(
        {
            "item_id": pa.array(catalogue, pa.int64()),
            "raw_item_id": pa.array(vocabs["item_id"].values, pa.int64()),
            "category_id": pa.array(catalogue_category, pa.int64()),
            "item_mean_label": pa.array(feats["item_mean_label"][3], pa.float32()),
            "item_count": pa.array(feats["item_count"][3], pa.float32()),
        }
        | {k: pa.array(v, pa.float32()) for k, v in catalogue_extra.items()}
    )
    meta = {
        "recipe": "taobao-user-behavior",
        "protocol": protocol,
        "features": features,
        "engine": "memory",
        "seed": seed,
        "config": cfg.__dict__,
        "raw_files": [str(path)],
        "split_days": {
            "train": f"day 0..{first_valid - 1} (2017-11-25 ..)",
            "valid": f"day {first_valid}..{N_DAYS - cfg.test_days - 1}",
            "test": f"day {N_DAYS - cfg.test_days}..{N_DAYS - 1} (.. 2017-12-03)",
        },
        "counts": {
            "raw_events": n_events,
            "dropped_events_outside_2017-11-25..2017-12-03_china_time": int((~in_window).sum()),
            "events_by_behaviour": {b: int((ev["level"] == i + 1).sum()) for i, b in enumerate(BEHAVIOURS)},
            "rows": len(label),
            "requests": int(len(np.unique(r["user"] * 100 + r["day"]))),
            "users": int(len(np.unique(r["user"]))),
            "items": int(len(np.unique(r["item"]))),
            "train_users": vocabs["user_id"].size - 1,
            "train_items": vocabs["item_id"].size - 1,
            "train_categories": vocabs["category_id"].size - 1,
            "rows_by_label_level": {b: int((r["level"] == i + 1).sum()) for i, b in enumerate(BEHAVIOURS)},
        },
        "label_rate": {k: label_rate(label[p]) for k, p in zip(("train", "valid", "test"), parts, strict=True)},
        "request_id": "user_id * 100 + day (day 0 = 2017-11-25, China time)",
    }
    with staging_dir(out) as tmp:
        meta["prepare_seconds"] = round(time.perf_counter() - t_start, 2)
        write_dataset(tmp, schema, tables, items=items, meta=meta)
    progress("done", steps, steps)
    return Path(out)
