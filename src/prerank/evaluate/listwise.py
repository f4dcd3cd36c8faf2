"""Listwise evaluation on a cascade dataset: how well a pre-ranker orders each request's full list.

DESIGN.md "Definitions"; RankTower (ranktower.txt) Sec. 4.1.2 (Recall@K and NDCG@K, K = 100);
FSCD (fscd-feature-selection-prerank.txt) "recall rate" (cascade recall@(k=5, N)).

Every row of the split is scored with ``model(batch)`` on row batches. Per request, over the full
candidate list (impressions + rank / pre-rank candidates + random items):

* ``recall@K`` / ``ndcg@K``: graded relevance is ``label_level`` on positive rows (at least 1) and 0
  on every other row, so non-clicked impressions count as irrelevant whatever level a recipe gives
  exposures; without ``label_level`` the relevance is the binary label. Averaged over requests with
  a positive. K = 100 is the paper's; on lists shorter than K recall@K is 1 by construction, so
  ``list_len_mean`` is reported to show which K are informative here.
* ``hard_recall@K`` / ``hard_ndcg@K`` (when the ``stage`` column has unexposed rows): the same with
  RankTower's hard label as relevance (Sec. 3.2.1, 4.1.1): the graded relevance above + 1 on every
  impression, 0 on unexposed rows. Our reading of the paper's Recall@K, whose relevant items are
  those with a positive hard label: every exposed item counts, clicked ones weigh more in NDCG.
* ``cascade_recall@k/N``: share of the teacher's top ``k`` (by ``teacher_logit``) that the model keeps
  in its top ``N``; requests with at most ``N`` rows are skipped (they lose nothing).
* ``exposure_auc`` (when the ``stage`` column has unexposed rows): AUC of the scores separating
  impressions from unexposed rows, pooled over requests. A no-model scorer with a high value here
  (item popularity, see :func:`baseline_metrics`) marks a shortcut in the simulated cascade.
* ``auc``, ``gauc``, ``logloss`` on impression rows only: only they carry logged labels.

:func:`baseline_metrics` gives the same metrics for two scorers that learn nothing, to print beside
every cascade table: ``popularity`` (the item's training impressions) and ``teacher`` (the simulated
ranker's own ``teacher_logit``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from prerank.evaluate import metrics
from prerank.models.base import PreRanker
from prerank.schema import STAGES


def relevance(pred: dict[str, np.ndarray]) -> np.ndarray:
    """Graded relevance ``[B]``: ``max(label_level, 1)`` on positive rows, 0 elsewhere."""
    positive = pred["label"] > 0
    if "label_level" not in pred:
        return positive.astype(np.float64)
    return np.where(positive, np.maximum(pred["label_level"], 1), 0).astype(np.float64)


def hard_relevance(pred: dict[str, np.ndarray]) -> np.ndarray:
    """RankTower's hard label ``[B]``: :func:`relevance` + 1 on impressions, 0 on unexposed rows."""
    impression = pred["stage"] == STAGES.index("impression")
    return np.where(impression, relevance(pred) + 1.0, 0.0)


def _any_group_with_both_classes(labels: np.ndarray, groups: np.ndarray) -> bool:
    if not labels.size:
        return False
    _, inv, size = np.unique(groups, return_inverse=True, return_counts=True)
    pos = np.bincount(inv.reshape(-1), weights=labels > 0, minlength=len(size))
    return bool(((pos > 0) & (pos < size)).any())


def listwise_metrics(
    pred: dict[str, np.ndarray],
    *,
    ks: Sequence[int] = (10, 50, 100),
    cascade_k: int = 5,
    cascade_ns: Sequence[int] = (10, 50),
) -> dict[str, float]:
    """Metrics of row predictions ``pred`` (``logits``, ``label``, ``request_id`` ``[B]``; optionally
    ``label_level``, ``stage``, ``teacher_logit``) as one flat dict.

    Grouped metrics come with how many requests they used and skipped (``<name>_requests_used`` /
    ``_skipped``); a metric no request qualifies for is NaN.
    """
    for key in ("logits", "label", "request_id"):
        if key not in pred:
            raise ValueError(f"listwise evaluation needs {key!r} for every row")
    scores, groups = pred["logits"], pred["request_id"]
    rel = relevance(pred)
    sizes = np.unique(groups, return_counts=True)[1]
    out: dict[str, float] = {
        "rows": float(len(scores)),
        "requests": float(len(sizes)),
        "list_len_mean": float(sizes.mean()),
        "list_len_max": float(sizes.max()),
    }

    def grouped(name: str, qualifies: bool, fn: Callable[..., metrics.GroupedMetric], *args: object) -> None:
        if not qualifies:  # no request has what the metric needs (a positive, a long list): undefined
            out[name] = float("nan")
            return
        g = fn(*args)
        out[name] = g.value
        out[f"{name}_requests_used"] = float(g.n_groups_used)
        out[f"{name}_requests_skipped"] = float(g.n_groups_skipped)

    has_positive = bool((rel > 0).any())
    for k in ks:
        grouped(f"recall@{k}", has_positive, metrics.recall_at_k, rel, scores, groups, k)
        grouped(f"ndcg@{k}", has_positive, metrics.ndcg_at_k, rel, scores, groups, k)
    if "stage" in pred and (pred["stage"] != STAGES.index("impression")).any():  # else every row is relevant
        exposed = pred["stage"] == STAGES.index("impression")
        out["exposure_auc"] = metrics.auc(exposed.astype(np.float64), scores) if exposed.any() else float("nan")
        hard = hard_relevance(pred)
        for k in ks:
            grouped(f"hard_recall@{k}", bool((hard > 0).any()), metrics.recall_at_k, hard, scores, groups, k)
            grouped(f"hard_ndcg@{k}", bool((hard > 0).any()), metrics.ndcg_at_k, hard, scores, groups, k)
    if "teacher_logit" in pred:
        for n in cascade_ns:
            name = f"cascade_recall@{cascade_k}/{n}"
            grouped(
                name, bool(sizes.max() > n), metrics.cascade_recall, pred["teacher_logit"], scores, groups, cascade_k, n
            )

    imp = pred["stage"] == STAGES.index("impression") if "stage" in pred else np.ones(len(scores), dtype=bool)
    labels, logits, imp_groups = pred["label"][imp], scores[imp], groups[imp]
    out["impressions"] = float(imp.sum())
    both_classes = labels.size > 0 and labels.min() != labels.max()
    out["auc"] = metrics.auc(labels, logits) if both_classes else float("nan")
    out["logloss"] = metrics.logloss(labels, logits) if labels.size else float("nan")
    grouped("gauc", _any_group_with_both_classes(labels, imp_groups), metrics.gauc, labels, logits, imp_groups)
    return out


def evaluate_listwise(
    model: PreRanker,
    data_dir: str | Path,
    split: str = "test",
    *,
    ks: Sequence[int] = (10, 50, 100),
    cascade_k: int = 5,
    cascade_ns: Sequence[int] = (10, 50),
    batch_size: int = 16384,
) -> dict[str, float]:
    """Score every row of ``data_dir/split`` with ``model`` and return :func:`listwise_metrics`."""
    from prerank.train.trainer import predict  # the trainer validates with listwise_metrics: import late

    pred = predict(model, data_dir, split, batch_size)
    return listwise_metrics(pred, ks=ks, cascade_k=cascade_k, cascade_ns=cascade_ns)


def baseline_predictions(
    data_dir: str | Path, split: str = "test", *, item_field: str = "item_id"
) -> dict[str, dict[str, np.ndarray]]:
    """Row predictions of two scorers that learn nothing, on ``data_dir/split`` (a cascade dataset).

    ``popularity``: ``log1p`` of the item's impressions in the training split (ties broken by nothing);
    ``teacher``: the row's ``teacher_logit`` (the simulated ranker itself, so its cascade recall is 1).
    """
    import pyarrow.parquet as pq

    from prerank.data.parquet import DataError, ParquetSplit

    reserved = ["label", "request_id", "label_level", "stage", "teacher_logit"]

    def read(name: str) -> dict[str, np.ndarray]:
        files = ParquetSplit(data_dir, name).files
        present = set(pq.read_schema(files[0]).names)
        if item_field not in present or "teacher_logit" not in present:
            raise DataError(f"{data_dir}/{name} needs {item_field!r} and 'teacher_logit' (a cascade dataset)")
        table = pq.read_table(files, columns=[c for c in [item_field, *reserved] if c in present])
        return {c: table.column(c).to_numpy() for c in table.column_names}

    train, rows = read("train"), read(split)
    shown = train["stage"] == STAGES.index("impression") if "stage" in train else slice(None)
    counts = np.bincount(train[item_field][shown], minlength=int(rows[item_field].max()) + 1)
    base = {k: v for k, v in rows.items() if k != item_field}
    popularity = np.log1p(counts[rows[item_field]]).astype(np.float64)
    return {
        "popularity": {**base, "logits": popularity},
        "teacher": {**base, "logits": rows["teacher_logit"].astype(np.float64)},
    }


def baseline_metrics(
    data_dir: str | Path,
    split: str = "test",
    *,
    item_field: str = "item_id",
    ks: Sequence[int] = (10, 50, 100),
    cascade_k: int = 5,
    cascade_ns: Sequence[int] = (10, 50),
) -> dict[str, dict[str, float]]:
    """:func:`listwise_metrics` of each scorer of :func:`baseline_predictions`."""
    preds = baseline_predictions(data_dir, split, item_field=item_field)
    return {
        name: listwise_metrics(pred, ks=ks, cascade_k=cascade_k, cascade_ns=cascade_ns) for name, pred in preds.items()
    }


__all__ = [
    "baseline_metrics",
    "baseline_predictions",
    "evaluate_listwise",
    "hard_relevance",
    "listwise_metrics",
    "relevance",
]
