"""RankTower's hybrid loss: hard labels (Sec. 3.2.1), sample scopes (Sec. 3.3) and weights (Eq. 15)."""

from __future__ import annotations

import pytest
import torch

from prerank.data.batch import Batch
from prerank.losses.distill import softmax_distillation
from prerank.losses.hybrid import HybridLoss, HybridLossConfig, hard_relevance, hybrid_components, hybrid_loss
from prerank.losses.listwise import am_rankmax, softsort_loss

IMP, RANK, PRE, RAND = 0, 1, 2, 3


def lists() -> dict[str, torch.Tensor]:
    """Two requests: impressions (clicked / not), rank and pre-rank candidates, random items, padding."""
    return {
        "stage": torch.tensor([[IMP, IMP, IMP, RANK, PRE, RAND, RAND], [IMP, IMP, RANK, RAND, RAND, 0, 0]]),
        "label": torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]),
        "label_level": torch.tensor([[2, 0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0]]),
        "teacher": torch.tensor([[2.0, -1.0, 1.0, 0.5, -2.0, 0.0, 0.0], [0.0, 1.0, 3.0, -1.0, 0.0, 0.0, 0.0]]),
        "mask": torch.tensor([[True] * 7, [True] * 5 + [False] * 2]),
    }


def test_hard_relevance_adds_the_impression_label() -> None:
    d = lists()
    y = hard_relevance(d["label"], d["label_level"], d["stage"], d["mask"])
    assert y.tolist() == [[3.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    # without label_level the binary label is the feedback
    y = hard_relevance(d["label"], None, d["stage"], d["mask"])
    assert y[0].tolist() == [2.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    # without stage every row is an impression: the feedback alone
    assert hard_relevance(d["label"], d["label_level"], None).tolist() == d["label_level"].float().tolist()
    # a level that also grades negatives (MovieLens ratings, label = rating > 3) is feedback on positives only
    ratings, liked = torch.tensor([[5, 2, 4, 1]]), torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert hard_relevance(liked, ratings, None).tolist() == [[5.0, 0.0, 4.0, 0.0]]
    assert hard_relevance(None, ratings, None).tolist() == [[5.0, 2.0, 4.0, 1.0]]
    # feedback on an item that was never shown is ignored
    label = d["label"].clone()
    label[0, 3] = 1.0
    assert hard_relevance(label, None, d["stage"])[0, 3] == 0.0


def test_hard_relevance_rejects_bad_input() -> None:
    d = lists()
    with pytest.raises(ValueError, match="stage"):
        hard_relevance(d["label"], None, d["stage"] + 2)
    with pytest.raises(ValueError, match="label"):
        hard_relevance(None, None, d["stage"])
    with pytest.raises(ValueError, match="label"):
        hard_relevance(-d["label"], None, None)


def test_weighted_sum_of_the_scoped_parts() -> None:
    d = lists()
    z = torch.randn(2, 7)
    y = hard_relevance(d["label"], d["label_level"], d["stage"], d["mask"])
    cfg = HybridLossConfig(distillation_weight=2.0, sorting_weight=3.0, rankmax_weight=5.0, sorting_temperature=0.5)
    m, s = d["mask"], d["stage"]
    distill = softmax_distillation(z, d["teacher"], m & (s == IMP), per_list="mean")
    sort = softsort_loss(z, y, m & (s != RAND), temperature=0.5, per_list="mean")
    rank = am_rankmax(z, y, m, per_list="mean")
    got = hybrid_loss(z, y, s, m, d["teacher"], cfg)
    assert got.item() == pytest.approx((2 * distill + 3 * sort + 5 * rank).item(), rel=1e-6)
    as_written = HybridLossConfig(**{**cfg.__dict__, "list_reduction": "sum"})
    summed = 2 * softmax_distillation(z, d["teacher"], m & (s == IMP)) + 3 * softsort_loss(
        z, y, m & (s != RAND), temperature=0.5
    )
    summed = summed + 5 * am_rankmax(z, y, m)
    assert hybrid_loss(z, y, s, m, d["teacher"], as_written).item() == pytest.approx(summed.item(), rel=1e-6)
    parts = hybrid_components(z, y, s, m, d["teacher"], cfg)
    assert set(parts) == {"distillation", "sorting", "am_rankmax"}
    sharp = HybridLossConfig(sorting_label_temperature=0.1)
    expected = softsort_loss(z, y, m & (s != RAND), label_temperature=0.1, per_list="mean")
    assert hybrid_components(z, y, s, m, d["teacher"], sharp)["sorting"].item() == pytest.approx(expected.item())
    odds = HybridLossConfig(distillation_target="softmax")  # the other reading of Eq. 9's p_i, by name
    expected = softmax_distillation(z, d["teacher"], m & (s == IMP), target="softmax", per_list="mean")
    assert hybrid_components(z, y, s, m, d["teacher"], odds)["distillation"].item() == pytest.approx(expected.item())
    assert expected.item() != pytest.approx(distill.item())


@pytest.mark.parametrize(
    ("weights", "reached"),
    [
        ((1.0, 0.0, 0.0), {IMP}),  # distillation: impressions only
        ((0.0, 1.0, 0.0), {IMP, RANK, PRE}),  # SoftSort: impressions + candidates
        ((0.0, 0.0, 1.0), {IMP, RANK, PRE, RAND}),  # AM-Rankmax: every sample
    ],
)
def test_each_part_sees_its_sample_scope(weights: tuple[float, float, float], reached: set[int]) -> None:
    d = lists()
    cfg = HybridLossConfig(distillation_weight=weights[0], sorting_weight=weights[1], rankmax_weight=weights[2])
    y = hard_relevance(d["label"], d["label_level"], d["stage"], d["mask"])
    z = torch.randn(2, 7, requires_grad=True)
    hybrid_loss(z, y, d["stage"], d["mask"], d["teacher"], cfg).backward()
    for stage in (IMP, RANK, PRE, RAND):
        cells = d["mask"] & (d["stage"] == stage)
        touched = bool((z.grad[cells] != 0).any())
        assert touched == (stage in reached), f"stage {stage}"
    assert (z.grad[~d["mask"]] == 0).all()


def test_teacher_outside_impressions_is_ignored() -> None:
    d = lists()
    y = hard_relevance(d["label"], d["label_level"], d["stage"], d["mask"])
    z = torch.randn(2, 7)
    teacher = d["teacher"].clone()
    teacher[d["stage"] != IMP] = 100.0
    a = hybrid_loss(z, y, d["stage"], d["mask"], d["teacher"])
    b = hybrid_loss(z, y, d["stage"], d["mask"], teacher)
    assert a.item() == pytest.approx(b.item())


@pytest.mark.parametrize("distillation", ["softmax", "logloss", "pairwise"])
def test_callable_on_a_request_batch(distillation: str) -> None:
    d = lists()
    batch = Batch(
        features={},
        label=d["label"],
        label_level=d["label_level"],
        stage=d["stage"],
        teacher_logit=d["teacher"],
        mask=d["mask"],
    )
    loss = HybridLoss.from_options(distillation=distillation)
    assert loss.requires_lists
    z = torch.randn(2, 7, requires_grad=True)
    value = loss(z, batch)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()


def test_binary_feedback_uses_the_label_not_the_level() -> None:
    d = lists()
    batch = Batch(features={}, label=d["label"], label_level=d["label_level"], stage=d["stage"], mask=d["mask"])
    z = torch.randn(2, 7)
    cfg = HybridLossConfig(distillation_weight=0.0, feedback="binary")
    y = hard_relevance(d["label"], None, d["stage"], d["mask"])  # 2 on clicked, 1 on shown, 0 elsewhere
    assert y[0].tolist() == [2, 1, 2, 0, 0, 0, 0]
    assert HybridLoss(cfg)(z, batch).item() == pytest.approx(hybrid_loss(z, y, d["stage"], d["mask"], None, cfg).item())
    with pytest.raises(ValueError, match="feedback"):
        HybridLossConfig(feedback="rating")  # type: ignore[arg-type]


def test_callable_needs_lists_stage_and_teacher() -> None:
    d = lists()
    z = torch.zeros(2, 7)
    full = {"label": d["label"], "stage": d["stage"], "teacher_logit": d["teacher"], "mask": d["mask"]}
    with pytest.raises(ValueError, match="request-level"):
        HybridLoss()(z[d["mask"]], Batch(features={}, **{**full, "mask": None}))
    with pytest.raises(ValueError, match="stage"):
        HybridLoss()(z, Batch(features={}, **{**full, "stage": None}))
    with pytest.raises(ValueError, match="teacher"):
        HybridLoss()(z, Batch(features={}, **{**full, "teacher_logit": None}))
    # without distillation no teacher is needed
    no_teacher = HybridLoss(HybridLossConfig(distillation_weight=0.0))
    assert torch.isfinite(no_teacher(z, Batch(features={}, **{**full, "teacher_logit": None})))


def test_nothing_to_learn_gives_a_connected_zero() -> None:
    z = torch.randn(1, 3, requires_grad=True)
    stage = torch.full((1, 3), RAND)
    value = hybrid_loss(z, torch.zeros(1, 3), stage, None, torch.zeros(1, 3))
    assert value.item() == 0.0 and value.grad_fn is not None


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="sorting_weight"):
        HybridLossConfig(sorting_weight=-1.0)
    with pytest.raises(ValueError, match="distillation"):
        HybridLossConfig(distillation="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        HybridLossConfig(distillation_weight=0.0, sorting_weight=0.0, rankmax_weight=0.0)
    with pytest.raises(ValueError, match="sorting_temperature"):
        HybridLossConfig(sorting_temperature=0.0)
    with pytest.raises(ValueError, match="sorting_label_temperature"):
        HybridLossConfig(sorting_label_temperature=-0.1)
    with pytest.raises(ValueError, match="margin_alpha"):
        HybridLossConfig.from_options(margin_alpha="1.0")
    with pytest.raises(ValueError, match="lambda"):
        HybridLossConfig.from_options(lambda1=1.0)


def test_optimising_free_scores_learns_the_full_stage_order() -> None:
    """Scores trained by Eq. 15 alone order clicked > shown > candidates >= random, the paper's hierarchy."""
    d = lists()
    y = hard_relevance(d["label"], d["label_level"], d["stage"], d["mask"])
    z = torch.zeros(2, 7, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.2)
    cfg = HybridLossConfig(distillation_weight=0.0)
    for _ in range(40):
        opt.zero_grad()
        hybrid_loss(z, y, d["stage"], d["mask"], None, cfg).backward()
        opt.step()
    first = z.detach()[0]
    assert first[0] > first[2] > first[1]  # label_level 2 > 1 > shown without feedback
    assert first[1] > first[3:].max()  # every impression above every candidate and random item


def test_list_reduction_mean_divides_each_list_by_its_terms() -> None:
    """Two lists, lengths 2 and 4: "sum" is the mean over lists of the per-list sums, "mean" of sum / terms."""
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, -0.5, 2.0, 0.0]])
    t = torch.tensor([[2.0, -1.0, 0.0, 0.0], [0.0, 1.0, -2.0, 3.0]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    logq = [torch.log_softmax(z[0, :2], 0), torch.log_softmax(z[1], 0)]
    sums = [-(torch.sigmoid(t[0, :2]) * logq[0]).sum(), -(torch.sigmoid(t[1]) * logq[1]).sum()]
    assert softmax_distillation(z, t, mask).item() == pytest.approx(((sums[0] + sums[1]) / 2).item())
    assert softmax_distillation(z, t, mask, per_list="mean").item() == pytest.approx(
        ((sums[0] / 2 + sums[1] / 4) / 2).item()
    )
    y = torch.tensor([[2.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0]])  # list 2: two positives with a lower item
    assert am_rankmax(z, y, mask, per_list="mean").item() == pytest.approx(
        ((am_rankmax(z[:1], y[:1], mask[:1]) + am_rankmax(z[1:], y[1:], mask[1:]) / 2) / 2).item()
    )
    assert softsort_loss(z, y, mask, per_list="mean").item() == pytest.approx(
        ((softsort_loss(z[:1], y[:1], mask[:1]) / 2 + softsort_loss(z[1:], y[1:], mask[1:]) / 4) / 2).item()
    )
    with pytest.raises(ValueError, match="per_list"):
        softmax_distillation(z, t, mask, per_list="avg")
    with pytest.raises(ValueError, match="list_reduction"):
        HybridLossConfig(list_reduction="avg")  # type: ignore[arg-type]
