"""Building blocks shared by the recipes: vocabularies, leak-free statistics, behaviour histories.

Every helper here is vectorised with numpy (a whole ML-1M recipe runs in seconds) and every one
that touches labels takes the *training* rows only, so no recipe can fit anything on valid or test
labels by construction:

* :class:`Vocab` maps raw ids to ``1..K`` fitted on training values; everything else maps to 0.
* :func:`target_mean` is target encoding with a Bayesian prior; training rows get *out-of-fold*
  values (row ``r`` in fold ``k`` only sees the labels of the other folds, prior included), so a
  training row's statistic never depends on its own label; valid/test rows use the whole
  training split.
* :func:`history` and :func:`count_before` look strictly backwards in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from prerank.schema import CostType

#: ``progress(message, done, total)``; the CLI turns it into a progress bar.
Progress = Callable[[str, int, int], None]

SPLIT_CODES: dict[str, int] = {"train": 0, "valid": 1, "test": 2}


class RecipeError(ValueError):
    """A recipe cannot run: unknown name or protocol, missing or malformed raw files."""


def read_prepared_meta(data_dir: str | Path) -> dict:
    """The ``meta.json`` a recipe wrote into ``data_dir``; a :class:`RecipeError` naming the file if unreadable."""
    path = Path(data_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RecipeError(f"cannot read {path}: {e}") from e


def no_progress(message: str, done: int, total: int) -> None:
    """Default progress callback: report nothing."""


def fscd_cost(tower: str, *, complex_: bool) -> CostType:
    """FSCD Table 1 type of a feature (reading of :data:`prerank.schema.COST_O`).

    Two axes: *simple* features look up embeddings of ids (I user/query, II item-correlated),
    *complex* ones need computation: statistics, behaviour sequences, crosses (III user/query,
    computed once per request; IV item-correlated, computed per candidate).
    """
    per_request = tower in ("user", "context")
    if complex_:
        return "III" if per_request else "IV"
    return "I" if per_request else "II"


@dataclass(frozen=True)
class Entries:
    """A possibly multi-valued key per row, exploded: entry ``e`` gives row ``row[e]`` the key ``key[e]``.

    A single-valued key is ``Entries.single(keys)``; a movie's genres become one entry per genre.
    """

    row: np.ndarray
    key: np.ndarray
    n_rows: int

    @classmethod
    def single(cls, keys: np.ndarray) -> Entries:
        return cls(np.arange(len(keys)), np.asarray(keys, dtype=np.int64), len(keys))

    @classmethod
    def padded(cls, prefix: np.ndarray, values: np.ndarray, n_values: int) -> Entries:
        """Rows with a ``[n, G]`` 0-padded matrix of ids: one entry ``prefix * n_values + id`` per non-zero id."""
        rows, cols = np.nonzero(values)
        keys = np.asarray(prefix, dtype=np.int64)[rows] * n_values + values[rows, cols]
        return cls(rows, keys, len(values))


@dataclass(frozen=True)
class Vocab:
    """Raw ids seen in training -> contiguous ``1..K``; anything else (unseen, missing) -> 0.

    ``values`` holds the sorted raw ids; id ``i`` encodes ``values[i - 1]``. ``size`` is ``K + 1``
    (0 is padding/unknown), the ``vocab_size`` a :class:`~prerank.schema.FeatureSpec` needs.
    """

    values: np.ndarray

    @classmethod
    def fit(cls, train_values: np.ndarray, missing: object | None = None) -> Vocab:
        """Fit on training values; ``missing`` (e.g. ``""`` or ``0``) is never given an id."""
        vals = np.unique(np.asarray(train_values))
        if missing is not None:
            vals = vals[vals != missing]
        return cls(vals)

    @property
    def size(self) -> int:
        return len(self.values) + 1

    def encode(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw)
        if len(self.values) == 0:
            return np.zeros(raw.shape, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.values, raw), 0, len(self.values) - 1)
        return np.where(self.values[pos] == raw, pos + 1, 0).astype(np.int64)


def balanced_folds(n: int, n_folds: int, rng: np.random.Generator, groups: np.ndarray | None = None) -> np.ndarray:
    """A random fold in ``[0, n_folds)`` per row, fold sizes (in rows or groups) differing by at most one.

    With ``groups``, all rows of a group share a fold. Use the unit that separates evaluation rows
    from training rows: when a test request is never seen in training (a temporal split), fold by
    request too, or a training row's out-of-fold statistic would still see the labels of its own
    session, which are far more correlated with its label than anything a test row can see.
    """
    if n_folds < 2:
        raise RecipeError(f"n_folds must be >= 2 for out-of-fold statistics, got {n_folds}")
    if groups is None:
        return (rng.permutation(n) % n_folds).astype(np.int64)
    uniq, inv = np.unique(groups, return_inverse=True)
    return (rng.permutation(len(uniq)) % n_folds)[inv.reshape(-1)].astype(np.int64)


def _compact(train_keys: np.ndarray, *others: np.ndarray) -> tuple[int, np.ndarray, list[np.ndarray]]:
    """Map keys to ``0..U-1`` by the training keys; keys unseen in training map to ``U`` (an empty slot)."""
    uniq, train_idx = np.unique(train_keys, return_inverse=True)
    out = []
    for keys in others:
        pos = np.clip(np.searchsorted(uniq, keys), 0, max(len(uniq) - 1, 0))
        hit = (uniq[pos] == keys) if len(uniq) else np.zeros(len(keys), dtype=bool)
        out.append(np.where(hit, pos, len(uniq)))
    return len(uniq), train_idx.reshape(-1), out


def target_mean(
    train: Entries,
    label: np.ndarray,
    fold: np.ndarray,
    evals: list[Entries],
    *,
    n_folds: int,
    smoothing: float,
    priors: tuple[np.ndarray, float] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Smoothed mean label of each row's key group(s), out-of-fold for training rows.

    For a row whose entries hit groups ``g``: ``(sum_g S_g + m * prior) / (sum_g C_g + m)`` with
    ``S_g``/``C_g`` the label sum/count of group ``g`` over the training rows (a training row with
    several keys counts once in each group) and ``m = smoothing`` pseudo-rows of the prior.
    Training row in fold ``k``: ``S``, ``C`` and ``prior`` exclude fold ``k`` entirely, so the value
    does not depend on the row's own label. Eval rows: whole training split, prior = its mean.

    Args:
        train: entries of the training rows (``train.n_rows`` rows, labels ``label``, folds ``fold``).
        evals: entries of other splits (valid, test); their labels are never read.
        priors: ``(prior per fold, prior)`` of the whole training split, when ``train`` holds only the rows of
            some groups (every row of each; the out-of-core path passes one range of users at a time).

    Returns:
        ``[n_train]`` float32 and one ``[n]`` float32 array per ``evals``.
    """
    label = np.asarray(label, dtype=np.float64)
    n_groups, t_idx, e_idx = _compact(train.key, *[e.key for e in evals])
    slots = (n_groups + 1) * n_folds
    ent_fold = fold[train.row]
    ent_label = label[train.row]
    s_kf = np.bincount(t_idx * n_folds + ent_fold, weights=ent_label, minlength=slots).reshape(-1, n_folds)
    c_kf = np.bincount(t_idx * n_folds + ent_fold, minlength=slots).reshape(-1, n_folds).astype(np.float64)
    s_k, c_k = s_kf.sum(1), c_kf.sum(1)
    prior_f, prior = priors or fold_priors(
        np.bincount(fold, weights=label, minlength=n_folds), np.bincount(fold, minlength=n_folds)
    )

    s_row = np.bincount(train.row, weights=s_k[t_idx] - s_kf[t_idx, ent_fold], minlength=train.n_rows)
    c_row = np.bincount(train.row, weights=c_k[t_idx] - c_kf[t_idx, ent_fold], minlength=train.n_rows)
    train_out = (s_row + smoothing * prior_f[fold]) / (c_row + smoothing)
    eval_out = []
    for ent, idx in zip(evals, e_idx, strict=True):
        s = np.bincount(ent.row, weights=s_k[idx], minlength=ent.n_rows)
        c = np.bincount(ent.row, weights=c_k[idx], minlength=ent.n_rows)
        eval_out.append(((s + smoothing * prior) / (c + smoothing)).astype(np.float32))
    return train_out.astype(np.float32), eval_out


def target_mean_at(
    train: Entries,
    label: np.ndarray,
    fold: np.ndarray,
    query: Entries,
    query_fold: np.ndarray,
    *,
    n_folds: int,
    smoothing: float,
) -> np.ndarray:
    """:func:`target_mean` for rows that are not in ``train``: each query row gets the value a row of its fold would.

    ``query_fold[r]`` is the out-of-fold fold of query row ``r`` (its groups' sums, counts and prior without that
    fold), or -1 for the whole training split (an eval row). A training row queried with its own keys and fold
    gets exactly its :func:`target_mean` value; the pair features of :mod:`.movielens_pairs` query a training row's
    user with another item. Returns ``[query.n_rows]`` float32.
    """
    label = np.asarray(label, dtype=np.float64)
    n_groups, t_idx, (q_idx,) = _compact(train.key, query.key)
    slots = (n_groups + 1) * n_folds
    s_kf = np.bincount(t_idx * n_folds + fold[train.row], weights=label[train.row], minlength=slots)
    c_kf = np.bincount(t_idx * n_folds + fold[train.row], minlength=slots).astype(np.float64)
    s_kf, c_kf = s_kf.reshape(-1, n_folds), c_kf.reshape(-1, n_folds)
    prior_f, prior = fold_priors(
        np.bincount(fold, weights=label, minlength=n_folds), np.bincount(fold, minlength=n_folds)
    )
    qf = np.asarray(query_fold, dtype=np.int64)
    ent_fold = qf[query.row]
    own = ent_fold >= 0
    f = np.maximum(ent_fold, 0)
    s = np.bincount(query.row, weights=s_kf.sum(1)[q_idx] - np.where(own, s_kf[q_idx, f], 0.0), minlength=query.n_rows)
    c = np.bincount(query.row, weights=c_kf.sum(1)[q_idx] - np.where(own, c_kf[q_idx, f], 0.0), minlength=query.n_rows)
    row_prior = np.where(qf >= 0, prior_f[np.maximum(qf, 0)], prior)
    return ((s + smoothing * row_prior) / (c + smoothing)).astype(np.float32)


def fold_priors(y_f: np.ndarray, n_f: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean label of the training rows outside each fold, and of all of them, from per-fold label sums and sizes."""
    y_f, n_f = np.asarray(y_f, dtype=np.float64), np.asarray(n_f, dtype=np.float64)
    return (y_f.sum() - y_f) / np.maximum(n_f.sum() - n_f, 1.0), y_f.sum() / max(n_f.sum(), 1.0)


def group_count(train: Entries, queries: list[Entries]) -> list[np.ndarray]:
    """Per query row: the number of training rows in its key group(s), summed over its entries.

    Counts read no labels, so every row (training rows included) uses the whole training split.
    """
    n_groups, t_idx, q_idx = _compact(train.key, *[q.key for q in queries])
    c_k = np.bincount(t_idx, minlength=n_groups + 1).astype(np.float64)
    return [np.bincount(q.row, weights=c_k[idx], minlength=q.n_rows) for q, idx in zip(queries, q_idx, strict=True)]


def log_scale(counts: np.ndarray, reference: float) -> np.ndarray:
    """``log1p(count) / log1p(reference)``: counts as a dense feature in about ``[0, 1]``.

    ``reference`` is the largest count over training groups, so the scale itself is fitted on
    training data only and eval rows may exceed 1 slightly.
    """
    return (np.log1p(counts) / np.log1p(max(reference, 1.0))).astype(np.float32)


def _time_keys(
    query_group: np.ndarray, query_time: np.ndarray, event_group: np.ndarray, event_time: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort events by (group, time, input order); return the order and, per query, the range of its
    group's events strictly before the query time as ``(order, start, end, n_groups)``."""
    groups, inv = np.unique(np.concatenate([event_group, query_group]), return_inverse=True)
    inv = inv.reshape(-1)
    eg, qg = inv[: len(event_group)], inv[len(event_group) :]
    times = np.concatenate([event_time, query_time]).astype(np.int64)
    t0 = int(times.min()) if len(times) else 0
    span = (int(times.max()) - t0 + 1) if len(times) else 1
    if len(groups) * span >= 2**62:
        raise RecipeError("time span x number of groups overflows int64 keys")
    ekey = eg.astype(np.int64) * span + (np.asarray(event_time, dtype=np.int64) - t0)
    order = np.argsort(ekey, kind="stable")
    ekey = ekey[order]
    qkey = qg.astype(np.int64) * span + (np.asarray(query_time, dtype=np.int64) - t0)
    end = np.searchsorted(ekey, qkey, side="left")
    start = np.searchsorted(ekey, qg.astype(np.int64) * span, side="left")
    return order, start, end, groups


def count_before(
    query_group: np.ndarray, query_time: np.ndarray, event_group: np.ndarray, event_time: np.ndarray
) -> np.ndarray:
    """Per query: the number of events of its group with time strictly before the query's time."""
    if len(event_group) == 0:
        return np.zeros(len(query_group), dtype=np.int64)
    _, start, end, _ = _time_keys(query_group, query_time, event_group, event_time)
    return (end - start).astype(np.int64)


def history(
    query_group: np.ndarray,
    query_time: np.ndarray,
    event_group: np.ndarray,
    event_time: np.ndarray,
    event_value: np.ndarray,
    max_len: int,
) -> pa.ListArray:
    """Per query: the values of its group's last ``max_len`` events strictly before its time.

    Oldest first, most recent last (the :class:`~prerank.data.batch.Batch` convention); events
    with equal times keep their input order. Returns an Arrow ``list<int32>`` with one list per query.
    """
    n = len(query_group)
    if len(event_group) == 0:
        return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], pa.int32()))
    order, start, end, _ = _time_keys(query_group, query_time, event_group, event_time)
    values = np.asarray(event_value)[order]
    start = np.maximum(start, end - max_len)
    lengths = end - start
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    idx = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values[idx].astype(np.int32), pa.int32())
    )


def out_of_fold_history(
    query_group: np.ndarray,
    query_fold: np.ndarray,
    event_group: np.ndarray,
    event_fold: np.ndarray,
    event_value: np.ndarray,
    event_rank: np.ndarray,
    max_len: int,
) -> pa.ListArray:
    """Per query: up to ``max_len`` values of its group's events *outside its fold*, for logs without time.

    ``query_fold[r]`` is the fold of query ``r`` (a training row: events of that fold are left out, the row's own
    event among them), or -1 (an eval row: every event). Each group's events are ordered by ``event_rank`` (e.g. a
    fixed random draw) and a query gets the first ``max_len`` of those it may see, so rows of different folds see
    mostly the same events and a row's list never depends on its own fold's events. Returns an Arrow
    ``list<int32>`` with one list per query.
    """
    order = np.lexsort((event_rank, event_group))
    group, fold, values = np.asarray(event_group)[order], np.asarray(event_fold)[order], np.asarray(event_value)
    values = values[order]
    groups = np.unique(group)
    pos = np.clip(np.searchsorted(groups, query_group), 0, max(len(groups) - 1, 0))
    known = groups[pos] == query_group if len(groups) else np.zeros(len(query_group), dtype=bool)
    start, length, pool, base = np.zeros(len(query_group), np.int64), np.zeros(len(query_group), np.int64), [], 0
    for f in np.unique(query_fold):  # the events a query of fold f may see, first max_len of each group
        keep = fold != f
        g = group[keep]
        first = np.searchsorted(g, groups)
        n = np.minimum(np.searchsorted(g, groups, side="right") - first, max_len)
        q = np.nonzero((query_fold == f) & known)[0]
        start[q], length[q] = base + first[pos[q]], n[pos[q]]
        pool.append(values[keep])
        base += int(keep.sum())
    pooled = np.concatenate(pool) if pool else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(length)])
    idx = np.repeat(start - offsets[:-1], length) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(pooled[idx].astype(np.int32), pa.int32())
    )


def padded_to_list(values: np.ndarray) -> pa.ListArray:
    """A ``[n, G]`` 0-padded, left-aligned id matrix as an Arrow ``list<int32>`` without the padding."""
    values = np.asarray(values)
    nonzero = values != 0
    offsets = np.concatenate([[0], np.cumsum(nonzero.sum(1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[nonzero].astype(np.int32), pa.int32()))


def label_rate(label: np.ndarray) -> float:
    return float(np.mean(label)) if len(label) else float("nan")


@dataclass(frozen=True)
class SplitStats:
    """Statistics of the training split for every split's rows (``parts`` = row indices of train, valid, test).

    ``keys_of(rows) -> Entries`` says which group(s) a row belongs to; ``catalogue=True`` adds a
    fourth output for the item catalogue (``self.catalogue`` entries), computed like eval rows.
    """

    parts: list[np.ndarray]
    train_label: np.ndarray
    folds: np.ndarray
    n_folds: int
    smoothing: float
    catalogue: Entries

    def _entries(self, keys_of: Callable[[np.ndarray], Entries], catalogue: bool) -> list[Entries]:
        return [keys_of(p) for p in self.parts] + ([self.catalogue] if catalogue else [])

    def mean(self, keys_of: Callable[[np.ndarray], Entries], *, catalogue: bool = False) -> list[np.ndarray]:
        """Smoothed mean label, out-of-fold for training rows (:func:`.common.target_mean`)."""
        train, *evals = self._entries(keys_of, catalogue)
        tr, ev = target_mean(train, self.train_label, self.folds, evals, n_folds=self.n_folds, smoothing=self.smoothing)
        return [tr, *ev]

    def count(
        self, keys_of: Callable[[np.ndarray], Entries], *, catalogue: bool = False, per_entry: bool = False
    ) -> list[np.ndarray]:
        """Log-scaled training-row count of each row's group(s); ``per_entry`` averages over a row's entries."""
        ents = self._entries(keys_of, catalogue)
        reference = float(np.unique(ents[0].key, return_counts=True)[1].max(initial=0))
        out = []
        for ent, c in zip(ents, group_count(ents[0], ents), strict=True):
            if per_entry:
                c = c / np.maximum(np.bincount(ent.row, minlength=ent.n_rows), 1)
            out.append(log_scale(c, reference))
        return out


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """Build a dataset in a sibling temp folder and swap it onto ``out`` only when complete.

    A crash leaves the previous dataset (if any) untouched. ``out`` must be missing, empty or a
    previous prerank dataset (has ``schema.json``), so a typo cannot wipe an unrelated folder.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "schema.json").exists())):
        raise RecipeError(f"--out {out} exists and is not a prerank dataset; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ------------------------------------------------------------------------- wide feature sets (FSCD, issue 22)

#: Feature sets a recipe can build: ``default`` (the documented columns) or ``wide`` (40+ fields of all four
#: FSCD cost types, for feature selection).
FEATURE_SETS: tuple[str, ...] = ("default", "wide")


def check_feature_set(features: str) -> None:
    if features not in FEATURE_SETS:
        raise RecipeError(f"unknown feature set {features!r}; choose one of {FEATURE_SETS}")


def fold_prior(label: np.ndarray, fold: np.ndarray, n_folds: int) -> tuple[np.ndarray, float]:
    """Mean training label without each training row's fold (``[n_train]``), and over all training rows.

    The prior of a smoothed rate: a training row's prior excludes its own fold, so even the prior does not
    depend on the row's own label (as in :func:`target_mean`); eval rows use the whole training mean.
    """
    label = np.asarray(label, dtype=np.float64)
    y_f = np.bincount(fold, weights=label, minlength=n_folds)
    n_f = np.bincount(fold, minlength=n_folds).astype(np.float64)
    prior_f = (y_f.sum() - y_f) / np.maximum(n_f.sum() - n_f, 1.0)
    return prior_f[fold], float(y_f.sum() / max(n_f.sum(), 1.0))


def smoothed_rate(positives: np.ndarray, count: np.ndarray, prior: np.ndarray | float, smoothing: float) -> np.ndarray:
    """``(positives + m * prior) / (count + m)`` as float32 (the recipes' smoothed rate, ``m = smoothing``)."""
    return ((positives + smoothing * np.asarray(prior)) / (count + smoothing)).astype(np.float32)


def last_before(
    query_group: np.ndarray, query_time: np.ndarray, event_group: np.ndarray, event_time: np.ndarray
) -> np.ndarray:
    """Per query: the time of its group's last event strictly before the query's time; -1 when there is none."""
    if len(event_group) == 0:
        return np.full(len(query_group), -1, dtype=np.int64)
    order, start, end, _ = _time_keys(query_group, query_time, event_group, event_time)
    times = np.asarray(event_time, dtype=np.int64)[order]
    return np.where(end > start, times[np.maximum(end - 1, 0)], -1).astype(np.int64)


def list_to_padded(values: pa.ListArray, width: int) -> np.ndarray:
    """An Arrow ``list<int>`` (at most ``width`` per row) as a left-aligned, 0-padded ``[n, width]`` int64 matrix."""
    offsets = np.asarray(values.offsets.to_numpy(), dtype=np.int64)
    flat = np.asarray(values.values.to_numpy(), dtype=np.int64)
    lengths = np.diff(offsets)
    if len(lengths) and lengths.max() > width:
        raise RecipeError(f"a list holds {lengths.max()} values, more than the width {width}")
    out = np.zeros((len(lengths), width), dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    out[rows, np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)] = flat
    return out


def cooccurrence(user: np.ndarray, item: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item-item co-occurrence over users: ``C[a, b]`` = users who have both ``a`` and ``b``.

    ``user``/``item`` are the (training) events counted, ``item`` in ``[0, n_items)``. Returns ``C``
    ``[n_items, n_items]`` float32, the binary user x item matrix ``B`` and the sorted user ids its rows stand for,
    so a caller can remove a user's own contribution ``B[u, a] B[u, b]`` (leave-own-user-out).
    """
    users, row = np.unique(user, return_inverse=True)
    b = np.zeros((len(users), n_items), dtype=np.float32)
    b[row.reshape(-1), item] = 1.0
    return b.T @ b, b, users


def history_cooccurrence(
    c: np.ndarray, b: np.ndarray, b_users: np.ndarray, user: np.ndarray, hist: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """Mean co-occurrence of the target with each history item, counting other users only: ``[n]`` float64.

    ``mean_h (C[h, t] - B[u, h] B[u, t])`` over the non-zero ``h`` of ``hist`` ``[n, L]`` (0 when empty). Removing
    the user's own contribution keeps a training row's label out of its own feature: whether ``u`` liked ``t`` is
    exactly ``B[u, t]``.
    """
    pos = np.clip(np.searchsorted(b_users, user), 0, max(len(b_users) - 1, 0))
    known = b_users[pos] == user if len(b_users) else np.zeros(len(user), dtype=bool)
    own = np.where(known[:, None], b[pos[:, None], hist] * b[pos, target][:, None], 0.0)
    mask = hist > 0
    values = (c[hist, target[:, None]] - own) * mask
    return values.sum(1) / np.maximum(mask.sum(1), 1)
