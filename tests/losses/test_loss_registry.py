"""The named-loss registry the CLI uses: every name builds a working ``loss(logits, batch)``."""

from __future__ import annotations

import pytest
import torch

from prerank.data.batch import Batch
from prerank.losses import LOSSES, build_loss, hard_relevance
from prerank.losses.distill import softmax_distillation
from prerank.losses.listwise import softmax_cross_entropy


def request_batch() -> Batch:
    return Batch(
        features={},
        label=torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]]),
        label_level=torch.tensor([[2, 0, 0, 0, 0], [0, 1, 0, 0, 0]]),
        stage=torch.tensor([[0, 0, 1, 2, 3], [0, 0, 0, 3, 0]]),
        teacher_logit=torch.tensor([[1.0, -1.0, 0.5, 0.0, -2.0], [0.2, 0.8, -0.3, 0.0, 0.0]]),
        mask=torch.tensor([[True] * 5, [True] * 4 + [False]]),
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_trains(name: str) -> None:
    loss = build_loss(name)
    batch = request_batch()
    z = torch.randn(2, 5, requires_grad=True)
    value = loss(z, batch)
    value.backward()
    assert value.dim() == 0 and torch.isfinite(value)
    assert z.grad.abs().sum() > 0
    assert (z.grad[~batch.mask] == 0).all()
    assert loss.requires_lists == (name != "bce")


def test_options_reach_the_function() -> None:
    batch = request_batch()
    z = torch.randn(2, 5)
    relevance = hard_relevance(batch.label, None, batch.stage, batch.mask)  # feedback=binary, the default
    got = build_loss("ranking:softmax", temperature=2.0)(z, batch)
    assert got.item() == pytest.approx(softmax_cross_entropy(z, relevance, batch.mask, temperature=2.0).item())
    graded = hard_relevance(batch.label, batch.label_level, batch.stage, batch.mask)
    got = build_loss("ranking:softmax", temperature=2.0, feedback="graded")(z, batch)
    assert got.item() == pytest.approx(softmax_cross_entropy(z, graded, batch.mask, temperature=2.0).item())
    with pytest.raises(ValueError, match="feedback"):
        build_loss("ranking:softmax", feedback="rating")
    impressions = batch.mask & (batch.stage == 0)
    got = build_loss("distill:softmax", temperature=0.5)(z, batch)
    assert got.item() == pytest.approx(
        softmax_distillation(z, batch.teacher_logit, impressions, temperature=0.5).item()
    )
    hybrid = build_loss("hybrid", rankmax_weight=0.0, sorting_weight=0.0)(z, batch)
    expected = softmax_distillation(z, batch.teacher_logit, impressions, per_list="mean")
    assert hybrid.item() == pytest.approx(expected.item())


def test_bad_names_and_options_are_named() -> None:
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        build_loss("nope")
    with pytest.raises(ValueError, match="margin"):
        build_loss("ranking:softmax", margin=1.0)
    with pytest.raises(ValueError, match="temperature"):
        build_loss("ranking:softmax", temperature="hot")
    with pytest.raises(ValueError, match="weights"):
        build_loss("distill:logloss", weights=torch.ones(2, 5))
    with pytest.raises(ValueError, match="bce"):
        build_loss("bce", temperature=1.0)


def test_listwise_losses_refuse_row_batches() -> None:
    flat = request_batch().flat()
    with pytest.raises(ValueError, match="request-level"):
        build_loss("ranking:rankmax")(torch.zeros(len(flat)), flat)
    with pytest.raises(ValueError, match="teacher_logit"):
        batch = request_batch()
        batch.teacher_logit = None
        build_loss("distill:pairwise")(torch.zeros(2, 5), batch)
