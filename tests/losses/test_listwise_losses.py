"""Listwise ranking losses: hand-checked values, gradients, ties, single-item lists, no positives, padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score

from prerank.data.batch import Batch
from prerank.losses.listwise import (
    am_rankmax,
    approx_ndcg,
    rankmax,
    ranknet,
    softmax_cross_entropy,
    softsort_loss,
    to_lists,
)

LOSSES = [softmax_cross_entropy, ranknet, approx_ndcg, rankmax, am_rankmax, softsort_loss]
ids = [f.__name__ for f in LOSSES]


def t(*rows: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def test_to_lists_inverts_batch_flat() -> None:
    mask = torch.tensor([[True, False, True], [False, True, True]])
    values = torch.arange(6.0).reshape(2, 3)
    batch = Batch(features={"x": values}, label=values, mask=mask)
    flat = batch.flat().features["x"].clone().requires_grad_(True)
    lists = to_lists(flat, mask, fill=-1.0)
    assert torch.equal(lists, torch.tensor([[0.0, -1.0, 2.0], [-1.0, 4.0, 5.0]]))
    lists.sum().backward()
    assert torch.equal(flat.grad, torch.ones(4))


def test_to_lists_rejects_mismatch() -> None:
    mask = torch.tensor([[True, False]])
    with pytest.raises(ValueError, match="valid slots"):
        to_lists(torch.zeros(2), mask)
    with pytest.raises(ValueError, match="mask"):
        to_lists(torch.zeros(1), mask.long())


def test_softmax_cross_entropy_values() -> None:
    # one positive, logits (0, ln 2): softmax = (1/3, 2/3)
    assert softmax_cross_entropy(t([0.0, math.log(2.0)]), t([1.0, 0.0])).item() == pytest.approx(math.log(3.0))
    # graded labels normalised: (2, 2, 0) -> (1/2, 1/2, 0); uniform logits -> log 3
    assert softmax_cross_entropy(torch.zeros(1, 3), t([2.0, 2.0, 0.0])).item() == pytest.approx(math.log(3.0))
    # temperature divides the logits
    a = softmax_cross_entropy(t([2.0, 0.0, -1.0]), t([1.0, 0.0, 2.0]), temperature=2.0)
    b = softmax_cross_entropy(t([1.0, 0.0, -0.5]), t([1.0, 0.0, 2.0]))
    assert a.item() == pytest.approx(b.item())


def test_ranknet_values_and_ties() -> None:
    assert ranknet(t([1.0, 0.0]), t([1.0, 0.0])).item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert ranknet(t([1.0, 0.0]), t([0.0, 1.0]), sigma=2.0).item() == pytest.approx(math.log1p(math.exp(2.0)))
    # three ordered pairs, equal logits: mean over pairs = log 2
    assert ranknet(torch.zeros(1, 3), t([2.0, 1.0, 0.0])).item() == pytest.approx(math.log(2.0))
    # tied labels form no pair: only (0 > 2) and (1 > 2) count
    z = t([3.0, -1.0, 0.0])
    expected = (math.log1p(math.exp(-3.0)) + math.log1p(math.exp(1.0))) / 2
    assert ranknet(z, t([1.0, 1.0, 0.0])).item() == pytest.approx(expected)


def test_approx_ndcg_value_and_sharp_limit() -> None:
    # two items, equal logits: smooth rank of the positive is 1 + sigmoid(0) = 1.5
    value = approx_ndcg(torch.zeros(1, 2), t([1.0, 0.0]), temperature=1.0)
    assert value.item() == pytest.approx(1.0 - 1.0 / math.log2(2.5))
    # a sharp sigmoid recovers exact NDCG (binary gains: 2^y - 1 = y, sklearn's linear gain)
    rng = np.random.default_rng(0)
    scores = rng.permutation(8).astype(np.float32)
    labels = np.array([[1, 0, 0, 1, 0, 1, 0, 0]], dtype=np.float32)
    exact = ndcg_score(labels, scores[None])
    got = approx_ndcg(torch.from_numpy(scores[None]), torch.from_numpy(labels), temperature=1e-3)
    assert got.item() == pytest.approx(1.0 - exact, abs=1e-5)


def test_rankmax_values() -> None:
    z = t([0.0, 0.5, -2.0])
    # j = 0: self 1 + (0.5 + 1) + (-2 + 1)_+ = 2.5
    assert rankmax(z, t([1.0, 0.0, 0.0])).item() == pytest.approx(math.log(2.5))
    # two positives are summed: j = 1: (0 - 0.5 + 1) + 1 + 0 = 1.5
    assert rankmax(z, t([1.0, 1.0, 0.0])).item() == pytest.approx(math.log(2.5) + math.log(1.5))
    # every margin satisfied -> 0
    assert rankmax(t([5.0, 0.0, -1.0]), t([1.0, 0.0, 0.0])).item() == pytest.approx(0.0)


def test_am_rankmax_values() -> None:
    # y = (2, 1, 0), z = 0, alpha = 0.5, beta = 1, p = 1:
    # j=0: i=1 margin 0 + 1 = 1, i=2 margin 0.5 + 2 = 2.5 -> log(1 + 3.5); j=1: i=2 margin 1.5 -> log(2.5)
    got = am_rankmax(torch.zeros(1, 3), t([2.0, 1.0, 0.0]), alpha=0.5, beta=1.0, power=1.0)
    assert got.item() == pytest.approx(math.log(4.5) + math.log(2.5))
    # power 0: constant delta = beta for every ordered pair
    got = am_rankmax(torch.zeros(1, 3), t([3.0, 1.0, 0.0]), alpha=0.0, beta=2.0, power=0.0)
    assert got.item() == pytest.approx(math.log(1 + 2 + 2) + math.log(1 + 2))
    # margins satisfied: exactly 0, not log(0) = -inf, and a finite gradient
    z = t([10.0, 0.0]).requires_grad_(True)
    loss = am_rankmax(z, t([1.0, 0.0]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def test_am_rankmax_pushes_the_items_with_the_largest_margins_least() -> None:
    """Eq. 14 as written: d/dz_j of log(1 + sum_i hinge) is n_active / (1 + sum of margins) at z = 0.

    A clicked impression (y = 3) above 10 shown ones (y = 1, margin 2) and 38 unexposed items (margin
    4): 48 / 173; a shown one above the 38 (margin 2): 38 / 77, less the 1 / 173 with which the
    clicked item's term pulls it down. So the clicked item gets the smaller
    push, the property our cascade results trace their click inversion to (docs/results.md).
    """
    y = t([3.0] + [1.0] * 10 + [0.0] * 38)
    z = torch.zeros_like(y, requires_grad=True)
    am_rankmax(z, y).backward()
    assert -z.grad[0, 0].item() == pytest.approx(48 / 173, rel=1e-5)
    assert -z.grad[0, 1].item() == pytest.approx(38 / 77 - 1 / 173, rel=1e-5)


def test_am_rankmax_reduces_to_rankmax_with_one_positive() -> None:
    """alpha = 0, delta = 1: with a single positive there are no positive-positive pairs, so Eq. 14 = Eq. 12."""
    z = torch.randn(4, 6)
    y = torch.zeros(4, 6)
    y[torch.arange(4), torch.tensor([0, 3, 5, 1])] = 1.0
    expected = rankmax(z, y, margin=1.0)
    assert am_rankmax(z, y, alpha=0.0, beta=1.0, power=0.0).item() == pytest.approx(expected.item())


def _softsort_reference(z: list[float], y: list[float], tau: float, p: float) -> float:
    """Eq. 10-11 literally, with loops, for one list."""

    def soft(s: list[float]) -> np.ndarray:
        ranked = sorted(s, reverse=True)
        m = np.array([[-(abs(r - si) ** p) / tau for si in s] for r in ranked])
        m = np.exp(m - m.max(1, keepdims=True))
        return m / m.sum(1, keepdims=True)

    return float(-(soft(y) * np.log(soft(z))).sum())


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_softsort_matches_eq_10_11(power: float) -> None:
    # hand check of the 2-item case: P_y = [[e, 1], [1, e]] / (1 + e); P_z for z = (2, 0)
    e = math.e
    py = np.array([[e, 1], [1, e]]) / (1 + e)
    pz = np.array([[1, e**-2], [e**-2, 1]]) / (1 + e**-2)
    hand = float(-(py * np.log(pz)).sum())
    assert softsort_loss(t([2.0, 0.0]), t([1.0, 0.0])).item() == pytest.approx(hand, rel=1e-6)
    rng = np.random.default_rng(1)
    z = rng.normal(size=6).round(3).tolist()
    y = [2.0, 0.0, 1.0, 0.0, 1.0, 3.0]  # graded with ties
    got = softsort_loss(t(z, dtype=torch.float64), t(y, dtype=torch.float64), temperature=0.7, power=power)
    assert got.item() == pytest.approx(_softsort_reference(z, y, 0.7, power), rel=1e-9)


def test_softsort_prefers_the_label_order() -> None:
    y = t([3.0, 2.0, 1.0, 0.0])
    good = softsort_loss(t([3.0, 2.0, 1.0, 0.0]), y)
    bad = softsort_loss(t([0.0, 1.0, 2.0, 3.0]), y)
    assert good < bad
    # label_temperature sharpens only the target
    sharp = softsort_loss(t([3.0, 2.0, 1.0, 0.0]), y, label_temperature=0.1)
    assert sharp.item() != pytest.approx(good.item())


@pytest.mark.parametrize("fn", LOSSES, ids=ids)
def test_gradcheck_float64(fn) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    z = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)  # distinct values, away from hinge kinks
    y = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True], [True, True, False, True]])
    assert torch.autograd.gradcheck(lambda x: fn(x, y, mask), (z,))


@pytest.mark.parametrize("fn", LOSSES, ids=ids)
def test_padding_changes_neither_value_nor_gradient(fn) -> None:  # type: ignore[no-untyped-def]
    z = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.2, -0.7]])
    y = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    z1 = z.clone().requires_grad_(True)
    ref = fn(z1, y, None)
    ref.backward()
    # interleave padding holding NaN logits and junk labels
    zp = torch.tensor([[0.3, float("nan"), -1.0, 2.0, 7.0], [float("nan"), 1.5, 0.2, -0.7, -9.0]])
    yp = torch.tensor([[1.0, 5.0, 0.0, 2.0, float("nan")], [3.0, 0.0, 1.0, 0.0, 4.0]])
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, True, False]])
    z2 = zp.clone().requires_grad_(True)
    got = fn(z2, yp, mask)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(z2.grad[mask].view(2, 3), z1.grad)
    assert (z2.grad[~mask] == 0).all()


@pytest.mark.parametrize("fn", LOSSES, ids=ids)
def test_lists_without_positives_are_skipped(fn) -> None:  # type: ignore[no-untyped-def]
    z = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    with_empty = fn(z, y)
    without = fn(z[[0, 2]], y[[0, 2]])
    assert with_empty.item() == pytest.approx(without.item())
    # a batch where no list qualifies: an exact zero connected to the logits, never NaN
    none = fn(z, torch.zeros(3, 4))
    assert none.item() == 0.0 and none.grad_fn is not None
    none.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("fn", LOSSES, ids=ids)
def test_single_item_lists_are_finite(fn) -> None:  # type: ignore[no-untyped-def]
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, False]])
    loss = fn(z, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), mask)
    loss.backward()
    # one item cannot be misranked
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("fn", LOSSES, ids=ids)
def test_ties(fn) -> None:  # type: ignore[no-untyped-def]
    y = torch.tensor([[1.0, 1.0, 0.0, 2.0]])
    z = torch.tensor([[0.5, -0.3, 0.1, 0.0]])
    # swapping the logits of two equally labelled items does not change the loss
    swapped = z[:, [1, 0, 2, 3]]
    assert fn(swapped, y).item() == pytest.approx(fn(z, y).item(), rel=1e-6)
    # tied logits: finite value and gradient
    zt = torch.zeros(1, 4, requires_grad=True)
    loss = fn(zt, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zt.grad).all()


@pytest.mark.parametrize("fn", LOSSES, ids=ids)
def test_bad_input_is_named(fn) -> None:  # type: ignore[no-untyped-def]
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="relevance"):
        fn(z, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask"):
        fn(z, torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="logits"):
        fn(torch.zeros(6), torch.zeros(6))
    with pytest.raises(ValueError, match="relevance"):
        fn(z, torch.tensor([[0.0, float("nan"), 1.0], [0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("fn", [softmax_cross_entropy, approx_ndcg, rankmax, am_rankmax], ids=lambda f: f.__name__)
def test_negative_relevance_is_rejected(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="relevance must be >= 0"):
        fn(torch.zeros(1, 2), t([1.0, -1.0]))


def test_bad_hyperparameters_are_named() -> None:
    y = t([1.0, 0.0])
    with pytest.raises(ValueError, match="temperature"):
        softmax_cross_entropy(torch.zeros(1, 2), y, temperature=0.0)
    with pytest.raises(ValueError, match="margin"):
        rankmax(torch.zeros(1, 2), y, margin=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        am_rankmax(torch.zeros(1, 2), y, alpha=-1.0)
    with pytest.raises(ValueError, match="power"):
        softsort_loss(torch.zeros(1, 2), y, power=0.5)
