"""Distillation losses: hand-checked values, optimum at the teacher, gradients, edge cases, padding."""

from __future__ import annotations

import math

import pytest
import torch

from prerank.losses.distill import pairwise_distillation, softmax_distillation, weighted_logloss_distillation

DISTILL = [softmax_distillation, weighted_logloss_distillation, pairwise_distillation]
ids = [f.__name__ for f in DISTILL]


def test_softmax_distillation_value() -> None:
    # teacher logits 0 (p = 0.5 each); student softmax (1/4, 3/4): Eq. 9 weights each log q_i by p_i
    got = softmax_distillation(torch.tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2))
    assert got.item() == pytest.approx(-0.5 * (math.log(0.25) + math.log(0.75)))
    # the "softmax" reading: the same here, as softmax(0, 0) = (0.5, 0.5) too
    got = softmax_distillation(torch.tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2), target="softmax")
    assert got.item() == pytest.approx(-0.5 * (math.log(0.25) + math.log(0.75)))
    # with "softmax" the temperature softens both sides
    kw = {"target": "softmax"}
    a = softmax_distillation(torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[4.0, 0.0, -2.0]]), temperature=2.0, **kw)
    b = softmax_distillation(torch.tensor([[1.0, 0.0, 0.5]]), torch.tensor([[2.0, 0.0, -1.0]]), **kw)
    assert a.item() == pytest.approx(b.item())


def test_eq9_weights_by_the_rankers_probability_not_its_softmax() -> None:
    """RankTower Eq. 9: -sum_i p_i log softmax(z)_i with p_i the ranking model's predicted probability. With the
    teacher's probabilities (0.9, 0.5, 0.1) the two readings differ, and only Eq. 9 matches the hand computation."""
    p = torch.tensor([[0.9, 0.5, 0.1]])
    teacher = torch.log(p / (1 - p))
    z = torch.tensor([[0.5, -1.0, 2.0]])
    logq = torch.log_softmax(z, -1)
    eq9 = -(p * logq).sum()
    by_softmax = -(torch.softmax(teacher, -1) * logq).sum()
    assert softmax_distillation(z, teacher).item() == pytest.approx(eq9.item())
    assert softmax_distillation(z, teacher, target="softmax").item() == pytest.approx(by_softmax.item())
    assert abs(eq9.item() - by_softmax.item()) > 0.5
    with pytest.raises(ValueError, match="target must be one of"):
        softmax_distillation(z, teacher, target="odds")


def test_weighted_logloss_value() -> None:
    # soft label sigmoid(0) = 0.5, student logit 0: log 2; weights only change the mix of items
    assert weighted_logloss_distillation(torch.zeros(1, 3), torch.zeros(1, 3)).item() == pytest.approx(math.log(2.0))
    z, teacher = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.0, 3.0]])
    per_item = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.sigmoid(teacher), reduction="none")[0]
    got = weighted_logloss_distillation(z, teacher, weights=torch.tensor([[1.0, 3.0]]))
    assert got.item() == pytest.approx(((per_item[0] + 3 * per_item[1]) / 4).item())
    with pytest.raises(ValueError, match="weights"):
        weighted_logloss_distillation(z, teacher, weights=torch.tensor([[1.0, -1.0]]))


def test_pairwise_distillation_value_and_min_gap() -> None:
    assert pairwise_distillation(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(2.0))
    z, teacher = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[2.0, 1.9, 0.0]])
    # pairs (0>1), (0>2), (1>2); with min_gap 0.5 the close pair (0, 1) is dropped
    all_pairs = (math.log1p(math.exp(1.0)) + math.log(2.0) + math.log1p(math.exp(-1.0))) / 3
    assert pairwise_distillation(z, teacher).item() == pytest.approx(all_pairs)
    far_pairs = (math.log(2.0) + math.log1p(math.exp(-1.0))) / 2
    assert pairwise_distillation(z, teacher, min_gap=0.5).item() == pytest.approx(far_pairs)
    # teacher ties form no pair
    assert pairwise_distillation(z, torch.ones(1, 3)).item() == 0.0


def _eq9_optimum(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.logsigmoid(t)  # softmax(log p) = p / sum p: Eq. 9's minimiser


@pytest.mark.parametrize(
    ("fn", "optimum"),
    [
        (softmax_distillation, _eq9_optimum),
        (lambda z, t: softmax_distillation(z, t, target="softmax"), lambda t: t),
        (weighted_logloss_distillation, lambda t: t),
    ],
    ids=["softmax_eq9", "softmax_target_softmax", "weighted_logloss"],
)
def test_optimum_is_the_teacher(fn, optimum) -> None:  # type: ignore[no-untyped-def]
    teacher = torch.tensor([[1.0, -0.5, 2.0, 0.0]])
    z = optimum(teacher).clone().requires_grad_(True)
    fn(z, teacher).backward()
    torch.testing.assert_close(z.grad, torch.zeros_like(z), atol=1e-6, rtol=0)
    z2 = (teacher + 0.3 * torch.randn(1, 4)).requires_grad_(True)
    fn(z2, teacher).backward()
    assert z2.grad.abs().sum() > 1e-3


@pytest.mark.parametrize("fn", DISTILL, ids=ids)
def test_gradcheck_float64(fn) -> None:  # type: ignore[no-untyped-def]
    z = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    assert torch.autograd.gradcheck(lambda x: fn(x, teacher, mask), (z,))


@pytest.mark.parametrize("fn", DISTILL, ids=ids)
def test_padding_changes_neither_value_nor_gradient(fn) -> None:  # type: ignore[no-untyped-def]
    z, teacher = torch.tensor([[0.3, -1.0, 2.0]]), torch.tensor([[1.0, 0.0, -1.0]])
    z1 = z.clone().requires_grad_(True)
    ref = fn(z1, teacher)
    ref.backward()
    z2 = torch.tensor([[0.3, float("nan"), -1.0, 2.0]], requires_grad=True)
    tp = torch.tensor([[1.0, 50.0, 0.0, -1.0]])
    mask = torch.tensor([[True, False, True, True]])
    got = fn(z2, tp, mask)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(z2.grad[mask].view(1, 3), z1.grad)
    assert z2.grad[0, 1] == 0


@pytest.mark.parametrize("fn", [softmax_distillation, pairwise_distillation], ids=lambda f: f.__name__)
def test_single_item_lists_are_skipped(fn) -> None:  # type: ignore[no-untyped-def]
    z = torch.tensor([[1.0, 0.0], [0.5, -0.5]], requires_grad=True)
    teacher = torch.tensor([[0.0, 9.0], [2.0, 0.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert fn(z, teacher, mask).item() == pytest.approx(fn(z[1:], teacher[1:]).item())
    none = fn(z, teacher, torch.tensor([[True, False], [False, True]]))
    assert none.item() == 0.0 and none.grad_fn is not None


@pytest.mark.parametrize("fn", DISTILL, ids=ids)
def test_bad_input_is_named(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="teacher_logits"):
        fn(torch.zeros(1, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="teacher_logits"):
        fn(torch.zeros(1, 2), torch.tensor([[0.0, float("inf")]]))
