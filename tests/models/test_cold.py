"""COLD: SE block over every field, exact first-layer split, feature importance."""

from __future__ import annotations

import pytest
import torch

from prerank.bench.cost import score_cost
from prerank.data.batch import Batch
from prerank.layers.field import squeeze
from prerank.models.base import ConfigError
from prerank.models.cold import COLD, COLDConfig
from prerank.schema import Schema

SE_BLOCKS = ("linear", "squeeze")


def _unsplit_forward(model: COLD, batch: Batch) -> torch.Tensor:
    """COLD written as in the paper, with no serving split: SE-reweighted concatenated fields -> MLP."""
    e = model.emb.fields(batch, model.names)  # [B, F, D]
    n_fields, d = e.shape[1], e.shape[2]
    if model.config.se_block == "linear":
        w_gate = model.gate.weight.reshape(n_fields * d, n_fields)  # [F*D, F]
        s = torch.sigmoid(e.flatten(1) @ w_gate + model.gate_bias)
    else:
        s = model.senet.excite(squeeze(e))
    v = (e * s.unsqueeze(-1)).flatten(1)  # [B, F*D]
    w1 = model.first.weight.reshape(n_fields * d, -1)  # [F*D, H1]
    h = torch.relu(v @ w1 + model.first_bias)
    return model.head(h).squeeze(-1)


@pytest.mark.parametrize("se_block", SE_BLOCKS)
def test_split_scoring_equals_the_unsplit_network(se_block: str, schema: Schema, batch: Batch) -> None:
    model = COLD(schema, COLDConfig(se_block=se_block)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), _unsplit_forward(model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("se_block", SE_BLOCKS)
def test_one_user_against_cached_items(se_block: str, schema: Schema, batch: Batch) -> None:
    """A user state of one row broadcast over N cached item states scores like N full rows."""
    model = COLD(schema, COLDConfig(se_block=se_block)).eval()
    user_side = {f.name for f in schema.tower("user", "context")}
    request = Batch(
        features={k: v[:1].expand_as(v).clone() if k in user_side else v for k, v in batch.features.items()}
    )
    with torch.no_grad():
        cached = model.score(model.encode_user(request.select(slice(0, 1))), model.encode_item(request), request)
        torch.testing.assert_close(cached, _unsplit_forward(model, request), rtol=1e-5, atol=1e-5)


def test_state_shapes(schema: Schema, batch: Batch) -> None:
    model = COLD(schema, COLDConfig(hidden=(32, 8)))
    n_user, n_item, n_all = len(model.sel.user), len(model.sel.item), len(model.names)
    user, item = model.encode_user(batch), model.encode_item(batch)
    assert user["proj"].shape == (len(batch), n_user, 32) and user["gate"].shape == (len(batch), n_all)
    assert item["fields"].shape == (len(batch), n_item, 16) and item["gate"].shape == (len(batch), n_all)
    squeezed = COLD(schema, COLDConfig(hidden=(32, 8), se_block="squeeze")).encode_item(batch)
    assert squeezed["gate"].shape == (len(batch), n_item)


def test_se_weights_scale_the_fields(schema: Schema, batch: Batch) -> None:
    """Forcing one field's gate to ~0 makes the score independent of that field."""
    model = COLD(schema).eval()
    field = model.names.index("age")
    with torch.no_grad():
        model.gate_bias[field] = -1e4
        other_age = Batch(features={**batch.features, "age": (batch.features["age"] % 4) + 1})
        torch.testing.assert_close(model(batch), model(other_age))
        model.gate_bias[field] = 0.0
        assert not torch.allclose(model(batch), model(other_age))


def test_cross_features_are_used_and_required(schema: Schema, batch: Batch) -> None:
    model = COLD(schema).eval()
    assert set(model.sel.cross) == {"user_cat_affinity", "user_cat_clicks"}
    user, item = model.encode_user(batch), model.encode_item(batch)
    with pytest.raises(ValueError, match="cross features"):
        model.score(user, item, None)
    no_cross = COLD(schema, COLDConfig(use_cross=False)).eval()
    assert no_cross.score(no_cross.encode_user(batch), no_cross.encode_item(batch), None).shape == (len(batch),)


@pytest.mark.parametrize("se_block", SE_BLOCKS)
def test_feature_importance(se_block: str, schema: Schema, batch: Batch) -> None:
    model = COLD(schema, COLDConfig(se_block=se_block))
    imp = model.feature_importance(batch)
    assert list(imp) == list(model.names) and len(imp) == len(schema.features)
    assert all(0.0 < v < 1.0 for v in imp.values())
    expected = model.field_weights(batch).mean(0)
    torch.testing.assert_close(torch.tensor(list(imp.values())), expected.detach(), rtol=1e-5, atol=1e-6)
    halves = [batch.select(slice(0, 40)), batch.select(slice(40, None))]
    assert model.feature_importance(halves) == pytest.approx(imp, rel=1e-5)


def test_feature_importance_of_nothing_is_an_error(schema: Schema) -> None:
    with pytest.raises(ValueError, match="at least one row"):
        COLD(schema).feature_importance([])


def test_bad_config(schema: Schema) -> None:
    with pytest.raises(ConfigError, match="se_block"):
        COLD(schema, COLDConfig(se_block="bilinear"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="hidden"):
        COLD(schema, COLDConfig(hidden=()))


def test_score_cost_is_below_the_unsplit_network(schema: Schema, batch: Batch) -> None:
    config = COLDConfig(hidden=(256, 128, 64))
    model = COLD(schema, config)
    cost = score_cost(model, batch)
    n_fields, n_item, d = len(model.names), len(model.sel.item), config.embedding_dim
    mlp_after_first = 2 * (256 * 128 + 128 * 64 + 64 * 1)
    unsplit = 2 * n_fields * d * 256 + mlp_after_first
    assert mlp_after_first < cost["score_flops_per_candidate"] < unsplit
    assert cost["item_cache_bytes_per_item"] == 4 * (n_item * d + n_fields)


def test_no_candidates(schema: Schema, batch: Batch) -> None:
    model = COLD(schema).eval()
    none = batch.select(slice(0, 0))
    with torch.no_grad():
        assert model.score(model.encode_user(batch.select(slice(0, 1))), model.encode_item(none), none).shape == (0,)
