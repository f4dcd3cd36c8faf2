"""ARF's loss: NeuralSort, the relaxed Recall@m@k, the full-order target and the learned uncertainty weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from prerank.data.cascade import CascadeConfig, build_cascade
from prerank.losses import build_loss
from prerank.losses.arf import ARFLoss, global_order_loss, neuralsort_log_matrix, relaxed_recall_loss, top_k_set
from prerank.models.registry import build_model
from prerank.schema import Schema
from prerank.train.checkpoint import read_checkpoint, save_checkpoint
from prerank.train.config import TrainConfig
from prerank.train.trainer import train_model


def test_neuralsort_is_row_stochastic_sorts_at_low_temperature_and_ignores_padding() -> None:
    s = torch.tensor([[0.3, 2.0, -1.0, 0.7, 9.9]])
    mask = torch.tensor([[True, True, True, True, False]])
    log_p, cells = neuralsort_log_matrix(s, mask, temperature=1e-3)
    p = log_p.exp() * cells
    assert torch.allclose(p.sum(-1)[0, :4], torch.ones(4))
    assert p[0, :4].argmax(-1).tolist() == [1, 3, 0, 2]  # descending order of the 4 real scores
    assert p[0, 4].sum() == 0 and p[0, :, 4].sum() == 0  # the padded item has no row and no column
    alone, _ = neuralsort_log_matrix(s[:, :4], mask[:, :4], temperature=1e-3)
    assert torch.allclose(alone.exp(), p[:, :4, :4], atol=1e-6)


def test_neuralsort_matches_the_formula_on_two_items() -> None:
    a, b, tau = 1.5, 0.5, 0.7
    log_p, _ = neuralsort_log_matrix(torch.tensor([[a, b]]), torch.ones(1, 2, dtype=torch.bool), temperature=tau)
    gap = abs(a - b)  # (A_s 1)_j = |a - b| for both items
    row1 = torch.softmax(torch.tensor([(1 * a - gap), (1 * b - gap)]) / tau, 0)  # n + 1 - 2i = 1 for i = 1
    row2 = torch.softmax(torch.tensor([(-1 * a - gap), (-1 * b - gap)]) / tau, 0)  # = -1 for i = 2
    assert torch.allclose(log_p.exp()[0], torch.stack([row1, row2]), atol=1e-6)


def test_top_k_set() -> None:
    y = torch.tensor([[0.0, 2.0, 1.0, 2.0, 0.0]])
    mask = torch.ones_like(y, dtype=torch.bool)
    assert top_k_set(y, mask, None).tolist() == [[False, True, True, True, False]]
    assert top_k_set(y, mask, 2).tolist() == [[False, True, False, True, False]]
    assert top_k_set(y, mask, 1).tolist() == [[False, True, False, False, False]]  # tie broken by position


def test_relaxed_recall_rewards_the_top_m_and_skips_trivial_lists() -> None:
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]])
    mask = torch.ones_like(y, dtype=torch.bool)
    good = torch.tensor([[3.0, 0.0, 2.0, -1.0, -2.0]])
    bad = torch.tensor([[-3.0, 0.0, -2.0, 1.0, 2.0]])
    kw = {"m": 2, "temperature": 0.05}
    assert relaxed_recall_loss(good, y, mask, **kw).item() == pytest.approx(0.0, abs=1e-4)
    assert relaxed_recall_loss(bad, y, mask, **kw).item() > 10
    # hand value at tau = 1: M_j summed over the first m rows, then -mean log over G = {0, 2}
    log_p, _ = neuralsort_log_matrix(good, mask, temperature=1.0)
    member = log_p.exp()[0, :2].sum(0).clamp(max=1.0)
    want = -(torch.log(member[0]) + torch.log(member[2])) / 2
    assert relaxed_recall_loss(good, y, mask, m=2, temperature=1.0).item() == pytest.approx(want.item(), rel=1e-5)
    assert relaxed_recall_loss(good, y, mask, m=5, temperature=1.0).item() == 0.0  # the whole list is kept
    z = bad.clone().requires_grad_(True)
    relaxed_recall_loss(z, y, mask, m=2, temperature=1.0).backward()
    assert z.grad[0, 0] < 0 and z.grad[0, 2] < 0  # gradient descent raises both positives
    assert z.grad.sum().abs() < 1e-5  # NeuralSort depends on score differences only


def test_global_order_loss_is_lowest_for_the_label_order() -> None:
    y = torch.tensor([[2.0, 0.0, 1.0, 1.0]])
    mask = torch.ones_like(y, dtype=torch.bool)
    kw = {"temperature": 0.2, "label_temperature": 0.01}
    right = global_order_loss(torch.tensor([[5.0, -5.0, 0.1, -0.1]]), y, mask, **kw)
    wrong = global_order_loss(torch.tensor([[-5.0, 5.0, 0.1, -0.1]]), y, mask, **kw)
    assert right.item() < 1.0 < wrong.item()
    # the tied items (labels 1, 1) share ranks 2 and 3: swapping them changes nothing much
    swapped = global_order_loss(torch.tensor([[5.0, -5.0, -0.1, 0.1]]), y, mask, **kw)
    assert swapped.item() == pytest.approx(right.item(), abs=1e-4)
    assert global_order_loss(torch.zeros(1, 4), torch.ones(1, 4), mask, **kw).item() == 0.0  # no order to learn


def test_arf_loss_weights_and_options() -> None:
    loss = build_loss("arf", m=2, temperature=0.5)
    assert isinstance(loss, ARFLoss) and loss.requires_lists and loss.log_var is not None
    with pytest.raises(ValueError, match="m must be"):
        build_loss("arf", m=0)
    with pytest.raises(TypeError):
        build_loss("arf", bogus=1)
    fixed = build_loss("arf", m=2, uncertainty=False)
    assert fixed.log_var is None and not list(fixed.parameters())


def test_uncertainty_weighting_formula() -> None:
    from prerank.data.batch import Batch

    loss = ARFLoss(m=2, temperature=0.5)
    with torch.no_grad():
        loss.log_var.copy_(torch.tensor([0.3, -0.4]))
    z = torch.tensor([[0.2, 1.0, -0.5, 0.0]])
    mask = torch.ones_like(z, dtype=torch.bool)
    batch = Batch(
        features={}, label=torch.tensor([[1.0, 0.0, 1.0, 0.0]]), mask=mask, stage=torch.tensor([[0, 0, 0, 3]])
    )
    parts = loss.parts(z, torch.tensor([[2.0, 1.0, 2.0, 0.0]]), mask)
    want = sum(
        0.5 * math.exp(-s) * parts[n].item() + math.log1p(math.exp(s))
        for n, s in zip(ARFLoss.PARTS, (0.3, -0.4), strict=True)
    )
    assert loss(z, batch).item() == pytest.approx(want, rel=1e-5)


def test_the_trainer_learns_the_weights_and_keeps_them_in_the_checkpoint(
    tiny_dataset: Path, tmp_path: Path, schema: Schema
) -> None:
    teacher = tmp_path / "t.pt"
    save_checkpoint(teacher, "two_tower", build_model("two_tower", schema))
    data = tmp_path / "cascade"
    build_cascade(
        tiny_dataset,
        teacher,
        data,
        CascadeConfig(retrieve=6, rank_candidates=2, prerank_candidates=2, random=2, rank_cut="teacher_top"),
    )
    loss = build_loss("arf", m=3)
    cfg = TrainConfig(epochs=2, batch_size=64, requests_per_batch=4, progress=False, threads=1)
    train_model("two_tower", data, tmp_path / "run", config=cfg, loss=loss, log=lambda _: None)
    assert torch.equal(loss.log_var, torch.zeros(2))  # the caller's loss is copied, not trained in place
    saved = read_checkpoint(tmp_path / "run" / "last.pt")["trainer"]["loss_state"]["log_var"]
    assert not torch.equal(saved, torch.zeros(2))  # the weights were optimised with the model
