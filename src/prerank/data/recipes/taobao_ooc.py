"""Out-of-core Taobao UserBehavior preparation (``--engine duckdb``): the dataset of :func:`.taobao.prepare_taobao`
(default features) from logs larger than memory.

It writes the same rows, in the same order, with the same values, vocabularies, schema and item catalogue
as the in-memory path (``tests/data/test_recipes_taobao_ooc.py`` checks that on a synthetic log and on the
shipped sample); only ``meta.json`` gains an ``out_of_core`` entry and its timing differs. What runs where:

1. **Reading**: the CSV (optionally ``.gz``) is streamed block by block (pyarrow, the in-memory path's
   parser and checks) into a staging Parquet file that numbers the events, so that ties in time are broken
   by file order as in :func:`.taobao.aggregate`.
2. **DuckDB** (``SET memory_limit``; operators spill to a temporary folder; one join per query, as DuckDB
   spills one join at a time): the (user, day, item) aggregation, the day split, the training vocabularies
   (ids ``1..K`` by sorted raw value, 0 for anything unseen in training), the request-level folds, the item
   statistics (out-of-fold label sums and counts per (item, fold), joined onto every row), the fold priors,
   the log-scale references (maxima over training rows) and the item catalogue.
3. **Per range of users** (about ``bucket_rows`` rows each, users in increasing order), with the in-memory
   path's own numpy functions: the user and (user, category) statistics (:func:`.common.target_mean` with the
   whole training split's priors), the past-only features (:func:`.taobao.past_only`: behaviour histories,
   counts on earlier days), and the rows appended in their final order to the split's
   :class:`~prerank.data.parquet.SplitWriter`. Each of these reads only the row's own user, so a range of
   whole users gets the values the whole log would give.

Memory is bounded by DuckDB's ``memory_limit`` plus one range of users (numpy, with its histories) plus the
Parquet writer's buffer (one part, 1M rows), plus two things that grow with the requests and items, not rows:
the fold of each training request (one int64 each: the in-memory path draws one random permutation over the
training requests sorted by (user, day), and so does this one, so that both give the same folds) and the
item catalogue (one row per training item). A single user with more rows than ``bucket_rows`` gets a range
of its own.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from prerank.data.parquet import SplitWriter, finish_dataset
from prerank.data.recipes.common import (
    Entries,
    Progress,
    RecipeError,
    balanced_folds,
    fold_priors,
    group_count,
    log_scale,
    no_progress,
    staging_dir,
    target_mean,
)
from prerank.data.recipes.taobao import (
    BEHAVIOURS,
    DAY,
    DAY0,
    N_DAYS,
    TaobaoConfig,
    build_schema,
    check_events,
    check_options,
    csv_options,
    find_raw,
    past_only,
    split_table,
)

SPLITS = ("train", "valid", "test")
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)$", re.IGNORECASE)


@dataclass(frozen=True)
class OutOfCore:
    """Resources of the out-of-core path (the CLI's ``--memory-limit`` and ``--temp-dir``).

    ``memory_limit`` is DuckDB's (e.g. ``"1GB"``), not the process's: add one range of ``bucket_rows`` rows
    and the Parquet writer's buffer. ``temp_dir`` holds the staging file, DuckDB's database and its spill
    files (default: a temporary folder beside ``--out``; about 3.5x the CSV's size at the peak on 50M events).
    """

    memory_limit: str = "1GB"
    temp_dir: Path | None = None
    threads: int | None = None
    bucket_rows: int = 1_000_000


def _check(ooc: OutOfCore) -> None:
    if not _MEMORY.match(ooc.memory_limit.strip()):
        raise RecipeError(f"--memory-limit {ooc.memory_limit!r}: give a size such as 2GB or 500MB")
    if ooc.threads is not None and ooc.threads < 1:
        raise RecipeError(f"threads must be >= 1, got {ooc.threads}")
    if ooc.bucket_rows < 1:
        raise RecipeError(f"bucket_rows must be >= 1, got {ooc.bucket_rows}")
    if ooc.temp_dir is not None and not Path(ooc.temp_dir).is_dir():
        raise RecipeError(f"--temp-dir {ooc.temp_dir} is not a folder")


def _connect(duckdb, work: Path, ooc: OutOfCore):  # noqa: ANN001, ANN202 (duckdb is imported lazily)
    con = duckdb.connect(str(work / "prepare.duckdb"))
    con.execute(f"SET memory_limit = '{ooc.memory_limit.strip()}'")
    con.execute(f"SET temp_directory = '{work / 'spill'}'")
    con.execute("SET preserve_insertion_order = false")  # every read that needs an order says ORDER BY
    if ooc.threads:
        con.execute(f"SET threads = {int(ooc.threads)}")
    return con


def stage_events(path: Path, dest: Path) -> int:
    """Stream the CSV into Parquet ``uid, iid, cid, level (1..4), ts, row`` (``row``: the event's line number)."""
    read, convert = csv_options()
    n = 0
    writer: pq.ParquetWriter | None = None
    try:
        reader = pacsv.open_csv(path, read_options=read, convert_options=convert)
        for batch in reader:
            ev = check_events(pa.Table.from_batches([batch]), path)
            block = pa.table(
                {
                    "uid": ev["user"],
                    "iid": ev["item"],
                    "cid": ev["category"],
                    "level": ev["level"],
                    "ts": ev["ts"],
                    "row": np.arange(n, n + len(ev["ts"]), dtype=np.int64),
                }
            )
            writer = writer or pq.ParquetWriter(dest, block.schema)
            writer.write_table(block)
            n += block.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise RecipeError(f"{path} is not a UserBehavior CSV (user,item,category,behavior,timestamp): {e}") from e
    finally:
        if writer is not None:
            writer.close()
    if n == 0:
        raise RecipeError(f"{path} has no events")
    return n


def _one(con, sql: str, params: list | None = None) -> tuple:  # noqa: ANN001
    return con.execute(sql, params or []).fetchall()[0]


def prepare_taobao_duckdb(
    raw: Path,
    out: Path,
    protocol: str,
    seed: int,
    *,
    config: TaobaoConfig | None = None,
    features: str = "default",
    out_of_core: OutOfCore | None = None,
    progress: Progress = no_progress,
) -> Path:
    """Prepare Taobao UserBehavior out of core (see the module docstring); returns ``out``."""
    cfg = config or TaobaoConfig()
    ooc = out_of_core or OutOfCore()
    check_options(cfg, protocol, features)
    if features != "default":
        raise RecipeError("--engine duckdb builds the default Taobao features; --features wide needs --engine memory")
    _check(ooc)
    try:
        import duckdb
    except ImportError as e:  # a dependency, but say what is missing if an install lacks it
        raise RecipeError("--engine duckdb needs the duckdb package (pip install duckdb)") from e
    t_start = time.perf_counter()
    path = find_raw(raw)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".prerank-duckdb-", dir=ooc.temp_dir or Path(out).parent))
    try:
        return _prepare(duckdb, path, Path(out), protocol, seed, cfg, ooc, work, t_start, progress)
    except duckdb.Error as e:  # out of memory past the limit, temp folder full, ...
        raise RecipeError(
            f"DuckDB failed preparing {path}: {' '.join(str(e).split())} "
            f"(--memory-limit {ooc.memory_limit}; temporary files in {work.parent})"
        ) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare(
    duckdb,  # noqa: ANN001
    path: Path,
    out: Path,
    protocol: str,
    seed: int,
    cfg: TaobaoConfig,
    ooc: OutOfCore,
    work: Path,
    t_start: float,
    progress: Progress,
) -> Path:
    steps = 5
    progress(f"reading {path.name} (streaming to Parquet)", 0, steps)
    n_events = stage_events(path, work / "events.parquet")
    con = _connect(duckdb, work, ooc)
    first_valid = N_DAYS - cfg.test_days - cfg.valid_days

    progress("aggregating (user, day, item) rows (DuckDB)", 1, steps)
    con.execute(
        f"""CREATE VIEW ev AS SELECT *, (ts - {DAY0}) // {DAY} AS day FROM read_parquet('{work / "events.parquet"}')
        WHERE ts >= {DAY0} AND ts < {DAY0 + N_DAYS * DAY}"""
    )
    # the category of the (user, day, item)'s first event: earliest time, then file order (as aggregate())
    con.execute(
        f"""CREATE TABLE rows AS SELECT uid, day, iid,
            arg_min(cid, (ts - {DAY0}) * 1099511627776 + row) AS cid, max(level) AS level, min(ts) AS ts,
            CASE WHEN day >= {N_DAYS - cfg.test_days} THEN 2 WHEN day >= {first_valid} THEN 1 ELSE 0 END AS split
        FROM ev GROUP BY uid, day, iid"""
    )
    n_train = _one(con, "SELECT count(*) FROM rows WHERE split = 0")[0]
    if n_train == 0:
        raise RecipeError(f"{path}: no events on the training days 2017-11-25 + 0..{first_valid - 1}")

    progress("vocabularies and statistics (out-of-fold for training rows, DuckDB)", 2, steps)
    for v, col in (("vu", "uid"), ("vi", "iid"), ("vc", "cid")):
        con.execute(
            f"CREATE TABLE {v} AS SELECT {col}, row_number() OVER (ORDER BY {col}) AS code "
            f"FROM (SELECT DISTINCT {col} FROM rows WHERE split = 0)"
        )
    # folds by request (user, day): the in-memory path's permutation over the sorted training requests
    n_requests = _one(con, "SELECT count(*) FROM (SELECT DISTINCT uid, day FROM rows WHERE split = 0)")[0]
    folds = balanced_folds(n_requests, cfg.n_folds, np.random.default_rng(seed))
    fold_of = pa.table({"rank": np.arange(n_requests), "fold": folds})
    con.register("fold_of", fold_of)
    con.execute(
        """CREATE TABLE req AS SELECT q.uid, q.day, f.fold FROM (SELECT uid, day,
        row_number() OVER (ORDER BY uid, day) - 1 AS rank FROM (SELECT DISTINCT uid, day FROM rows WHERE split = 0)) q
        JOIN fold_of f ON f.rank = q.rank"""
    )
    con.unregister("fold_of")
    del fold_of, folds
    con.execute(
        """CREATE TABLE tr AS SELECT r.uid, r.iid, r.cid, r.day, (r.level >= 2)::INTEGER AS y, q.fold
        FROM rows r JOIN req q ON q.uid = r.uid AND q.day = r.day WHERE r.split = 0"""
    )
    y_f = np.zeros(cfg.n_folds)
    n_f = np.zeros(cfg.n_folds)
    for fold, y, n in con.execute("SELECT fold, sum(y)::BIGINT, count(*) FROM tr GROUP BY fold").fetchall():
        y_f[fold], n_f[fold] = y, n
    priors = fold_priors(y_f, n_f)  # the training split's, as common.target_mean computes them
    # references of log_scale: the largest value over training rows. An earlier-day count is largest on its
    # group's last training day; (user, day, item) is unique, so for (user, item) that is the group's size - 1
    ref = {"user_count": "max(n) FROM (SELECT count(*) AS n FROM tr GROUP BY uid)"}
    ref["item_count"] = "max(n) FROM (SELECT count(*) AS n FROM tr GROUP BY iid)"
    ref["user_item_before"] = "max(n) - 1 FROM (SELECT count(*) AS n FROM tr GROUP BY uid, iid)"
    by_uc = "FROM uc GROUP BY uid, cid"
    ref["user_cat_before"] = f"max(n - n_last) FROM (SELECT sum(n) AS n, arg_max(n, day) AS n_last {by_uc})"
    ref["user_cat_pos_before"] = f"max(p - p_last) FROM (SELECT sum(p) AS p, arg_max(p, day) AS p_last {by_uc})"
    con.execute("CREATE TABLE uc AS SELECT uid, cid, day, count(*) AS n, sum(y) AS p FROM tr GROUP BY ALL")
    ref = {k: float(_one(con, f"SELECT {q}")[0]) for k, q in ref.items()}
    # item statistics (items span users, so DuckDB joins them on): per (item, fold) the out-of-fold sums, and
    # under fold -1 (valid and test rows) the whole training split's
    con.execute(
        f"""CREATE TABLE istat AS WITH f AS (SELECT iid, fold, sum(y)::BIGINT AS s, count(*) AS c FROM tr GROUP BY ALL),
        g AS (SELECT iid, sum(s)::BIGINT AS s, sum(c)::BIGINT AS c FROM f GROUP BY iid)
        SELECT g.iid, k.fold, vi.code, g.s - coalesce(f.s, 0) AS s, g.c - coalesce(f.c, 0) AS c, g.c AS n
        FROM g JOIN vi ON vi.iid = g.iid CROSS JOIN range(-1, {cfg.n_folds}) k(fold)
        LEFT JOIN f ON f.iid = g.iid AND f.fold = k.fold"""
    )
    con.execute("DROP TABLE tr; DROP TABLE uc")
    con.execute(
        """CREATE TABLE base AS SELECT r.*, coalesce(vu.code, 0) AS u_code, coalesce(vc.code, 0) AS c_code,
            coalesce(q.fold, -1) AS fold
        FROM rows r LEFT JOIN vu ON vu.uid = r.uid LEFT JOIN vc ON vc.cid = r.cid
        LEFT JOIN req q ON r.split = 0 AND q.uid = r.uid AND q.day = r.day"""
    )
    con.execute(
        """CREATE TABLE feat AS SELECT b.*, coalesce(i.code, 0) AS i_code, coalesce(i.s, 0) AS i_s,
            coalesce(i.c, 0) AS i_c, coalesce(i.n, 0) AS i_n
        FROM base b LEFT JOIN istat i ON i.iid = b.iid AND i.fold = b.fold ORDER BY b.uid"""
    )
    con.execute("DROP TABLE base")
    sizes = {
        name: _one(con, f"SELECT count(*) FROM {v}")[0] + 1
        for name, v in (("user_id", "vu"), ("item_id", "vi"), ("category_id", "vc"))
    }
    schema = build_schema(sizes, cfg.hist_len)
    # an item's category: that of its first training row in (user, day) order, as in memory
    cat = con.execute(
        """SELECT i.code, i.iid, c.cat, i.s, i.c FROM istat i
        JOIN (SELECT iid, arg_min(c_code, (uid, day)) AS cat FROM feat WHERE split = 0 GROUP BY iid) c ON c.iid = i.iid
        WHERE i.fold = -1 ORDER BY i.code"""
    ).fetchnumpy()
    m = cfg.smoothing
    items = pa.table(
        {
            "item_id": pa.array(cat["code"], pa.int64()),
            "raw_item_id": pa.array(cat["iid"], pa.int64()),
            "category_id": pa.array(cat["cat"], pa.int64()),
            "item_mean_label": pa.array(_smoothed(cat["s"], cat["c"], m, priors[1]), pa.float32()),
            "item_count": pa.array(log_scale(cat["c"], ref["item_count"]), pa.float32()),
        }
    )
    del cat
    buckets = con.execute(
        f"""SELECT min(uid), max(uid) FROM (SELECT uid, (sum(n) OVER (ORDER BY uid) - n) // {ooc.bucket_rows} AS b
        FROM (SELECT uid, count(*) AS n FROM rows GROUP BY uid)) GROUP BY b ORDER BY 1"""
    ).fetchall()

    progress(f"behaviour histories and writing Parquet ({len(buckets)} ranges of users)", 3, steps)
    with staging_dir(out) as tmp:
        writers = [SplitWriter(tmp, name) for name in SPLITS]
        positives = [0, 0, 0]
        for lo, hi in buckets:
            query = "SELECT * FROM feat WHERE uid BETWEEN ? AND ? ORDER BY uid, day, iid"
            b = con.execute(query, [lo, hi]).fetchnumpy()
            r = {"user": b["uid"], "day": b["day"], "item": b["iid"], "category": b["cid"], "ts": b["ts"]}
            r["level"] = b["level"].astype(np.int8)
            label = (r["level"] >= 2).astype(np.float32)
            split = b["split"].astype(np.int8)
            codes = {"user_id": b["u_code"], "item_id": b["i_code"], "category_id": b["c_code"]}
            dense = _user_statistics(b, split, label, cfg, priors, ref, sizes["category_id"])
            hist, before = past_only(r, split, label, b["i_code"], b["c_code"], cfg.hist_len)
            for s, writer in enumerate(writers):
                p = np.nonzero(split == s)[0]
                if not len(p):
                    continue
                prior = priors[0][b["fold"][p]] if s == 0 else priors[1]
                values = {k: v[s] for k, v in dense.items()} | {
                    "item_mean_label": _smoothed(b["i_s"][p], b["i_c"][p], m, prior),
                    "item_count": log_scale(b["i_n"][p], ref["item_count"]),
                }
                values |= {k: log_scale(v[s], ref[k]) for k, v in before.items()}
                writer.write(split_table(r, p, label, schema, {k: v[s] for k, v in hist.items()}, values, codes))
                positives[s] += int(label[p].sum())
        for w in writers:
            w.close()
        progress("counts and metadata", 4, steps)
        rows = {name: w.rows for name, w in zip(SPLITS, writers, strict=True)}
        meta = _meta(con, path, protocol, seed, cfg, ooc, n_events, sizes, rows, positives)
        meta["prepare_seconds"] = round(time.perf_counter() - t_start, 2)
        con.close()
        finish_dataset(tmp, schema, rows, items=items, meta=meta)
    progress("done", steps, steps)
    return out


def _user_statistics(
    b: dict[str, np.ndarray],
    split: np.ndarray,
    label: np.ndarray,
    cfg: TaobaoConfig,
    priors: tuple[np.ndarray, float],
    ref: dict[str, float],
    n_categories: int,
) -> dict[str, list[np.ndarray]]:
    """User and (user, category) statistics of one range of whole users, per split, with the in-memory path's
    functions: every row of a user's groups is in the range, and the priors are the whole training split's."""
    parts = [np.nonzero(split == s)[0] for s in range(3)]
    tr = parts[0]
    fold = b["fold"][tr]
    keys = {"user": b["u_code"], "user_cat": b["u_code"] * n_categories + b["c_code"]}
    out = {}
    for name, feature in (("user", "user_mean_label"), ("user_cat", "user_cat_rate")):
        ent = [Entries.single(keys[name][p]) for p in parts]
        train, evals = target_mean(
            ent[0], label[tr], fold, ent[1:], n_folds=cfg.n_folds, smoothing=cfg.smoothing, priors=priors
        )
        out[feature] = [train, *evals]
    ent = [Entries.single(b["u_code"][p]) for p in parts]
    out["user_count"] = [log_scale(c, ref["user_count"]) for c in group_count(ent[0], ent)]
    return out


def _smoothed(s: np.ndarray, c: np.ndarray, m: float, prior: np.ndarray | float) -> np.ndarray:
    """``(s + m * prior) / (c + m)`` in float64 (:func:`.common.target_mean`'s formula), as float32."""
    s = np.asarray(s, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    return ((s + m * prior) / (c + m)).astype(np.float32)


def _meta(con, path, protocol, seed, cfg, ooc, n_events, sizes, rows, positives) -> dict:  # noqa: ANN001
    """``meta.json`` as the in-memory path writes it, plus ``out_of_core``."""
    first_valid = N_DAYS - cfg.test_days - cfg.valid_days
    by_event = dict(con.execute("SELECT level, count(*) FROM ev GROUP BY level").fetchall())
    by_row = dict(con.execute("SELECT level, count(*) FROM rows GROUP BY level").fetchall())
    # DISTINCT as a grouping (spills to disk) rather than count(DISTINCT ...) (a hash set held in memory)
    n_rows, n_req, n_users, n_items = (
        _one(con, f"SELECT count(*) FROM (SELECT DISTINCT {cols} FROM rows)")[0]
        for cols in ("uid, day, iid", "uid, day", "uid", "iid")
    )
    in_window = sum(by_event.values())
    return {
        "recipe": "taobao-user-behavior",
        "protocol": protocol,
        "features": "default",
        "engine": "duckdb",
        "out_of_core": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(ooc).items()},
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
            "dropped_events_outside_2017-11-25..2017-12-03_china_time": n_events - in_window,
            "events_by_behaviour": {b: int(by_event.get(i + 1, 0)) for i, b in enumerate(BEHAVIOURS)},
            "rows": n_rows,
            "requests": n_req,
            "users": n_users,
            "items": n_items,
            "train_users": sizes["user_id"] - 1,
            "train_items": sizes["item_id"] - 1,
            "train_categories": sizes["category_id"] - 1,
            "rows_by_label_level": {b: int(by_row.get(i + 1, 0)) for i, b in enumerate(BEHAVIOURS)},
        },
        "label_rate": {
            # common.label_rate: numpy's float32 mean of the labels (exact sum below 2**24 positives)
            name: float(np.float32(positives[s] / rows[name])) if rows[name] else float("nan")
            for s, name in enumerate(SPLITS)
        },
        "request_id": "user_id * 100 + day (day 0 = 2017-11-25, China time)",
    }
