"""Metrics against hand-computed values and scikit-learn, with ties, degenerate requests and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

from prerank.evaluate.metrics import (
    GroupedMetric,
    auc,
    cascade_recall,
    gauc,
    logloss,
    ndcg_at_k,
    recall_at_k,
    relaimpr,
)


def _random_requests(seed: int, n_groups: int = 40, max_len: int = 12, levels: int = 4) -> tuple[np.ndarray, ...]:
    """Graded relevance, coarse (tie-heavy) scores and request ids for ``n_groups`` requests of random length."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_len + 1, n_groups)
    groups = np.repeat(rng.permutation(n_groups) * 7 + 3, sizes)  # non-contiguous, unsorted ids
    perm = rng.permutation(len(groups))  # interleave requests: metrics must not assume sorted input
    rel = rng.integers(0, levels, len(groups)).astype(float) * (rng.random(len(groups)) < 0.4)
    scores = np.round(rng.normal(size=len(groups)) + 0.5 * rel, 1)
    return rel[perm], scores[perm], groups[perm]


# ----------------------------------------------------------------------------------- AUC / logloss


def test_auc_hand_computed_with_ties() -> None:
    # pairs (pos, neg): (0.8>0.3) 1, (0.8>0.5) 1, (0.5=0.5) 0.5, (0.5>0.3) 1 -> 3.5 / 4
    assert auc([1, 0, 1, 0], [0.8, 0.3, 0.5, 0.5]) == pytest.approx(0.875)
    assert auc([0, 1], [2.0, 1.0]) == 0.0
    assert auc([1, 1, 0, 0], [0.1, 0.1, 0.1, 0.1]) == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)  # many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_accepts_lists_bools_and_tensors() -> None:
    y, s = [True, False, True], [3, 1, 2]
    assert auc(y, s) == 1.0
    assert auc(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([3.0, 1.0, 2.0])) == 1.0


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([], [], "labels is empty"),
        ([1, 0], [0.1], "different lengths"),
        ([1, 0], [0.1, float("nan")], "scores contains NaN"),
        ([1, 1], [0.1, 0.2], "single class"),
        ([1, 2], [0.1, 0.2], "labels must be 0 or 1"),
        ([[1, 0]], [[0.1, 0.2]], "one-dimensional"),
    ],
)
def test_auc_rejects_bad_input(labels: list, scores: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        auc(labels, scores)


def test_logloss_matches_sklearn_and_is_stable() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    z = rng.normal(scale=3, size=300)
    p = 1 / (1 + np.exp(-z))
    assert logloss(y, z) == pytest.approx(log_loss(y, p), rel=1e-9)
    assert logloss(y, p, probabilities=True) == pytest.approx(log_loss(y, p), rel=1e-9)
    # huge logits: exact from logits (sigmoid would round to 1.0 and give log(0))
    assert logloss([1, 0], [200.0, -200.0]) == pytest.approx(math.exp(-200))
    assert logloss([0], [200.0]) == pytest.approx(200.0)
    assert logloss([1, 0], [0.0, 0.0]) == pytest.approx(math.log(2))


def test_logloss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="probabilities must lie in"):
        logloss([1, 0], [1.2, 0.1], probabilities=True)
    with pytest.raises(ValueError, match="logits contains NaN"):
        logloss([1, 0], [float("nan"), 0.1])
    with pytest.raises(ValueError, match="labels is empty"):
        logloss([], [])


# ----------------------------------------------------------------------------------- GAUC


def test_gauc_hand_computed_skips_single_class_requests() -> None:
    labels = [1, 0, 0, 1, 0, 1, 1, 0]
    scores = [0.9, 0.1, 0.5, 0.2, 0.3, 0.4, 0.6, 0.7]
    groups = ["a", "a", "a", "b", "b", "c", "c", "d"]
    # a: n=3, AUC 1; b: n=2, AUC 0; c: all positive, skipped; d: single item, skipped
    out = gauc(labels, scores, groups)
    assert out == GroupedMetric(value=(3 * 1.0 + 2 * 0.0) / 5, n_groups_used=2, n_groups_skipped=2)
    assert out["n_groups_skipped"] == 2 and out.to_dict()["value"] == out.value


def test_gauc_matches_per_request_sklearn() -> None:
    rel, scores, groups = _random_requests(1, n_groups=200)
    labels = (rel > 0).astype(int)
    num = den = 0.0
    used = 0
    for g in np.unique(groups):
        m = groups == g
        if labels[m].min() != labels[m].max():
            num += m.sum() * roc_auc_score(labels[m], scores[m])
            den += m.sum()
            used += 1
    out = gauc(labels, scores, groups)
    assert out.value == pytest.approx(num / den, abs=1e-12)
    assert (out.n_groups_used, out.n_groups_skipped) == (used, 200 - used)


def test_gauc_raises_when_no_request_has_both_classes() -> None:
    with pytest.raises(ValueError, match="no request has both"):
        gauc([1, 0], [0.3, 0.2], [1, 2])


def test_gauc_is_fast_for_many_requests() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 100_000, 400_000)
    y = rng.integers(0, 2, 400_000)
    out = gauc(y, rng.random(400_000), groups)  # a Python loop over 100k requests would take seconds
    assert 0.45 < out.value < 0.55
    assert out.n_groups_used + out.n_groups_skipped == len(np.unique(groups))


def test_relaimpr() -> None:
    assert relaimpr(0.75, 0.7) == pytest.approx(25.0)
    assert relaimpr(0.7, 0.7) == 0.0
    with pytest.raises(ValueError, match="auc_base is 0.5"):
        relaimpr(0.7, 0.5)
    with pytest.raises(ValueError, match="auc_model"):
        relaimpr(1.5, 0.7)


# ----------------------------------------------------------------------------------- Recall@K / NDCG@K


def test_recall_at_k_hand_computed() -> None:
    rel = [2, 0, 1, 0, 0, 1, 0]
    scores = [0.9, 0.8, 0.1, 0.5, 0.3, 0.2, 0.1]
    groups = [1, 1, 1, 1, 2, 2, 3]
    # request 1: positives at ranks 1 and 4 -> top-2 holds 1 of 2; request 2: positive ranked 2nd -> 0 of 1
    # request 3: no positive, skipped
    out = recall_at_k(rel, scores, groups, k=1)
    assert out == GroupedMetric(value=(0.5 + 0.0) / 2, n_groups_used=2, n_groups_skipped=1)
    assert recall_at_k(rel, scores, groups, k=2).value == pytest.approx((0.5 + 1.0) / 2)
    assert recall_at_k(rel, scores, groups, k=100).value == 1.0  # k beyond the list keeps everything


def test_recall_at_k_counts_ties_in_expectation() -> None:
    # one positive tied with two negatives for 2 top slots: expected recall 2/3
    assert recall_at_k([1, 0, 0], [0.5, 0.5, 0.5], [0, 0, 0], k=2).value == pytest.approx(2 / 3)


def test_ndcg_hand_computed() -> None:
    rel = [3, 2, 0, 1]
    scores = [0.1, 0.9, 0.5, 0.3]  # ranked: rel 2, 0, 1, 3
    dcg = 3 / math.log2(2) + 0 + 1 / math.log2(4) + 7 / math.log2(5)
    idcg = 7 / math.log2(2) + 3 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(rel, scores, [5] * 4, k=4).value == pytest.approx(dcg / idcg)
    assert ndcg_at_k(rel, scores, [5] * 4, k=1).value == pytest.approx(3 / 7)


@pytest.mark.parametrize(("seed", "k"), [(0, 1), (1, 3), (2, 5), (3, 50)])
def test_ndcg_matches_sklearn_per_request(seed: int, k: int) -> None:
    rel, scores, groups = _random_requests(seed)
    expected, skipped = [], 0
    for g in np.unique(groups):
        m = groups == g
        if rel[m].max() == 0:
            skipped += 1
            continue
        gains, s = np.exp2(rel[m]) - 1, scores[m]
        expected.append(1.0 if m.sum() == 1 else ndcg_score(gains[None], s[None], k=k))
    out = ndcg_at_k(rel, scores, groups, k)
    assert out.value == pytest.approx(np.mean(expected), abs=1e-12)
    assert (out.n_groups_used, out.n_groups_skipped) == (len(expected), skipped)


def test_single_item_requests() -> None:
    assert ndcg_at_k([2], [0.1], [0], k=3) == GroupedMetric(1.0, 1, 0)
    assert recall_at_k([1, 0], [0.1, 0.4], [0, 1], k=1) == GroupedMetric(1.0, 1, 1)


def test_topk_metrics_ignore_row_order() -> None:
    rel, scores, groups = _random_requests(4)
    perm = np.random.default_rng(9).permutation(len(rel))
    for fn in (recall_at_k, ndcg_at_k):
        a, b = fn(rel, scores, groups, 3), fn(rel[perm], scores[perm], groups[perm], 3)
        assert a.value == pytest.approx(b.value, abs=1e-12)
        assert (a.n_groups_used, a.n_groups_skipped) == (b.n_groups_used, b.n_groups_skipped)


def test_topk_metrics_reject_bad_input() -> None:
    for bad_k in (0, 2.5, "3", None):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            recall_at_k([1], [0.1], [0], k=bad_k)
    with pytest.raises(ValueError, match="relevance must be finite and >= 0"):
        ndcg_at_k([-1, 1], [0.1, 0.2], [0, 0], k=1)
    with pytest.raises(ValueError, match="different lengths"):
        ndcg_at_k([1, 0], [0.1, 0.2], [0], k=1)
    with pytest.raises(ValueError, match="undefined"):
        recall_at_k([0, 0], [0.1, 0.2], [0, 0], k=1)


# ----------------------------------------------------------------------------------- cascade recall


def test_cascade_recall_hand_computed() -> None:
    teacher = [9, 8, 7, 6, 5, 1, 2, 3]
    model = [9, 1, 7, 6, 5, 3, 2, 1]
    groups = [0, 0, 0, 0, 0, 1, 1, 1]
    # request 0: teacher top-2 = {0, 1}; model top-3 = {0, 2, 3} keeps 1 of 2
    # request 1: 3 candidates <= n = 3, nothing is cut -> skipped
    assert cascade_recall(teacher, model, groups, k=2, n=3) == GroupedMetric(0.5, 1, 1)
    assert cascade_recall(teacher, teacher, groups, k=2, n=2).value == 1.0


def test_cascade_recall_against_brute_force_without_ties() -> None:
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(30), 20)
    teacher, model = rng.normal(size=600), rng.normal(size=600)
    expected = []
    for g in range(30):
        m = groups == g
        top_t = set(np.argsort(-teacher[m])[:5])
        top_m = set(np.argsort(-model[m])[:10])
        expected.append(len(top_t & top_m) / 5)
    assert cascade_recall(teacher, model, groups, k=5, n=10).value == pytest.approx(np.mean(expected))


def test_cascade_recall_ties_in_expectation_and_errors() -> None:
    # the model ties all 4 items and keeps 2: each teacher-top item survives with probability 1/2
    assert cascade_recall([4, 3, 2, 1], [0, 0, 0, 0], [0] * 4, k=1, n=2).value == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must not exceed n"):
        cascade_recall([1, 2], [1, 2], [0, 0], k=3, n=2)
