"""IntTower: Light-SE, the FE-Block sum-max score and the CIR loss (which must reach the objective)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from prerank.bench.cost import score_cost
from prerank.data.batch import Batch
from prerank.layers.field import LightSE
from prerank.models.base import ConfigError
from prerank.models.int_tower import IntTower, IntTowerConfig
from prerank.schema import Schema

SMALL = IntTowerConfig(hidden=(32, 16, 8), user_heads=3, item_heads=2, head_dim=4)


def test_state_shapes_and_training_only_rep(schema: Schema, batch: Batch) -> None:
    model = IntTower(schema, SMALL).eval()
    user, item = model.encode_user(batch), model.encode_item(batch)
    assert set(user) == set(item) == {"heads"}
    assert user["heads"].shape == (len(batch), 3, 3, 4)  # [B, L, H_u, d]
    assert item["heads"].shape == (len(batch), 2, 4)  # [B, H_i, d]
    model.train()
    assert model.encode_user(batch)["rep"].shape == model.encode_item(batch)["rep"].shape == (len(batch), 8)


def test_score_is_sum_over_layers_and_user_heads_of_max_over_item_heads(schema: Schema, batch: Batch) -> None:
    model = IntTower(schema, SMALL).eval()
    with torch.no_grad():
        user, item = model.encode_user(batch), model.encode_item(batch)
        got = model.score(user, item)
        u, v = user["heads"], item["heads"]
        for row in (0, 7, 63):
            expected = model.bias.clone()
            for layer in range(u.shape[1]):
                for head in range(u.shape[2]):
                    expected += max(float(u[row, layer, head] @ v[row, j]) for j in range(v.shape[1]))
            assert got[row].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)


def test_every_user_layer_feeds_the_score(schema: Schema, batch: Batch) -> None:
    model = IntTower(schema, SMALL).eval()
    with torch.no_grad():
        before = model(batch)
        model.user_proj[0].weight.zero_()
        model.user_proj[0].bias.zero_()
        assert not torch.allclose(before, model(batch))


def test_light_se_reweights_with_softmax_and_residual() -> None:
    se = LightSE(4)
    e = torch.randn(5, 4, 3)
    w = se.weights(e)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    torch.testing.assert_close(se(e), e * (1 + w.unsqueeze(-1)))
    with pytest.raises(ValueError, match="4 fields"):
        se(torch.randn(5, 3, 3))


def test_cir_is_in_batch_softmax_over_positives(schema: Schema, batch: Batch) -> None:
    """The authors' reading (``cir_mask_positives=false``): every other row of the batch is a negative."""
    model = IntTower(schema, replace(SMALL, cir_mask_positives=False)).train()
    user, item = model.encode_user(batch), model.encode_item(batch)
    cir = model.cir_loss(batch, user, item)
    pos = torch.nonzero(batch.label > 0.5).squeeze(-1)
    u = F.normalize(user["rep"][pos], dim=-1)
    v = F.normalize(item["rep"], dim=-1)
    expected = F.cross_entropy(u @ v.T / SMALL.cir_temperature, pos)
    torch.testing.assert_close(cir, expected)
    assert cir.item() > 0


def test_cir_keeps_a_requests_other_positives_out_of_its_negatives(schema: Schema, batch: Batch) -> None:
    """A request batch holds all of a user's positives; none of them is a negative of another (by default)."""
    rid = torch.arange(len(batch)) // 8  # requests of 8 rows, several positives each
    label = (torch.arange(len(batch)) % 3 != 0).float()
    listed = replace(batch, request_id=rid, label=label)
    model = IntTower(schema, SMALL).train()
    user, item = model.encode_user(listed), model.encode_item(listed)
    u = F.normalize(user["rep"], dim=-1)
    v = F.normalize(item["rep"], dim=-1)
    terms = []
    for i in torch.nonzero(label > 0.5).squeeze(-1).tolist():
        keep = [j for j in range(len(batch)) if j == i or not (rid[j] == rid[i] and label[j] > 0.5)]
        assert len(keep) < len(batch) - 1  # the mask removed this request's other positives
        logits = (u[i] @ v[keep].T) / SMALL.cir_temperature
        terms.append(torch.logsumexp(logits, 0) - logits[keep.index(i)])
    torch.testing.assert_close(model.cir_loss(listed, user, item), torch.stack(terms).mean())
    unmasked = IntTower(schema, replace(SMALL, cir_mask_positives=False)).train()  # the loss reads only the states
    assert unmasked.cir_loss(listed, user, item) > model.cir_loss(listed, user, item)


def test_cir_is_added_and_trains_both_towers(schema: Schema, batch: Batch) -> None:
    """The public code computed this loss and dropped it; here auxiliary_loss carries it with gradients."""
    model = IntTower(schema, replace(SMALL, cir_weight=0.5)).train()
    user, item = model.encode_user(batch), model.encode_item(batch)
    aux = model.auxiliary_loss(batch, user, item)
    torch.testing.assert_close(aux, 0.5 * model.cir_loss(batch, user, item))
    aux.backward()
    assert model.user_layers[0].weight.grad.abs().sum() > 0
    assert model.item_layers[0].weight.grad.abs().sum() > 0
    assert model.item_se.linear.weight.grad.abs().sum() > 0


def test_cir_without_positives_is_zero(schema: Schema, batch: Batch) -> None:
    model = IntTower(schema, SMALL).train()
    negatives = replace(batch, label=torch.zeros_like(batch.label))
    cir = model.cir_loss(negatives, model.encode_user(negatives), model.encode_item(negatives))
    assert cir.item() == 0.0


def test_cir_needs_training_states_and_labels(schema: Schema, batch: Batch) -> None:
    model = IntTower(schema, SMALL).eval()
    with pytest.raises(ValueError, match="training mode"):
        model.cir_loss(batch, model.encode_user(batch), model.encode_item(batch))
    model.train()
    unlabelled = replace(batch, label=None)
    with pytest.raises(ValueError, match="label"):
        model.cir_loss(unlabelled, model.encode_user(unlabelled), model.encode_item(unlabelled))


def test_published_configuration_builds(schema: Schema, batch: Batch) -> None:
    config = IntTowerConfig(hidden=(300, 300, 300), user_heads=32, item_heads=32, head_dim=64)
    model = IntTower(schema, config).eval()
    with torch.no_grad():
        assert model(batch.select(slice(0, 4))).shape == (4,)


def test_bad_config(schema: Schema) -> None:
    with pytest.raises(ConfigError, match="heads"):
        IntTower(schema, replace(SMALL, user_heads=0))
    with pytest.raises(ConfigError, match="cir_temperature"):
        IntTower(schema, replace(SMALL, cir_temperature=0.0))


def test_score_cost_is_the_fe_block(schema: Schema, batch: Batch) -> None:
    config = IntTowerConfig(hidden=(32, 16, 8), user_heads=4, item_heads=4, head_dim=8)
    cost = score_cost(IntTower(schema, config), batch)
    dots = 2 * 3 * 4 * 4 * 8  # L x H_u x H_i dot products of width d, 2 FLOPs per multiply-add
    assert dots <= cost["score_flops_per_candidate"] <= 1.3 * dots
    assert cost["item_cache_bytes_per_item"] == 4 * 4 * 8


def test_one_user_serving_path_equals_the_differentiable_path(schema: Schema) -> None:
    model = IntTower(schema).eval()  # default heads: 1024 candidates per block in the serving path
    user, item = {"heads": torch.randn(1, 3, 8, 16)}, {"heads": torch.randn(2500, 8, 16)}  # 3 blocks, one partial
    with torch.no_grad():
        serving = model.score(user, item)
    torch.testing.assert_close(serving, model.score(user, item).detach())  # grad mode: the einsum path
