"""DAT: augmented vectors, the Adaptive-Mimic losses and the Category Alignment Loss."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prerank.bench.cost import score_cost
from prerank.data.batch import Batch
from prerank.models.base import ConfigError
from prerank.models.dat import DAT, DATConfig, category_alignment_loss
from prerank.schema import Schema


def _model(schema: Schema, **overrides: object) -> DAT:
    return DAT(schema, DATConfig(**overrides))  # type: ignore[arg-type]


def test_shapes_and_normalised_outputs(schema: Schema, batch: Batch) -> None:
    model = _model(schema, out_dim=8).eval()
    user, item = model.encode_user(batch), model.encode_item(batch)
    assert user["p"].shape == item["p"].shape == (len(batch), 8)
    torch.testing.assert_close(user["p"].norm(dim=-1), torch.ones(len(batch)))
    assert model(batch).shape == (len(batch),)


def test_augmented_vectors_are_parameters_not_noise(schema: Schema, batch: Batch) -> None:
    """The public code's a_u / a_v were fresh random noise: here two passes give the same scores."""
    model = _model(schema).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(batch))
    assert model.aug_user.weight.requires_grad and model.aug_item.weight.requires_grad


def test_augmented_vector_changes_the_user_tower_output(schema: Schema, batch: Batch) -> None:
    model = _model(schema).eval()
    with torch.no_grad():
        before = model.encode_user(batch)["p"]
        model.aug_user.weight[1:] += 1.0
        after = model.encode_user(batch)["p"]
    assert not torch.allclose(before, after)


def test_mimic_losses_move_only_the_augmented_vectors(schema: Schema, batch: Batch) -> None:
    model = _model(schema).train()
    user, item = model.encode_user(batch), model.encode_item(batch)
    loss_u, loss_v = model.mimic_losses(batch, user, item)
    assert loss_u > 0 and loss_v > 0
    (loss_u + loss_v).backward()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {"aug_user.weight", "aug_item.weight"}


def test_loss_u_trains_a_u_and_loss_v_trains_a_v(schema: Schema, batch: Batch) -> None:
    model = _model(schema).train()
    user, item = model.encode_user(batch), model.encode_item(batch)
    loss_u, _ = model.mimic_losses(batch, user, item)
    loss_u.backward()
    assert model.aug_user.weight.grad.abs().sum() > 0
    assert model.aug_item.weight.grad is None or model.aug_item.weight.grad.abs().sum() == 0


def test_mimic_loss_is_mean_over_positives_of_squared_distance(schema: Schema, batch: Batch) -> None:
    model = _model(schema).eval()
    with torch.no_grad():
        user, item = model.encode_user(batch), model.encode_item(batch)
        loss_u, loss_v = model.mimic_losses(batch, user, item)
        pos = batch.label > 0.5
        a_u = model.aug_user.weight[batch.features["user_id"][pos]]
        a_v = model.aug_item.weight[batch.features["item_id"][pos]]
        expected_u = ((a_u - item["p"][pos]) ** 2).sum(-1).mean()
        expected_v = ((a_v - user["p"][pos]) ** 2).sum(-1).mean()
    torch.testing.assert_close(loss_u, expected_u)
    torch.testing.assert_close(loss_v, expected_v)


def test_mimic_loss_ignores_negatives(schema: Schema, batch: Batch) -> None:
    model = _model(schema).eval()
    negatives = replace(batch, label=torch.zeros_like(batch.label))
    user, item = model.encode_user(negatives), model.encode_item(negatives)
    loss_u, loss_v = model.mimic_losses(negatives, user, item)
    assert loss_u.item() == 0.0 and loss_v.item() == 0.0


def test_training_the_mimic_loss_pulls_a_u_towards_the_item_output(schema: Schema, batch: Batch) -> None:
    model = _model(schema, cal_weight=0.0).eval()
    opt = torch.optim.SGD([model.aug_user.weight], lr=0.5)
    losses = []
    for _ in range(20):
        user, item = model.encode_user(batch), model.encode_item(batch)
        loss_u, _ = model.mimic_losses(batch, user, item)
        opt.zero_grad()
        loss_u.backward()
        opt.step()
        losses.append(loss_u.item())
    assert losses[-1] < 0.5 * losses[0]


def test_mimic_loss_needs_labels(schema: Schema, batch: Batch) -> None:
    model = _model(schema)
    unlabelled = replace(batch, label=None)
    with pytest.raises(ValueError, match="label"):
        model.auxiliary_loss(unlabelled, model.encode_user(unlabelled), model.encode_item(unlabelled))


def test_cal_matches_hand_computed_covariances() -> None:
    g = torch.Generator().manual_seed(1)
    reps = torch.randn(9, 3, generator=g)
    cats = torch.tensor([1, 1, 1, 1, 2, 2, 2, 3, 0])  # 1 is the major category; 3 has one row; 0 unknown
    major = torch.cov(reps[:4].T)
    expected = ((major - torch.cov(reps[4:7].T)) ** 2).sum()
    torch.testing.assert_close(category_alignment_loss(reps, cats), expected)


def test_cal_is_zero_for_identically_distributed_categories() -> None:
    block = torch.randn(5, 4)
    reps = torch.cat([block, block + 3.0])  # same covariance, shifted mean
    cats = torch.tensor([1] * 5 + [2] * 5)
    assert category_alignment_loss(reps, cats).item() == pytest.approx(0.0, abs=1e-6)


def test_cal_without_two_usable_categories_is_zero_with_graph() -> None:
    reps = torch.randn(4, 3, requires_grad=True)
    loss = category_alignment_loss(reps, torch.tensor([1, 1, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()
    assert reps.grad is not None


def test_cal_reaches_the_item_tower(schema: Schema, batch: Batch) -> None:
    model = _model(schema).train()
    cal = model.category_alignment_loss(batch, model.encode_item(batch))
    assert cal is not None and cal > 0
    cal.backward()
    assert model.item_tower[0].weight.grad.abs().sum() > 0
    assert model.user_tower[0].weight.grad is None


def test_category_feature_detection_and_options(schema: Schema, batch: Batch) -> None:
    assert _model(schema).category == "category_id"
    assert _model(schema, category_feature=None).category is None
    assert _model(schema, category_feature=None).category_alignment_loss(batch, {"p": torch.zeros(1)}) is None
    genres = _model(schema, category_feature="genres")
    assert genres.category == "genres"
    cal = genres.category_alignment_loss(batch, genres.encode_item(batch))
    assert cal is not None and torch.isfinite(cal)
    with pytest.raises(ConfigError, match="category_feature"):
        _model(schema, category_feature="age")
    no_category = Schema(features=tuple(f for f in schema.features if f.name not in ("category_id", "genres")))
    assert _model(no_category).category is None


def test_auxiliary_loss_combines_weighted_terms(schema: Schema, batch: Batch) -> None:
    model = _model(schema, amm_weight_user=0.3, amm_weight_item=0.7, cal_weight=2.0).eval()
    user, item = model.encode_user(batch), model.encode_item(batch)
    loss_u, loss_v = model.mimic_losses(batch, user, item)
    cal = model.category_alignment_loss(batch, item)
    torch.testing.assert_close(model.auxiliary_loss(batch, user, item), 0.3 * loss_u + 0.7 * loss_v + 2.0 * cal)


def test_missing_id_features_are_config_errors(schema: Schema) -> None:
    with pytest.raises(ConfigError, match="user_id"):
        _model(schema, user_id="uid")
    with pytest.raises(ConfigError, match="item_id"):
        _model(schema, item_id="age")
    with pytest.raises(ConfigError, match="temperature"):
        _model(schema, temperature=0.0)


def test_score_cost_is_one_dot_product(schema: Schema, batch: Batch) -> None:
    model = _model(schema, out_dim=32)
    cost = score_cost(model, batch)
    # 32 multiplies + 32 adds, the temperature and the bias: a few FLOPs more than 64
    assert 64 <= cost["score_flops_per_candidate"] <= 80
    assert cost["item_cache_bytes_per_item"] == 32 * 4
