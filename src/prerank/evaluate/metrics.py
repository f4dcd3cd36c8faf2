"""Ranking and classification metrics as pure, vectorised NumPy functions (DESIGN.md "Definitions").

Every function accepts array-likes (lists, NumPy arrays, CPU tensors), checks them and raises
:class:`ValueError` naming the argument on empty input, mismatched lengths, NaN, or a metric that is
undefined on the data (AUC of a single class). Per-request metrics sort once by (request, score) and
reduce with ``bincount``; there is no Python loop over requests, so 100k+ requests take milliseconds.

Ties in scores are never broken by input order: a run of tied items shares the positions it
occupies, and each item gets the run's average rank (AUC, as the Mann-Whitney statistic does) or
the run's average share of top-K slots and DCG discounts (Recall@K, NDCG@K, cascade recall), i.e.
the expected value under random tie-breaking -- the convention of scikit-learn's ``ndcg_score``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from numbers import Integral

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "GroupedMetric",
    "auc",
    "cascade_recall",
    "gauc",
    "logloss",
    "ndcg_at_k",
    "recall_at_k",
    "relaimpr",
]


@dataclass(frozen=True)
class GroupedMetric:
    """A metric averaged over requests, with how many requests it could and could not be computed on.

    Fields read as attributes (``g.value``) or as keys (``g["value"]``).
    """

    value: float
    n_groups_used: int
    n_groups_skipped: int

    def __getitem__(self, key: str) -> float | int:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


# ----------------------------------------------------------------------------------- checks


def _vector(name: str, x: ArrayLike, *, dtype: type | None = np.float64) -> np.ndarray:
    try:
        arr = np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric: {e}") from e
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if dtype is not None and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arguments have different lengths: {lengths}")


def _binary(name: str, labels: ArrayLike) -> np.ndarray:
    y = _vector(name, labels)
    if not np.isin(y, (0.0, 1.0)).all():
        bad = np.unique(y[~np.isin(y, (0.0, 1.0))])[:5]
        raise ValueError(f"{name} must be 0 or 1, found {bad.tolist()}")
    return y


def _relevance(name: str, relevance: ArrayLike) -> np.ndarray:
    rel = _vector(name, relevance)
    if (rel < 0).any() or not np.isfinite(rel).all():
        raise ValueError(f"{name} must be finite and >= 0 (graded relevance, 0 = not relevant)")
    return rel


def _group_codes(groups: ArrayLike) -> tuple[np.ndarray, int]:
    """Dense group codes ``0..G-1`` for any sortable group ids, and ``G``."""
    g = _vector("groups", groups, dtype=None)
    if g.dtype.kind == "f" and np.isnan(g).any():
        raise ValueError("groups contains NaN")
    uniques, codes = np.unique(g, return_inverse=True)
    return codes.reshape(-1), len(uniques)


def _positive_int(name: str, k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


# ----------------------------------------------------------------------------------- ranking core


@dataclass(frozen=True)
class _Ranked:
    """Rows sorted by (group, score descending) with tie runs and positions inside each group.

    ``order`` sorts the input; ``pos`` is the 0-based position inside the group (sorted order);
    ``run_first``/``run_size`` give each sorted row the first position and the size of its tie run.
    """

    order: np.ndarray
    group: np.ndarray
    pos: np.ndarray
    run_first: np.ndarray
    run_size: np.ndarray
    group_size: np.ndarray


def _rank(scores: np.ndarray, codes: np.ndarray, n_groups: int) -> _Ranked:
    order = np.lexsort((-scores, codes))
    g, s = codes[order], scores[order]
    n = len(order)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    new_run = new_group.copy()
    new_run[1:] |= s[1:] != s[:-1]
    group_size = np.bincount(codes, minlength=n_groups)
    group_start = np.concatenate(([0], np.cumsum(group_size)[:-1]))
    pos = np.arange(n) - group_start[g]
    run_id = np.cumsum(new_run) - 1
    run_starts = np.flatnonzero(new_run)
    run_sizes = np.diff(np.append(run_starts, n))
    run_first = pos[run_starts][run_id]
    return _Ranked(order, g, pos, run_first, run_sizes[run_id], group_size)


def _run_average(values_by_pos: np.ndarray, r: _Ranked) -> np.ndarray:
    """Per sorted row, the average of ``values_by_pos[p]`` over the positions ``p`` its tie run spans."""
    cum = np.concatenate(([0.0], np.cumsum(values_by_pos)))
    return (cum[r.run_first + r.run_size] - cum[r.run_first]) / r.run_size


# ----------------------------------------------------------------------------------- classification


def _auc_by_group(y: np.ndarray, scores: np.ndarray, codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, ...]:
    """Per group: AUC (NaN where one class is missing), group size, positives."""
    r = _rank(scores, codes, n_groups)
    # average rank in ascending score order = n_g - (average descending position)
    desc_pos = r.run_first + (r.run_size - 1) / 2.0
    asc_rank = r.group_size[r.group] - desc_pos
    y_sorted = y[r.order]
    n_pos = np.bincount(r.group, weights=y_sorted, minlength=n_groups)
    n_neg = r.group_size - n_pos
    rank_sum = np.bincount(r.group, weights=asc_rank * y_sorted, minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_group = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    per_group[(n_pos == 0) | (n_neg == 0)] = np.nan
    return per_group, r.group_size, n_pos


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    Equal to ``sklearn.metrics.roc_auc_score``. ``labels`` ``[B]`` in {0, 1}; ``scores`` ``[B]``
    any monotone score (logits or probabilities). Raises if only one class is present.
    """
    y = _binary("labels", labels)
    s = _vector("scores", scores)
    _same_length(labels=y, scores=s)
    if y.min() == y.max():
        raise ValueError("AUC is undefined when labels contain a single class")
    per_group, _, _ = _auc_by_group(y, s, np.zeros(len(y), dtype=np.int64), 1)
    return float(per_group[0])


def logloss(labels: ArrayLike, logits: ArrayLike, *, probabilities: bool = False) -> float:
    """Mean binary cross-entropy, computed stably from logits.

    ``mean(softplus(z) - y * z)`` never forms ``sigmoid(z)``, so logits of +-50 lose nothing. With
    ``probabilities=True`` the second argument is ``P(y=1)`` in [0, 1] instead, clipped to
    ``[eps, 1 - eps]`` (float64 machine epsilon) as scikit-learn's ``log_loss`` does.
    Shapes: ``labels`` ``[B]`` in {0, 1}, ``logits`` ``[B]``.
    """
    y = _binary("labels", labels)
    z = _vector("probabilities" if probabilities else "logits", logits)
    _same_length(labels=y, logits=z)
    if probabilities:
        if (z < 0).any() or (z > 1).any():
            raise ValueError("probabilities must lie in [0, 1]")
        eps = np.finfo(np.float64).eps
        p = np.clip(z, eps, 1 - eps)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def gauc(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> GroupedMetric:
    """Group AUC: ``sum_g n_g * AUC_g / sum_g n_g`` over requests ``g`` that have both classes.

    The impression-weighted GAUC of DIN (Zhou et al., KDD 2018, "Metrics") with requests as groups.

    ``n_g`` is the number of rows of request ``g`` (its impressions when the caller passes
    impressions only). Requests with a single class have no AUC and are counted in
    ``n_groups_skipped``; if every request is skipped the value is undefined and this raises.
    Shapes: all ``[B]``; ``groups`` are request ids of any sortable type.
    """
    y = _binary("labels", labels)
    s = _vector("scores", scores)
    codes, n_groups = _group_codes(groups)
    _same_length(labels=y, scores=s, groups=codes)
    per_group, size, _ = _auc_by_group(y, s, codes, n_groups)
    used = ~np.isnan(per_group)
    if not used.any():
        raise ValueError("GAUC is undefined: no request has both a positive and a negative label")
    value = float(np.sum(per_group[used] * size[used]) / np.sum(size[used]))
    return GroupedMetric(value, int(used.sum()), int((~used).sum()))


def relaimpr(auc_model: float, auc_base: float) -> float:
    """RelaImpr in percent: ``((AUC_model - 0.5) / (AUC_base - 0.5) - 1) * 100`` (DIN, Zhou et al., KDD 2018).

    The base is Two-Tower unless the caller says otherwise (DESIGN.md "Definitions").
    """
    for name, v in (("auc_model", auc_model), ("auc_base", auc_base)):
        if not np.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be an AUC in [0, 1], got {v!r}")
    if auc_base == 0.5:
        raise ValueError("auc_base is 0.5 (a random model); RelaImpr is undefined")
    return float(((auc_model - 0.5) / (auc_base - 0.5) - 1.0) * 100.0)


# ----------------------------------------------------------------------------------- top-K


def _topk_share(r: _Ranked, k: int) -> np.ndarray:
    """Per sorted row, its expected membership of the group's top ``k`` under random tie-breaking."""
    in_top = (np.arange(int(r.group_size.max())) < k).astype(np.float64)
    return _run_average(in_top, r)


def recall_at_k(relevance: ArrayLike, scores: ArrayLike, groups: ArrayLike, k: int) -> GroupedMetric:
    """Recall@K: per request, the share of its positives (``relevance > 0``) ranked in its top ``k``.

    Computed over each request's full candidate list and averaged (unweighted) over requests with
    at least one positive; requests without one are skipped and counted. A ``k`` larger than a
    request's list keeps the whole list (recall 1). Shapes: all ``[B]``.
    """
    k = _positive_int("k", k)
    rel = _relevance("relevance", relevance)
    s = _vector("scores", scores)
    codes, n_groups = _group_codes(groups)
    _same_length(relevance=rel, scores=s, groups=codes)
    r = _rank(s, codes, n_groups)
    pos = (rel[r.order] > 0).astype(np.float64)
    hits = np.bincount(r.group, weights=pos * _topk_share(r, k), minlength=n_groups)
    n_pos = np.bincount(r.group, weights=pos, minlength=n_groups)
    return _mean_over(hits, n_pos, n_pos > 0, "recall_at_k")


def ndcg_at_k(relevance: ArrayLike, scores: ArrayLike, groups: ArrayLike, k: int) -> GroupedMetric:
    """NDCG@K per request with gain ``2^rel - 1`` and discount ``1 / log2(position + 1)`` (positions from 1).

    Jarvelin and Kekalainen (TOIS 2002) with the exponential gain of Burges et al. (ICML 2005).

    ``DCG@K = sum_{p <= K} (2^rel_p - 1) / log2(p + 1)``; IDCG@K is the DCG of the request sorted by
    relevance. Averaged (unweighted) over requests with at least one ``relevance > 0``; the rest
    are skipped and counted. Tied scores share their positions' discounts (scikit-learn's
    ``ndcg_score`` with ``ignore_ties=False`` fed ``2^rel - 1`` as its linear gains gives the same
    per-request value). Shapes: all ``[B]``.
    """
    k = _positive_int("k", k)
    rel = _relevance("relevance", relevance)
    s = _vector("scores", scores)
    codes, n_groups = _group_codes(groups)
    _same_length(relevance=rel, scores=s, groups=codes)
    gain = np.exp2(rel) - 1.0
    longest = int(np.bincount(codes).max())
    discount = np.where(np.arange(longest) < k, 1.0 / np.log2(np.arange(longest) + 2.0), 0.0)
    r = _rank(s, codes, n_groups)
    dcg = np.bincount(r.group, weights=gain[r.order] * _run_average(discount, r), minlength=n_groups)
    ideal = _rank(rel, codes, n_groups)  # ties in relevance have equal gains, so their order is moot
    idcg = np.bincount(ideal.group, weights=gain[ideal.order] * discount[ideal.pos], minlength=n_groups)
    return _mean_over(dcg, idcg, idcg > 0, "ndcg_at_k")


def cascade_recall(
    teacher_scores: ArrayLike, model_scores: ArrayLike, groups: ArrayLike, k: int = 5, n: int = 100
) -> GroupedMetric:
    """Cascade recall@(k, N): share of the teacher's top ``k`` that the model keeps in its top ``n``.

    The FSCD paper's "recall rate" (Sec. 3.3, Table 4: k = 5, teacher = the ranking model), averaged
    over requests. A request with at most ``n`` candidates loses nothing in pre-ranking, so the
    metric says nothing about the model there: such requests are skipped and counted. Ties on
    either side count in expectation under random tie-breaking. Requires ``1 <= k <= n``.
    Shapes: all ``[B]``.
    """
    k, n = _positive_int("k", k), _positive_int("n", n)
    if k > n:
        raise ValueError(f"k ({k}) must not exceed n ({n}): the model keeps n items, recall of k > n is capped")
    t = _vector("teacher_scores", teacher_scores)
    m = _vector("model_scores", model_scores)
    codes, n_groups = _group_codes(groups)
    _same_length(teacher_scores=t, model_scores=m, groups=codes)
    rt, rm = _rank(t, codes, n_groups), _rank(m, codes, n_groups)
    in_teacher = np.empty(len(t))
    in_teacher[rt.order] = _topk_share(rt, k)
    in_model = np.empty(len(m))
    in_model[rm.order] = _topk_share(rm, n)
    kept = np.bincount(codes, weights=in_teacher * in_model, minlength=n_groups)
    wanted = np.bincount(codes, weights=in_teacher, minlength=n_groups)
    return _mean_over(kept, wanted, rt.group_size > n, "cascade_recall")


def _mean_over(num: np.ndarray, den: np.ndarray, used: np.ndarray, name: str) -> GroupedMetric:
    if not used.any():
        raise ValueError(f"{name} is undefined: no request qualifies (see the docstring for which are skipped)")
    value = float(np.mean(num[used] / den[used]))
    return GroupedMetric(value, int(used.sum()), int((~used).sum()))
