"""The cascade builder: simulate the stages of a cascade ranking system from an impression log.

DESIGN.md "The cascade"; RankTower (ranktower.txt) Sec. 3.1 "Full-Stage Sampling" and Sec. 4.1.1.
Public logs hold impressions only. For every request of every split the builder writes

* ``impression`` rows: the logged rows with their labels (Sec. 3.1.1);
* ``rank_candidate`` rows: unexposed items the ranking teacher ranks highest -- the hard negatives that
  "have advanced to the ranking stage" (Sec. 3.1.2);
* ``prerank_candidate`` rows: the next unexposed items in the teacher's order -- easy negatives
  "filtered out before reaching the ranking stage" (Sec. 3.1.2);
* ``random`` rows: items drawn from the whole catalogue ``items.parquet`` (Sec. 3.1.3), without
  replacement and apart from the request's impressions and retrieved items.

**The simulated ranker agrees with the log** (``rank_cut="below_impressions"``, the default): in a
real cascade the ranker exposed its top items, so every item it ranked but did not show scored below
the shown ones. Rank and pre-rank candidates are therefore cut from the retrieved items the teacher
scores below the request's lowest-scored impression; retrieved items it scores higher are dropped
(counted as ``retrieved_above_impressions``), since keeping them as unlabelled negatives would make the
teacher (the soft label) contradict RankTower's hard-label order impression > rank candidate >
pre-rank candidate. ``rank_cut="teacher_top"`` keeps the teacher's top retrieved items regardless.

**Popularity matched to impressions** (``popularity="matched"``, the default): random items, and the
retrieved items that co-occurrence cannot supply, are drawn in proportion to the item's impressions in
the request's own split; and the retrieved items are chosen from a pool of ``4 x retrieve`` so that their
training popularity (log2 buckets of training impressions) follows the split's impressions'
(:func:`match_popularity`), since co-occurrence favours the head. So item popularity alone tells the
stages apart as little as the data allows. The old reading, ``popularity="paper"``, draws random items
uniformly from the catalogue ("randomly sampled from the whole item pool") and fills retrieval with the
training split's most popular items; on Taobao UserBehavior that lets log-popularity separate impressions
from unexposed rows with AUC 0.91 (``exposure_auc``, :func:`prerank.evaluate.listwise.baseline_metrics`):
the impressions of a small log are mostly long-tail items, the fill-in the head. Counting the split's
impressions uses which items were shown, never a label.

**Cold items** (``unknown_items="sample"``, the default, with matched popularity and logged item sides):
a train-only vocabulary maps every item first seen after training to the unknown id 0 -- on the
Taobao UserBehavior sample 72-74% of the valid and test impressions. Such a row stands for one of many
distinct cold items, so the unknown id is drawn like any other item (in proportion to the split's
unknown impressions) but may recur within a request and next to unknown impressions, and each draw takes
the item features (category, ...) of a uniformly drawn logged unknown-id row of the split (up to
:data:`UNKNOWN_VARIANTS` are kept). Without this every candidate is a known catalogue item, and "unknown
item" alone tells impressions from candidates (popularity's exposure AUC 0.13 on Taobao).
``unknown_items="skip"`` restores that behaviour.

Every row gets ``stage`` and ``teacher_logit`` (the teacher scores impressions too, for distillation,
Eq. 9). Unexposed rows have ``label`` 0 and ``label_level`` 0.

**Retrieval.** The paper's candidates come from a production retrieval stage that public logs lack.
The builder proposes unexposed items by *item co-occurrence* counted on the TRAINING split only:
two items co-occur when one request engaged positively (``label > 0``) with both within
``co_window`` positions of each other (time order). Each item keeps its ``neighbors`` most
frequent co-occurring items. A request's seeds are the items of the user's behaviour history
(``seed_from="history"``: the user-tower sequence feature that shares the item id table; the union
over the request's rows, each of which holds only behaviour before that row) or, with
``seed_from="positives"``, the request's own positive impressions (a look-alike reading of
"co-engaged with the user's positives"; it lets the logged labels choose the negatives of that
request, so prefer ``history`` where the schema has one). Candidates are scored by the summed
co-occurrence counts with the seeds; when fewer than ``retrieve`` unexposed items are found the list
is filled with items drawn by the split's impressions (or, with ``popularity="paper"``, with the most
popular items of the training split: positives, then impressions).
Exposed items of the request are never proposed, so no item is both impression and candidate.

**Features of unexposed rows.** Each unexposed row copies the user and context features (and ``ts``)
of a uniformly drawn impression row of its request, so within a request the user side of unexposed
rows is distributed like that of the impressions and the stage cannot be read off it (copying one
fixed row would: on a user-level request the earliest row has an empty history). Item features
follow the same rule (``item_side="logged"``): those of a uniformly drawn logged row of the same
item in the same split (a sample of :data:`ITEM_VARIANTS` rows per item is kept), or the
catalogue's for items never logged in the split. Recipes fit item statistics out-of-fold on
training rows, so an item's catalogue values differ from all its training impressions' and would
mark a training row as unexposed; ``item_side="catalogue"`` takes the catalogue's serving-time
features regardless. Cross features are recipe-specific functions of the (user, item) pair and
cannot be recomputed from the dataset alone, so unexposed rows get the padding value (0 / unknown id /
empty list) when the teacher scores them. Because a student could then read the stage off a zero cross
feature (a label leak), the default ``cross="drop"`` removes cross features from the output
dataset altogether; ``cross="pad"`` keeps them with that caveat. ``cross="compute"`` takes a
:class:`CrossFeatures` provider from the recipe (the MovieLens ``temporal`` recipes:
:mod:`prerank.data.recipes.movielens_pairs`; Taobao UserBehavior: :mod:`prerank.data.recipes.taobao_pairs`;
rebuilt from the raw files) that computes an unexposed row's cross
fields for its anchor impression's user, time, split and fold with the candidate item, from the same
past-only / out-of-fold sources as the anchor's own; the builder checks that the provider reproduces the
logged cross fields of every impression with a known item id and refuses otherwise. The teacher scores
impressions with their logged cross features.

**Filters and splits (Sec. 4.1.1).** Optionally keep only users with at least ``min_impressions``
impressions and ``min_positives`` positives (counted over all splits; the user is ``user_field`` or,
if unset, the request), and re-split 70/10/20 by time (requests ordered by their earliest ``ts``,
unknown times last: the earliest 70% train) or by request (a seeded random assignment of whole
requests). A re-split pools all source splits, so a request id present in several splits becomes
one request. Features
that a recipe fitted on its own train split (vocabularies, rates) keep that fit; re-splitting by
time such a dataset can leak statistics of the new test period into features, so prefer letting
the recipe make the split the experiment needs.

**Memory.** Rows are spilled into request-aligned buckets of about ``chunk_rows`` rows of work
(rows plus candidates to score) so only one bucket, the item catalogue and the co-occurrence
table are in memory at a time. Output rows are sorted by ``request_id``; inside a request:
impressions (time order), rank candidates, pre-rank candidates (teacher order), random items.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from prerank.data.parquet import SPLITS, DataError, ParquetSplit, SplitWriter, arrow_schema, read_meta, table_to_batch
from prerank.data.requests import ragged_arange, rank_within
from prerank.io import atomic_write, atomic_write_text
from prerank.models.base import ConfigError, PreRanker
from prerank.schema import STAGES, Schema, SchemaError
from prerank.train.checkpoint import load_model

IMPRESSION = STAGES.index("impression")
RANK_CANDIDATE = STAGES.index("rank_candidate")
PRERANK_CANDIDATE = STAGES.index("prerank_candidate")
RANDOM = STAGES.index("random")
_RETRIEVED = -1  # stage of a retrieved row before the teacher's order splits it


@dataclass(frozen=True)
class CascadeConfig:
    """Options of :func:`build_cascade` (see the module docstring for what each stage means).

    Counts are per request: ``retrieve`` unexposed items are proposed, the teacher keeps its top
    ``rank_candidates`` and the next ``prerank_candidates``; ``random`` catalogue items are added.
    A request gets fewer rows only when the catalogue has too few unexposed items.
    """

    retrieve: int = 200
    rank_candidates: int = 20
    prerank_candidates: int = 40
    random: int = 40
    item_field: str = "item_id"
    seed_from: Literal["history", "positives"] = "history"
    rank_cut: Literal["below_impressions", "teacher_top"] = "below_impressions"
    popularity: Literal["matched", "paper"] = "matched"
    history_field: str | None = None
    co_window: int = 5
    neighbors: int = 100
    cross: Literal["drop", "pad", "compute"] = "drop"
    unknown_items: Literal["sample", "skip"] = "sample"
    item_side: Literal["logged", "catalogue"] = "logged"
    min_impressions: int = 0
    min_positives: int = 0
    user_field: str | None = None
    resplit: tuple[float, float, float] | None = None
    resplit_by: Literal["time", "request"] = "time"
    seed: int = 0
    chunk_rows: int = 200_000
    batch_size: int = 4096

    def __post_init__(self) -> None:
        counts = ("retrieve", "rank_candidates", "prerank_candidates", "random", "min_impressions", "min_positives")
        for name in counts:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"cascade option {name} must be an integer >= 0, got {v!r}")
        for name in ("co_window", "neighbors", "chunk_rows", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"cascade option {name} must be an integer >= 1, got {v!r}")
        if self.rank_candidates + self.prerank_candidates > self.retrieve:
            raise ConfigError(
                f"cascade option retrieve ({self.retrieve}) must be at least rank_candidates + prerank_candidates "
                f"({self.rank_candidates} + {self.prerank_candidates}): candidates are cut from the retrieved items"
            )
        if self.seed_from not in ("history", "positives"):
            raise ConfigError(f"cascade option seed_from must be 'history' or 'positives', got {self.seed_from!r}")
        if self.rank_cut not in ("below_impressions", "teacher_top"):
            raise ConfigError(
                f"cascade option rank_cut must be 'below_impressions' or 'teacher_top', got {self.rank_cut!r}"
            )
        if self.popularity not in ("matched", "paper"):
            raise ConfigError(f"cascade option popularity must be 'matched' or 'paper', got {self.popularity!r}")
        if self.item_side not in ("logged", "catalogue"):
            raise ConfigError(f"cascade option item_side must be 'logged' or 'catalogue', got {self.item_side!r}")
        if self.unknown_items not in ("sample", "skip"):
            raise ConfigError(f"cascade option unknown_items must be 'sample' or 'skip', got {self.unknown_items!r}")
        if self.cross not in ("drop", "pad", "compute"):
            raise ConfigError(f"cascade option cross must be 'drop', 'pad' or 'compute', got {self.cross!r}")
        if self.cross == "compute" and self.resplit is not None:
            raise ConfigError(
                "cascade option cross='compute' cannot be combined with resplit: a candidate's cross fields read the "
                "past of its anchor's recipe split, which a re-split changes"
            )
        if self.resplit_by not in ("time", "request"):
            raise ConfigError(f"cascade option resplit_by must be 'time' or 'request', got {self.resplit_by!r}")
        if self.resplit is not None:
            parts = tuple(float(p) for p in self.resplit)
            if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6:
                raise ConfigError(f"cascade option resplit must be three fractions >= 0 summing to 1, got {parts}")


class CrossFeatures(Protocol):
    """Computes a recipe's cross fields for unlogged rows (``cross="compute"``; e.g.
    :class:`prerank.data.recipes.movielens_pairs.MovieLensCross`).

    ``__call__(split, anchors, items)``: for each unlogged row, the logged row of ``split`` whose user side it
    copies (``anchors``, dataset columns) and its item id; returns one array per name in ``names``, computed from
    what the anchor row itself could read (past-only / out-of-fold sources at its time).
    """

    names: tuple[str, ...]

    def __call__(self, split: str, anchors: pa.Table, items: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass
class _Stats:
    """Counts reported in ``meta.json``."""

    requests: int = 0
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    retrieved_cooccurrence: int = 0
    retrieved_popularity: int = 0
    retrieved_above_impressions: int = 0
    item_side_from_catalogue: int = 0
    unknown_item_rows: int = 0

    def to_dict(self) -> dict:
        per_request = {s: (n / self.requests if self.requests else 0.0) for s, n in self.rows.items()}
        return {**asdict(self), "rows_per_request": per_request}


# ----------------------------------------------------------------------------------- array helpers


def _unique(*arrays: np.ndarray) -> np.ndarray:
    """Sorted distinct values of the concatenated arrays (sort-based: NumPy's hash ``unique`` is slow on ints)."""
    a = np.sort(np.concatenate(arrays))
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


def _column(table: pa.Table, name: str, dtype: type = np.int64) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(), dtype=dtype)


def _ts(table: pa.Table) -> np.ndarray:
    """The ``ts`` column; an unknown (null) time sorts after every known one."""
    return np.asarray(table.column("ts").fill_null(np.iinfo(np.int64).max).to_numpy(), dtype=np.int64)


def _check_ids(ids: np.ndarray, vocab: int, name: str, where: str) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise DataError(f"{where}: column {name!r} has ids outside its vocabulary [0, {vocab})")


def _pad_array(kind: str, n: int) -> pa.Array:
    """``n`` padding values of a feature kind: id 0, 0.0, or an empty list."""
    if kind == "sequence":
        return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], pa.int32()))
    if kind == "dense":
        return pa.array(np.zeros(n, dtype=np.float32))
    return pa.array(np.zeros(n, dtype=np.int64))


# ----------------------------------------------------------------------------------- inputs


def _load_teacher(teacher: str | Path | PreRanker) -> tuple[str, PreRanker]:
    if isinstance(teacher, PreRanker):
        return type(teacher).__name__, teacher.eval()
    name, model, _ = load_model(teacher)
    return name, model


def _check_teacher_schema(teacher: Schema, data: Schema, source: str) -> None:
    """Every feature the teacher reads must exist in the data with the same meaning."""
    for f in teacher.features:
        if f.name not in data:
            raise SchemaError(
                f"teacher {source} reads feature {f.name!r}, which the dataset schema lacks: the cascade builder "
                "scores simulated candidates from the dataset's own features, so a teacher of another feature set "
                "(e.g. `prepare --features wide`, whose logits `teacher score --features-from` can still write into "
                "this dataset's rows) cannot build it; fit the cascade's teacher on this dataset"
            )
        d = data[f.name]
        for attr in ("tower", "kind", "max_len", "shares"):
            if getattr(f, attr) != getattr(d, attr):
                raise SchemaError(
                    f"teacher {source} feature {f.name!r} has {attr}={getattr(f, attr)!r}, "
                    f"the dataset has {getattr(d, attr)!r}"
                )
        if f.kind != "dense" and teacher.vocab(f.name) != data.vocab(f.name):
            raise SchemaError(
                f"teacher {source} feature {f.name!r} has vocab_size {teacher.vocab(f.name)}, "
                f"the dataset has {data.vocab(f.name)}"
            )


def _resolve_fields(schema: Schema, config: CascadeConfig) -> tuple[str, str | None]:
    """The item id feature and, for ``seed_from='history'``, the history sequence that shares its table."""
    item = config.item_field
    if item not in schema or schema[item].tower != "item" or schema[item].kind != "categorical":
        raise ConfigError(f"cascade option item_field {item!r} must name a categorical item-tower feature")
    if config.user_field is not None:
        uf = config.user_field
        if uf not in schema or schema[uf].tower not in ("user", "context") or schema[uf].kind != "categorical":
            raise ConfigError(f"cascade option user_field {uf!r} must name a categorical user-tower feature")
    if config.seed_from != "history":
        return item, None
    histories = [
        f.name for f in schema.tower("user", "context") if f.kind == "sequence" and f.table == schema[item].table
    ]
    if config.history_field is not None:
        if config.history_field not in histories:
            raise ConfigError(
                f"cascade option history_field {config.history_field!r} must be a user-tower sequence sharing "
                f"{item!r}'s table; candidates are {histories}"
            )
        return item, config.history_field
    if not histories:
        raise ConfigError(
            f"seed_from='history' needs a user-tower sequence of {item!r} ids (shares={item!r}); the schema has "
            "none, so use seed_from='positives'"
        )
    return item, histories[0]


@dataclass
class _Catalogue:
    """The item catalogue: one row per item id (the first row when an id repeats; id 0 dropped)."""

    table: pa.Table
    ids: np.ndarray  # [C]
    row_of: np.ndarray  # [V] catalogue row of an id, -1 if absent
    rows_dropped: int

    @classmethod
    def load(cls, root: Path, schema: Schema, item_field: str) -> _Catalogue:
        path = root / "items.parquet"
        if not path.exists():
            raise DataError(
                f"the cascade builder needs the item catalogue {path} (one row per item with every item-tower "
                "feature): candidates and random items take their item features from it"
            )
        items = ParquetSplit(root, "items", schema)
        names = [f.name for f in schema.tower("item")]
        table = pq.read_table(path, columns=names)
        table = table.cast(pa.schema([pa.field(n, arrow_schema(schema, ()).field(n).type) for n in names]))
        table_to_batch(table, schema, where=str(path))  # validates ranges, NaN
        ids = _column(table, item_field)
        _, first = np.unique(ids, return_index=True)
        keep = np.sort(first[ids[first] > 0])
        table = table.take(pa.array(keep))
        ids = ids[keep]
        if len(ids) == 0:
            raise DataError(f"{path} has no items with a non-zero {item_field!r}")
        row_of = np.full(schema.vocab(item_field), -1, dtype=np.int64)
        row_of[ids] = np.arange(len(ids))
        return cls(table, ids, row_of, items.num_rows - len(ids))


# ----------------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    """Which requests are kept, which split each goes to, and its bucket there."""

    splits: list[str]
    request_ids: dict[str, np.ndarray]  # target split -> sorted request ids
    buckets: dict[str, np.ndarray]  # target split -> bucket of each request id
    source_keys: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # source split -> (rids, target, bucket)

    def n_buckets(self, split: str) -> int:
        b = self.buckets[split]
        return int(b.max()) + 1 if len(b) else 0


def _index_split(split: ParquetSplit, cols: list[str], user_field: str | None) -> dict[str, np.ndarray]:
    """Per request of one split: rows, positives, earliest ts, user key (one row group at a time)."""
    parts: list[dict[str, np.ndarray]] = []
    for g in split.row_groups:
        t = pq.ParquetFile(g.path).read_row_group(g.index, columns=cols)
        rid = _column(t, "request_id")
        uniq, first, inv = np.unique(rid, return_index=True, return_inverse=True)
        part = {
            "rid": uniq,
            "rows": np.bincount(inv, minlength=len(uniq)),
            "pos": np.bincount(inv, weights=_column(t, "label", np.float64) > 0, minlength=len(uniq)),
        }
        if "ts" in cols:
            ts = np.full(len(uniq), np.iinfo(np.int64).max)
            np.minimum.at(ts, inv, _ts(t))
            part["ts"] = ts
        if user_field is not None:
            user = _column(t, user_field)
            lo, hi = np.full(len(uniq), np.iinfo(np.int64).max), np.full(len(uniq), -1)
            np.minimum.at(lo, inv, user)
            np.maximum.at(hi, inv, user)
            if (lo != hi).any():
                bad = int(uniq[np.flatnonzero(lo != hi)[0]])
                raise DataError(f"{g.path}: request {bad} has several values of user_field {user_field!r}")
            part["user"] = user[first]
        parts.append(part)
    return _merge_requests(parts)


def _merge_requests(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine per-request aggregates of several chunks (a request may span chunks)."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    uniq, first, inv = np.unique(cat["rid"], return_index=True, return_inverse=True)
    out = {
        "rid": uniq,
        "rows": np.bincount(inv, weights=cat["rows"], minlength=len(uniq)).astype(np.int64),
        "pos": np.bincount(inv, weights=cat["pos"], minlength=len(uniq)).astype(np.int64),
    }
    if "ts" in cat:
        ts = np.full(len(uniq), np.iinfo(np.int64).max)
        np.minimum.at(ts, inv, cat["ts"])
        out["ts"] = ts
    if "user" in cat:
        out["user"] = cat["user"][first]
    return out


def _plan(sources: dict[str, ParquetSplit], config: CascadeConfig, has_ts: bool) -> _Plan:
    cols = ["request_id", "label"]
    if has_ts:
        cols.append("ts")
    if config.user_field is not None:
        cols.append(config.user_field)
    index = {s: _index_split(sp, cols, config.user_field) for s, sp in sources.items()}

    keep = {s: np.ones(len(ix["rid"]), dtype=bool) for s, ix in index.items()}
    if config.min_impressions or config.min_positives:
        # the user of a request; an unknown user id (0) stands for nobody else, so such a request counts alone
        user_of = {
            s: np.where(ix["user"] > 0, ix["user"], -1 - ix["rid"]) if "user" in ix else ix["rid"]
            for s, ix in index.items()
        }
        users = np.concatenate(list(user_of.values()))
        uniq, inv = np.unique(users, return_inverse=True)
        rows = np.bincount(inv, weights=np.concatenate([ix["rows"] for ix in index.values()]), minlength=len(uniq))
        pos = np.bincount(inv, weights=np.concatenate([ix["pos"] for ix in index.values()]), minlength=len(uniq))
        good = uniq[(rows >= config.min_impressions) & (pos >= config.min_positives)]
        keep = {s: np.isin(user_of[s], good) for s in index}

    kept = {s: {k: v[keep[s]] for k, v in ix.items()} for s, ix in index.items()}
    if config.resplit is None:
        targets = kept
    else:
        targets = _resplit(_merge_requests(list(kept.values())), config.resplit, config.resplit_by, config.seed)
    splits = [s for s in SPLITS if s in targets and len(targets[s]["rid"])]
    request_ids = {s: targets[s]["rid"] for s in splits}
    buckets = {}
    for s in splits:
        work = targets[s]["rows"] + config.retrieve + config.random
        buckets[s] = (np.cumsum(work) - work) // config.chunk_rows

    source_keys = {}
    for s, ix in index.items():
        rid = ix["rid"]
        target = np.full(len(rid), -1, dtype=np.int64)
        bucket = np.zeros(len(rid), dtype=np.int64)
        for t in [s] if config.resplit is None else splits:
            if t not in request_ids:
                continue
            pos = np.minimum(np.searchsorted(request_ids[t], rid), len(request_ids[t]) - 1)
            hit = keep[s] & (request_ids[t][pos] == rid)
            target[hit] = splits.index(t)
            bucket[hit] = buckets[t][pos[hit]]
        source_keys[s] = (rid, target, bucket)
    return _Plan(splits, request_ids, buckets, source_keys)


def _resplit(
    pooled: dict[str, np.ndarray], fractions: tuple[float, float, float], by: str, seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """Assign whole requests to train/valid/test: by earliest ``ts`` or by a seeded permutation."""
    n = len(pooled["rid"])
    rng = np.random.default_rng(seed)
    order = np.lexsort((pooled["rid"], pooled["ts"])) if by == "time" else rng.permutation(n)
    cuts = np.round(np.cumsum(fractions)[:2] * n).astype(np.int64)
    out = {}
    for name, idx in zip(SPLITS, np.split(order, cuts), strict=True):
        idx = np.sort(idx)  # request ids stay sorted inside a split
        out[name] = {k: v[idx] for k, v in pooled.items()}
    return out


# ----------------------------------------------------------------------------------- spilling


def _input_schema(schema: Schema, present: set[str]) -> pa.Schema:
    reserved = tuple(r for r in ("request_id", "label", "label_level", "ts") if r in present)
    return arrow_schema(schema, reserved)


def _spill(sources: dict[str, ParquetSplit], plan: _Plan, in_schema: pa.Schema, tmp: Path) -> dict[str, list[Path]]:
    """Copy every kept row into ``tmp/<target split>/<bucket>.parquet`` (reading order kept)."""
    paths = {s: [tmp / s / f"{b:06d}.parquet" for b in range(plan.n_buckets(s))] for s in plan.splits}
    writers: dict[tuple[int, int], pq.ParquetWriter] = {}
    width = max(plan.n_buckets(s) for s in plan.splits)
    try:
        for s, split in sources.items():
            rids, target, bucket = plan.source_keys[s]
            for g in split.row_groups:
                t = pq.ParquetFile(g.path).read_row_group(g.index, columns=in_schema.names).cast(in_schema)
                pos = np.searchsorted(rids, _column(t, "request_id"))
                tgt, bkt = target[pos], bucket[pos]  # every row's request is in the index
                code = np.where(tgt >= 0, tgt * width + bkt, -1)
                order = np.argsort(code, kind="stable")
                sorted_code = code[order]
                for c in _unique(sorted_code[sorted_code >= 0]):
                    lo, hi = np.searchsorted(sorted_code, [c, c + 1])
                    key = divmod(int(c), width)
                    if key not in writers:
                        path = paths[plan.splits[key[0]]][key[1]]
                        path.parent.mkdir(parents=True, exist_ok=True)
                        writers[key] = pq.ParquetWriter(path, in_schema)
                    writers[key].write_table(t.take(pa.array(order[lo:hi])))
    finally:
        for w in writers.values():
            w.close()
    return {s: [p for p in ps if p.exists()] for s, ps in paths.items()}


# ----------------------------------------------------------------------------------- retrieval


@dataclass
class CoOccurrenceRetriever:
    """Item-to-item co-occurrence retrieval with popularity fill-in, fitted on the training split.

    ``indptr`` ``[V + 1]``, ``neighbors`` / ``counts`` ``[nnz]``: the top neighbours of item ``v`` are
    ``neighbors[indptr[v]:indptr[v + 1]]`` (most frequent first); ``popular`` lists catalogue items by
    training positives, then training impressions, then id; ``impressions`` ``[V]`` counts each item's
    training impressions.
    """

    vocab: int
    indptr: np.ndarray
    neighbors: np.ndarray
    counts: np.ndarray
    popular: np.ndarray
    impressions: np.ndarray

    @classmethod
    def fit(
        cls, tables: Iterator[pa.Table], item_field: str, vocab: int, catalogue: np.ndarray, window: int, top: int
    ) -> CoOccurrenceRetriever:
        """Count co-occurrences over request-sorted training tables (columns request_id, label, item, ts?)."""
        keys: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        positives = np.zeros(vocab, dtype=np.int64)
        impressions = np.zeros(vocab, dtype=np.int64)
        for t in tables:
            item = _column(t, item_field)
            is_pos = _column(t, "label", np.float64) > 0
            impressions += np.bincount(item, minlength=vocab)
            positives += np.bincount(item[is_pos], minlength=vocab)
            rid, item = _column(t, "request_id")[is_pos], item[is_pos]
            pair_keys = []
            for d in range(1, window + 1):
                same = (rid[:-d] == rid[d:]) & (item[:-d] != item[d:])
                a, b = item[:-d][same], item[d:][same]
                pair_keys += [a * vocab + b, b * vocab + a]
            if pair_keys:
                k, c = np.unique(np.concatenate(pair_keys), return_counts=True)
                keys.append(k)
                counts.append(c)
        if keys:
            k, inv = np.unique(np.concatenate(keys), return_inverse=True)
            c = np.bincount(inv, weights=np.concatenate(counts)).astype(np.int64)
        else:
            k, c = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        src, dst = k // vocab, k % vocab
        order = np.lexsort((dst, -c, src))
        src, dst, c = src[order], dst[order], c[order]
        keep = rank_within(src) < top
        src, dst, c = src[keep], dst[keep], c[keep]
        indptr = np.concatenate(([0], np.cumsum(np.bincount(src, minlength=vocab))))
        cat = np.asarray(catalogue, dtype=np.int64)
        popular = cat[np.lexsort((cat, -impressions[cat], -positives[cat]))]
        return cls(vocab, indptr, dst, c, popular, impressions)

    def retrieve(
        self,
        seed_req: np.ndarray,
        seed_item: np.ndarray,
        taken: np.ndarray,
        n_requests: int,
        k: int,
        in_catalogue: np.ndarray,
        fill: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Up to ``k`` items per request, none of whose keys ``req * V + item`` is in sorted ``taken``.

        Returns (request index ``[M]``, item ``[M]``, how many came from co-occurrence), grouped by
        request, co-occurrence hits first (by summed count with the seeds), then (``fill``) popular items.
        """
        V = self.vocab
        if k == 0 or n_requests == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0
        lo = self.indptr[seed_item]
        n = self.indptr[seed_item + 1] - lo
        idx = ragged_arange(lo, n)
        keys = np.repeat(seed_req, n) * V + self.neighbors[idx]
        uniq, inv = np.unique(keys, return_inverse=True)
        score = np.bincount(inv, weights=self.counts[idx], minlength=len(uniq))
        ok = in_catalogue[uniq % V] & ~np.isin(uniq, taken, assume_unique=False)
        uniq, score = uniq[ok], score[ok]
        req, item = uniq // V, uniq % V
        order = np.lexsort((item, -score, req))
        req, item = req[order], item[order]
        first = rank_within(req) < k
        req, item = req[first], item[first]
        n_cooc = len(req)

        need = k - np.bincount(req, minlength=n_requests)
        rows = np.flatnonzero(need > 0) if fill else np.zeros(0, dtype=np.int64)
        if len(rows):
            taken_per_req = np.bincount(taken // V, minlength=n_requests)[rows] + (k - need[rows])
            pool = self.popular[: k + int(taken_per_req.max())]
            blocked = _unique(taken, req * V + item)
            cand = rows[:, None] * V + pool[None, :]
            ok = ~np.isin(cand, blocked)
            fill = ok & (np.cumsum(ok, axis=1) <= need[rows][:, None])
            r_idx, p_idx = np.nonzero(fill)
            req = np.concatenate([req, rows[r_idx]])
            item = np.concatenate([item, pool[p_idx]])
            order = np.argsort(req, kind="stable")
            req, item = req[order], item[order]
        return req, item, n_cooc


#: Matched popularity: candidates are chosen from a pool this many times ``retrieve``; popularity is compared in
#: log2 buckets of training impressions (bucket b holds items shown 2^b - 1 .. 2^(b+1) - 2 times).
POOL_FACTOR, POPULARITY_BUCKETS = 4, 24


def popularity_bucket(train_impressions: np.ndarray) -> np.ndarray:
    """``floor(log2(1 + count))`` of each item's training impressions, capped at the last bucket: ``[V]``."""
    return np.minimum(np.log2(1 + train_impressions).astype(np.int64), POPULARITY_BUCKETS - 1)


def match_popularity(req: np.ndarray, bucket: np.ndarray, target: np.ndarray, k: int, u: np.ndarray) -> np.ndarray:
    """Indices of at most ``k`` rows per request whose popularity buckets follow ``target``.

    ``req`` ``[P]`` (grouped), ``bucket`` ``[P]`` the pool items' buckets, ``target`` ``[B]`` the impressions' bucket
    histogram, ``u`` ``[P]`` uniforms. Each pool item weighs ``target[b] / pool share of b in its request``; ``k``
    are drawn per request without replacement in proportion to the weights (Efraimidis & Spirakis 2006: the
    largest ``log(u) / w``). Buckets the impressions never reach (weight 0) are drawn only when a request's pool
    has too few others.
    """
    if not len(req):
        return np.zeros(0, dtype=np.int64)
    n_req, n_b = int(req.max()) + 1, len(target)
    pool = np.bincount(req * n_b + bucket, minlength=n_req * n_b).reshape(n_req, n_b)
    share = pool / pool.sum(1, keepdims=True)
    weight = (target / max(target.sum(), 1e-300))[bucket] / share[req, bucket]
    key = np.where(weight > 0, np.log(np.maximum(u, 1e-300)) / np.maximum(weight, 1e-300), -np.inf)
    order = np.lexsort((-key, req))
    top = order[rank_within(req[order]) < k]
    return np.sort(top)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 step on uint64 (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def request_uniforms(seed: int, stream: int, request_id: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) that depend only on (seed, stream, request id, draw index).

    A counter-based generator: the random rows of a request do not depend on which other requests
    share its chunk, so the output does not depend on ``chunk_rows``.
    """
    x = _mix64(np.full(len(request_id), seed, dtype=np.uint64) ^ np.uint64(stream))
    x = _mix64(x ^ request_id.astype(np.uint64))
    x = _mix64(x ^ draw.astype(np.uint64))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _sample_random(
    seed: int,
    request_ids: np.ndarray,
    catalogue: np.ndarray,
    taken: np.ndarray,
    k: int,
    vocab: int,
    weights: np.ndarray | None = None,
    stream: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` distinct catalogue items per request, avoiding the sorted keys ``taken``.

    ``request_ids`` ``[R]``; keys are ``request index * vocab + item``. Items are drawn uniformly, or in
    proportion to ``weights`` (``[C]``, aligned with ``catalogue``; an item of weight 0 is never drawn).
    The unknown id 0, when ``catalogue`` holds it, stands for many cold items: it may recur and is never taken.
    Rejection sampling in a few vectorised rounds; requests still short afterwards (a catalogue barely
    larger than their taken items) draw exactly from what is left. ``stream`` keeps independent draws apart.
    """
    n_requests = len(request_ids)
    if k == 0 or n_requests == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    cdf = None if weights is None else np.cumsum(weights, dtype=np.float64)
    need = np.full(n_requests, k, dtype=np.int64)
    got_req: list[np.ndarray] = []
    got_item: list[np.ndarray] = []
    for attempt in range(8):
        rows = np.flatnonzero(need > 0)
        if not len(rows):
            break
        req = np.repeat(rows, 2 * need[rows])
        u = request_uniforms(seed, stream + attempt, request_ids[req], rank_within(req))
        if cdf is None:
            item = catalogue[(u * len(catalogue)).astype(np.int64)]
        else:
            item = catalogue[np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), len(catalogue) - 1)]
        keys = req * vocab + item
        _, first = np.unique(keys, return_index=True)
        fresh = np.zeros(len(keys), dtype=bool)
        fresh[first] = True
        fresh = (fresh & ~np.isin(keys, taken)) | (item == 0)
        req, item, keys = req[fresh], item[fresh], keys[fresh]
        keep = rank_within(req) < need[req]
        got_req.append(req[keep])
        got_item.append(item[keep])
        taken = _unique(taken, keys[keep])
        need -= np.bincount(req[keep], minlength=n_requests)
    for r in np.flatnonzero(need > 0):
        lo, hi = np.searchsorted(taken, [r * vocab, (r + 1) * vocab])
        free = ~np.isin(catalogue, taken[lo:hi] - r * vocab)
        if weights is not None:
            free &= weights > 0
        n = min(int(need[r]), int(free.sum()))
        if n == 0:
            continue
        p = None if weights is None else weights[free] / weights[free].sum()
        rng = np.random.default_rng((seed, stream, int(request_ids[r])))
        pick = rng.choice(catalogue[free], n, replace=False, p=p)
        got_req.append(np.full(len(pick), r, dtype=np.int64))
        got_item.append(pick)
    req, item = np.concatenate(got_req), np.concatenate(got_item)
    order = np.argsort(req, kind="stable")
    return req[order], item[order]


# ----------------------------------------------------------------------------------- item side

#: Logged item-feature rows kept per item and split to draw unexposed rows' item features from; the unknown id
#: (many cold items) keeps more.
ITEM_VARIANTS, UNKNOWN_VARIANTS = 8, 4096


@dataclass
class _ItemSide:
    """Item features for the unexposed rows of one split.

    ``table`` holds up to :data:`ITEM_VARIANTS` logged rows per item (a uniform sample: the rows
    with the smallest hash keys) sorted by item, ``start`` / ``count`` ``[V]`` locate them, and the
    catalogue follows at ``catalogue_offset`` for items never logged in the split.
    """

    table: pa.Table
    start: np.ndarray
    count: np.ndarray
    catalogue_offset: int
    catalogue_row_of: np.ndarray

    @classmethod
    def build(
        cls, catalogue: _Catalogue, vocab: int, item_field: str, paths: list[Path] | None, seed: int
    ) -> _ItemSide:
        """From the split's spilled ``paths``; ``None`` takes every item's features from the catalogue."""
        names = catalogue.table.column_names
        kept = catalogue.table.slice(0, 0)
        kept_keys = np.zeros(0)
        for path in paths or []:
            t = _sort_requests(pq.read_table(path, columns=[*names, "request_id", *_ts_column(path)]))
            rid = _column(t, "request_id")
            # keys depend on (request, position in request) only, so the sample does not depend on chunking
            keys = np.concatenate([kept_keys, request_uniforms(seed, 20, rid, rank_within(rid))])
            both = pa.concat_tables([kept, t.select(names)])
            ids = _column(both, item_field)
            order = np.lexsort((keys, ids))
            sel = order[rank_within(ids[order]) < np.where(ids[order] == 0, UNKNOWN_VARIANTS, ITEM_VARIANTS)]
            kept, kept_keys = both.take(pa.array(sel)), keys[sel]
        ids = _column(kept, item_field)
        count = np.bincount(ids, minlength=vocab)
        start = np.cumsum(count) - count
        table = pa.concat_tables([kept, catalogue.table])
        return cls(table, start, count, kept.num_rows, catalogue.row_of)

    def rows(self, item: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Row of ``table`` per unexposed item: a logged variant drawn with uniforms ``u``, else the catalogue's."""
        n = self.count[item]
        logged = self.start[item] + (u * n).astype(np.int64)
        return np.where(n > 0, logged, self.catalogue_offset + self.catalogue_row_of[item])


def _ts_column(path: Path) -> list[str]:
    return ["ts"] if "ts" in pq.read_schema(path).names else []


# ----------------------------------------------------------------------------------- one chunk


@dataclass
class _Context:
    schema: Schema
    out_arrow: pa.Schema
    config: CascadeConfig
    teacher: PreRanker
    catalogue: _Catalogue
    retriever: CoOccurrenceRetriever
    item_field: str
    history_field: str | None
    cross_features: CrossFeatures | None = None


def _sort_requests(table: pa.Table) -> pa.Table:
    """Rows by request id, then ts (if any), then reading order."""
    keys = [np.arange(table.num_rows)]
    if "ts" in table.column_names:
        keys.append(_ts(table))
    keys.append(_column(table, "request_id"))
    return table.take(pa.array(np.lexsort(keys)))


def _seeds(ctx: _Context, table: pa.Table, req_of_row: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(request index, item) pairs the retrieval starts from, deduplicated per request.

    History seeds are the union of the history sequences of all the request's rows: each holds only
    what preceded its own row, and on a user-level request spanning a long period the earliest
    row's history alone is often empty.
    """
    if ctx.history_field is None:
        pos = _column(table, "label", np.float64) > 0
        req, item = req_of_row[pos], _column(table, ctx.item_field)[pos]
    else:
        hist = table.column(ctx.history_field).combine_chunks()
        lengths = np.asarray(hist.value_lengths().fill_null(0).to_numpy(), dtype=np.int64)
        values = np.asarray(hist.flatten().to_numpy(), dtype=np.int64)
        row = np.repeat(np.arange(len(lengths)), lengths)
        recent = rank_within(row) >= np.repeat(lengths - ctx.schema[ctx.history_field].max_len, lengths)
        req, item = req_of_row[row[recent]], values[recent]
    V = ctx.retriever.vocab
    _check_ids(item, V, ctx.history_field or ctx.item_field, where)
    valid = item > 0
    keys = _unique(req[valid] * V + item[valid])
    return keys // V, keys % V


def _candidate_rows(
    ctx: _Context, table: pa.Table, anchor: np.ndarray, item_side: _ItemSide, item_rows: np.ndarray, split: str
) -> pa.Table:
    """Unexposed rows: user side (and ``ts``) of impression rows ``anchor``, item side of ``item_rows``; cross
    features padded, or computed by ``ctx.cross_features`` (``cross="compute"``)."""
    anchor_rows = pa.array(anchor)
    item_rows_a = pa.array(item_rows)
    n = len(anchor)
    computed: dict[str, np.ndarray] = {}
    if ctx.cross_features is not None:
        items = _column(item_side.table.take(item_rows_a), ctx.item_field)
        computed = ctx.cross_features(split, table.take(anchor_rows), items)
    cols: dict[str, pa.Array] = {}
    for name in table.column_names:
        if name in ("request_id", "ts"):
            cols[name] = table.column(name).take(anchor_rows)
        elif name == "label":
            cols[name] = pa.array(np.zeros(n, dtype=np.float32))
        elif name == "label_level":
            cols[name] = pa.array(np.zeros(n, dtype=np.int8))
        else:
            f = ctx.schema[name]
            if f.tower == "item":
                cols[name] = item_side.table.column(name).take(item_rows_a)
            elif f.tower == "cross":
                cols[name] = pa.array(computed[name]) if name in computed else _pad_array(f.kind, n)
            else:
                cols[name] = table.column(name).take(anchor_rows)
    return pa.table(cols).cast(table.schema)


@torch.no_grad()
def _teacher_logits(ctx: _Context, table: pa.Table, where: str) -> np.ndarray:
    out = []
    for start in range(0, table.num_rows, ctx.config.batch_size):
        batch = table_to_batch(table.slice(start, ctx.config.batch_size), ctx.schema, where=where)
        out.append(ctx.teacher(batch).float().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _check_cross(ctx: _Context, table: pa.Table, split: str, where: str) -> None:
    """The provider must reproduce the logged cross fields of the impressions with a known item id."""
    known = np.flatnonzero(_column(table, ctx.item_field) > 0)
    rows = table.take(pa.array(known))
    got = ctx.cross_features(split, rows, _column(rows, ctx.item_field))
    for name, values in got.items():
        logged = _column(rows, name, np.float64)
        worst = float(np.max(np.abs(values - logged), initial=0.0))
        if not worst <= 1e-5:
            raise DataError(
                f"{where}: the cross-feature provider does not reproduce the logged {name!r} of the impressions "
                f"(largest difference {worst:.3g}); it was built from other raw files or another recipe run"
            )


def _build_chunk(
    ctx: _Context, item_side: _ItemSide, table: pa.Table, stats: _Stats, split: str, where: str, shown: np.ndarray
) -> pa.Table:
    """All stages for the whole requests in ``table`` of ``split``; returns the output rows, request-sorted."""
    cfg, V = ctx.config, ctx.retriever.vocab
    table = _sort_requests(table)
    if ctx.cross_features is not None:
        _check_cross(ctx, table, split, where)
    rid = _column(table, "request_id")
    new = np.ones(len(rid), dtype=bool)
    new[1:] = rid[1:] != rid[:-1]
    starts = np.flatnonzero(new)
    req_of_row = np.cumsum(new) - 1
    n_req = len(starts)

    items = _column(table, ctx.item_field)
    _check_ids(items, V, ctx.item_field, where)
    exposed = _unique(req_of_row * V + items)
    seed_req, seed_item = _seeds(ctx, table, req_of_row, where)
    in_cat = ctx.catalogue.row_of >= 0
    matched = cfg.popularity == "matched"
    pool = cfg.retrieve * (POOL_FACTOR if matched else 1)
    ret_req, ret_item, n_cooc = ctx.retriever.retrieve(
        seed_req, seed_item, exposed, n_req, pool, in_cat, fill=not matched
    )
    draw_ids = ctx.catalogue.ids
    if matched and cfg.unknown_items == "sample" and cfg.item_side == "logged" and shown[0] > 0:
        draw_ids = np.concatenate([[0], draw_ids])  # cold items, drawn like the split's unknown impressions
    weights = shown[draw_ids] if matched and shown[draw_ids].sum() > 0 else None
    if matched:  # top the pool up with items drawn like the split's impressions, then match its popularity
        need = pool - np.bincount(ret_req, minlength=n_req)
        taken = _unique(exposed, ret_req * V + ret_item)
        fill_req, fill_item = _sample_random(
            cfg.seed, rid[starts], draw_ids, taken, int(need.max(initial=0)), V, weights, stream=20
        )
        keep = rank_within(fill_req) < need[fill_req]
        cooc = np.concatenate([np.ones(len(ret_req), bool), np.zeros(int(keep.sum()), bool)])
        ret_req, ret_item = np.concatenate([ret_req, fill_req[keep]]), np.concatenate([ret_item, fill_item[keep]])
        bucket = popularity_bucket(ctx.retriever.impressions)
        target = np.bincount(bucket, weights=shown, minlength=POPULARITY_BUCKETS)
        kept = match_popularity(
            ret_req,
            bucket[ret_item],
            target,
            cfg.retrieve,
            request_uniforms(cfg.seed, 30, rid[starts][ret_req], np.arange(len(ret_req))),
        )
        kept = kept[np.argsort(ret_req[kept], kind="stable")]  # grouped by request, co-occurrence hits first
        ret_req, ret_item, n_cooc = ret_req[kept], ret_item[kept], int(cooc[kept].sum())
    taken = _unique(exposed, ret_req * V + ret_item)
    rnd_req, rnd_item = _sample_random(cfg.seed, rid[starts], draw_ids, taken, cfg.random, V, weights)

    new_req = np.concatenate([ret_req, rnd_req])
    new_item = np.concatenate([ret_item, rnd_item])
    new_rid = rid[starts][new_req]
    # draws keyed by (request id, position among its unexposed rows): independent of chunking
    draw = np.concatenate([rank_within(ret_req), cfg.retrieve + rank_within(rnd_req)])
    lengths = np.diff(np.append(starts, len(rid)))
    anchor = starts[new_req] + (request_uniforms(cfg.seed, 10, new_rid, draw) * lengths[new_req]).astype(np.int64)
    item_rows = item_side.rows(new_item, request_uniforms(cfg.seed, 11, new_rid, draw))
    cands = _candidate_rows(ctx, table, anchor, item_side, item_rows, split)
    full = pa.concat_tables([table, cands])
    logits = _teacher_logits(ctx, full, where)

    n_imp, n_ret = table.num_rows, len(ret_req)
    stage = np.concatenate(
        [np.full(n_imp, IMPRESSION), np.full(n_ret, _RETRIEVED), np.full(len(rnd_req), RANDOM)]
    ).astype(np.int64)
    req = np.concatenate([req_of_row, new_req])
    within = np.concatenate([np.arange(n_imp), np.zeros(n_ret, dtype=np.int64), rank_within(rnd_req)])
    # the teacher's order splits the retrieved items: top -> rank candidates, next -> pre-rank candidates
    ret = np.arange(n_imp, n_imp + n_ret)
    if cfg.rank_cut == "below_impressions":  # what the ranker scored above a shown item, it would have shown
        lowest = np.full(n_req, np.inf)
        np.minimum.at(lowest, req_of_row, logits[:n_imp])
        above = logits[ret] >= lowest[req[ret]]
        stage[ret[above]] = -2
        stats.retrieved_above_impressions += int(above.sum())
        ret = ret[~above]
    ret = ret[np.lexsort((-logits[ret], req[ret]))]
    rank = rank_within(req[ret])
    within[ret] = rank
    stage[ret] = np.select(
        [rank < cfg.rank_candidates, rank < cfg.rank_candidates + cfg.prerank_candidates],
        [RANK_CANDIDATE, PRERANK_CANDIDATE],
        -2,
    )
    keep = np.flatnonzero(stage >= 0)
    keep = keep[np.lexsort((within[keep], stage[keep], req[keep]))]

    out = full.take(pa.array(keep))
    out = out.append_column("stage", pa.array(stage[keep].astype(np.int8)))
    out = out.append_column("teacher_logit", pa.array(logits[keep].astype(np.float32)))
    kept_stage = stage[keep]
    stats.requests += n_req
    for i, s in enumerate(STAGES):
        stats.rows[s] += int((kept_stage == i).sum())
    stats.retrieved_cooccurrence += n_cooc
    stats.retrieved_popularity += n_ret - n_cooc
    from_catalogue = np.concatenate([np.zeros(n_imp, dtype=bool), item_side.count[new_item] == 0])
    stats.item_side_from_catalogue += int(from_catalogue[keep].sum())
    stats.unknown_item_rows += int(((kept_stage != IMPRESSION) & (_column(out, ctx.item_field) == 0)).sum())
    return out.select(ctx.out_arrow.names).cast(ctx.out_arrow)


# ----------------------------------------------------------------------------------- driver


def _impressions_per_item(paths: list[Path], item_field: str, vocab: int) -> np.ndarray:
    """How often each item id was shown in the split's spilled chunks: ``[vocab]`` int64."""
    counts = np.zeros(vocab, dtype=np.int64)
    for p in paths:
        counts += np.bincount(_column(pq.read_table(p, columns=[item_field]), item_field), minlength=vocab)
    return counts


def _train_tables(paths: list[Path], item_field: str) -> Iterator[pa.Table]:
    for p in paths:
        t = pq.read_table(p)
        cols = [c for c in ("request_id", "label", item_field, "ts") if c in t.column_names]
        yield _sort_requests(t.select(cols))


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def _prepare_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise ConfigError(f"--out {out} is the input dataset; the cascade is written to a new directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {out} is not empty; pass overwrite=True (--overwrite) to replace it")
        # schema.json goes first so a half-rebuilt directory never loads as a dataset
        for name in ("schema.json", "meta.json", "items.parquet"):
            (out / name).unlink(missing_ok=True)
        for s in SPLITS:
            if (out / s).is_dir():
                shutil.rmtree(out / s)
    out.mkdir(parents=True, exist_ok=True)


def build_cascade(
    data_dir: str | Path,
    teacher: str | Path | PreRanker,
    out_dir: str | Path,
    config: CascadeConfig = CascadeConfig(),
    *,
    overwrite: bool = False,
    progress: bool = False,
    cross_features: CrossFeatures | None = None,
) -> dict:
    """Build a cascade dataset in ``out_dir`` from the impression dataset ``data_dir``.

    ``teacher`` is a checkpoint path (loaded with ``weights_only=True``) or a model; any registered
    :class:`~prerank.models.base.PreRanker` trained on ``data_dir``'s schema works. ``cross_features``
    (required by, and only used with, ``config.cross="compute"``) computes the cross fields of unexposed rows.
    Returns the ``cascade`` section written to ``meta.json`` (options, per-split row counts per stage).
    """
    src, out = Path(data_dir), Path(out_dir)
    schema = Schema.load(src)
    if schema.has_stage:
        raise SchemaError(f"{src} is already a cascade dataset (its schema has has_stage=true)")
    teacher_name, model = _load_teacher(teacher)
    _check_teacher_schema(model.schema, schema, str(teacher) if not isinstance(teacher, PreRanker) else "model")
    item_field, history_field = _resolve_fields(schema, config)
    if config.cross == "compute":
        cross_names = {f.name for f in schema.features if f.tower == "cross"}
        if cross_features is None:
            raise ConfigError("cascade option cross='compute' needs a cross-feature provider (cascade build --raw)")
        if set(cross_features.names) != cross_names:
            raise ConfigError(
                f"the cross-feature provider computes {sorted(cross_features.names)}, but the dataset's cross "
                f"features are {sorted(cross_names)}"
            )
    else:
        cross_features = None
    sources = {s: ParquetSplit(src, s, schema) for s in SPLITS if (src / s).is_dir()}
    if not sources:
        raise DataError(f"{src} has none of the splits {SPLITS}")
    # reserved columns present in every file (request_id is required: the cascade is built per request)
    present = set.intersection(*(set(pq.read_schema(f).names) for sp in sources.values() for f in sp.files))
    if "request_id" not in present:
        raise DataError(f"{src}: not every file has a 'request_id' column; the cascade is built per request")
    if config.resplit is not None and config.resplit_by == "time" and "ts" not in present:
        raise ConfigError("cascade option resplit_by='time' needs a 'ts' column; use resplit_by='request'")
    catalogue = _Catalogue.load(src, schema, item_field)
    has_level, has_ts = "label_level" in present, "ts" in present
    plan = _plan(sources, config, has_ts)
    if "train" not in plan.splits:
        raise DataError("no training requests are left (user filter / re-split); co-occurrence is fitted on train")
    _prepare_out(src, out, overwrite)

    in_schema = _input_schema(schema, present)
    out_schema = replace(
        schema,
        features=tuple(f for f in schema.features if config.cross != "drop" or f.tower != "cross"),
        has_label_level=has_level,
        has_stage=True,
        has_teacher_logit=True,
    )
    reserved = ("request_id", "label") + (("label_level",) if has_level else ()) + ("stage", "teacher_logit")
    out_arrow = arrow_schema(out_schema, reserved + (("ts",) if has_ts else ()))
    stats = {s: _Stats() for s in plan.splits}
    with tempfile.TemporaryDirectory(dir=out, prefix=".cascade-tmp-") as tmp:
        spilled = _spill(sources, plan, in_schema, Path(tmp))
        retriever = CoOccurrenceRetriever.fit(
            _train_tables(spilled["train"], item_field),
            item_field,
            schema.vocab(item_field),
            catalogue.ids,
            config.co_window,
            config.neighbors,
        )
        ctx = _Context(
            schema, out_arrow, config, model, catalogue, retriever, item_field, history_field, cross_features
        )
        with _progress(progress) as bar:
            task = bar.add_task("cascade", total=sum(len(p) for p in spilled.values()))
            for s in plan.splits:
                logged = spilled[s] if config.item_side == "logged" else None
                item_side = _ItemSide.build(catalogue, schema.vocab(item_field), item_field, logged, config.seed)
                writer = SplitWriter(out, s)
                shown = _impressions_per_item(spilled[s], item_field, schema.vocab(item_field))
                for path in spilled[s]:
                    where = f"{s} chunk {path.stem}"
                    chunk = _build_chunk(ctx, item_side, pq.read_table(path), stats[s], s, where, shown)
                    writer.write(chunk)
                    bar.advance(task)
                writer.close()

    atomic_write(out / "items.parquet", lambda tmp: pq.write_table(catalogue.table, tmp))
    summary = {
        "source": str(src),
        "teacher": str(teacher) if not isinstance(teacher, PreRanker) else teacher_name,
        "teacher_model": teacher_name,
        "retrieval": "item co-occurrence on train positives (window co_window) + popularity fill-in",
        "rank_cut": "candidates scored below the request's lowest impression"
        if config.rank_cut == "below_impressions"
        else "the teacher's top retrieved items",
        "popularity": "random items and retrieval fill-in drawn by the split's impressions"
        if config.popularity == "matched"
        else "random items uniform, retrieval fill-in the most popular training items",
        "seeds": f"history sequence {history_field!r}" if history_field else "the request's positive impressions",
        "cross_features": {
            "drop": "dropped",
            "pad": "padding value on unexposed rows",
            "compute": "computed for unexposed rows from their anchor impression's sources",
        }[config.cross],
        "item_side": "a logged row of the item in the split (catalogue if never logged)"
        if config.item_side == "logged"
        else "the catalogue",
        "catalogue_items": len(catalogue.ids),
        "catalogue_rows_dropped": catalogue.rows_dropped,
        "config": asdict(config),
        "splits": {s: st.to_dict() for s, st in stats.items()},
    }
    meta = {
        "cascade": summary,
        "rows": {s: sum(st.rows.values()) for s, st in stats.items()},
        "source_meta": read_meta(src),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, default=str))
    out_schema.save(out / "schema.json")
    return summary
