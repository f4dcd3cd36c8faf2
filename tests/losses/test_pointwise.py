"""Pointwise BCE: values, weights, gradients, request-level batches, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from prerank.data.batch import Batch
from prerank.losses.pointwise import PointwiseBCE, binary_cross_entropy


def test_value_matches_hand_computation() -> None:
    assert binary_cross_entropy(torch.zeros(4), torch.tensor([0.0, 1.0, 1.0, 0.0])).item() == pytest.approx(math.log(2))
    z, y = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    assert binary_cross_entropy(z, y).item() == pytest.approx(expected)


def test_weights_give_a_weighted_mean() -> None:
    z, y = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    per_row = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(1.0))]
    got = binary_cross_entropy(z, y, weights=torch.tensor([3.0, 1.0]))
    assert got.item() == pytest.approx((3 * per_row[0] + per_row[1]) / 4)
    zero = binary_cross_entropy(z.requires_grad_(True), y, weights=torch.zeros(2))
    assert zero.item() == 0.0 and zero.grad_fn is not None


def test_empty_batch_is_zero_not_nan() -> None:
    z = torch.zeros(0, requires_grad=True)
    loss = binary_cross_entropy(z, torch.zeros(0))
    assert loss.item() == 0.0 and loss.grad_fn is not None


def test_gradcheck_float64() -> None:
    z = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.0, 1.0, 0.3, 1.0, 0.0], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: binary_cross_entropy(x, y, weights=w), (z,))


def test_callable_on_row_and_request_batches() -> None:
    loss = PointwiseBCE()
    assert not loss.requires_lists
    z = torch.tensor([[0.5, 9.0, -1.0], [2.0, 0.0, float("nan")]])
    y = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    lists = loss(z, Batch(features={}, label=y, mask=mask))
    rows = loss(z[mask], Batch(features={}, label=y[mask]))
    assert lists.item() == pytest.approx(rows.item())
    with pytest.raises(ValueError, match="batch.label"):
        loss(z[mask], Batch(features={}))


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="labels"):
        binary_cross_entropy(torch.zeros(2), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="labels"):
        binary_cross_entropy(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="weights"):
        binary_cross_entropy(torch.zeros(2), torch.zeros(2), weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="logits"):
        binary_cross_entropy(torch.zeros(2, 2), torch.zeros(2, 2))
