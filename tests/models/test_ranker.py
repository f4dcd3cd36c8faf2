"""The ranking teacher: every feature, DIN over sequences that share the item table, a big MLP."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prerank.bench.cost import score_cost
from prerank.data.batch import Batch
from prerank.models.base import ConfigError
from prerank.models.lr import LR
from prerank.models.ranker import CrossLayer, Ranker, RankerConfig
from prerank.schema import Schema

SMALL = RankerConfig(hidden=(32, 16), cross_layers=0)


def test_uses_every_feature_and_attends_over_the_item_history(schema: Schema) -> None:
    model = Ranker(schema, SMALL)
    assert set(model.sel.user + model.sel.item + model.sel.cross) == set(schema.names)
    assert model.attended == {"hist_item_id": model.sel.item.index("item_id")}
    assert "hist_item_id" not in model.user_fields and "genres" in model.sel.item
    assert RankerConfig().hidden == (512, 256) and RankerConfig().cross_layers == 3


def test_state_shapes(schema: Schema, batch: Batch) -> None:
    model = Ranker(schema, SMALL)
    user, item = model.encode_user(batch), model.encode_item(batch)
    assert user["fields"].shape == (len(batch), len(model.user_fields), 16)
    assert user["seq:hist_item_id"].shape == (len(batch), 6, 16)
    assert user["mask:hist_item_id"].shape == (len(batch), 6)
    assert item["fields"].shape == (len(batch), len(model.sel.item), 16)


def test_history_is_read_against_the_target_item(schema: Schema, batch: Batch) -> None:
    """DIN: the history's contribution depends on the candidate, and an empty history contributes nothing."""
    model = Ranker(schema, SMALL).eval()
    hist = batch.features["hist_item_id"]
    with torch.no_grad():
        query = model.emb.field(batch, "item_id")
        keys, mask = model.emb.sequence(batch, "hist_item_id")
        pooled = model.attention["hist_item_id"](query, keys, mask)
        other = model.attention["hist_item_id"](query.roll(1, 0), keys, mask)
    has_history = (hist > 0).any(-1)
    assert not torch.allclose(pooled[has_history], other[has_history])
    assert (pooled[~has_history] == 0).all()
    without = Batch(features={**batch.features, "hist_item_id": torch.zeros_like(hist)})
    with torch.no_grad():
        assert not torch.allclose(model(batch)[has_history], model(without)[has_history])


def test_without_the_item_id_the_history_is_pooled(schema: Schema, batch: Batch) -> None:
    names = tuple(n for n in schema.names if n != "item_id")
    model = Ranker(schema, RankerConfig(hidden=(8,), features=names)).eval()
    assert model.attended == {} and "hist_item_id" in model.user_fields
    assert model(batch).shape == (len(batch),)


def test_without_target_attention_the_history_is_pooled(schema: Schema, batch: Batch) -> None:
    model = Ranker(schema, RankerConfig(hidden=(8,), target_attention=False)).eval()
    assert model.attended == {} and "hist_item_id" in model.user_fields and not model.attention
    assert "item_id" in model.sel.item and model(batch).shape == (len(batch),)


def test_cross_features_are_required(schema: Schema, batch: Batch) -> None:
    model = Ranker(schema, SMALL).eval()
    with pytest.raises(ValueError, match="cross features"):
        model.score(model.encode_user(batch), model.encode_item(batch), None)


def test_bad_config(schema: Schema) -> None:
    with pytest.raises(ConfigError, match="hidden"):
        Ranker(schema, RankerConfig(hidden=()))


def test_score_cost_covers_attention_the_cross_layers_and_the_whole_mlp(schema: Schema, batch: Batch) -> None:
    model = Ranker(schema)
    cost = score_cost(model, batch)
    n_fields = len(model.user_fields) + len(model.attended) + len(model.sel.item) + len(model.sel.cross)
    k = n_fields * 16
    mlp = 2 * (k * 512 + 512 * 256 + 256)
    cross = 3 * 2 * k * k  # three full-rank [K, K] products
    din = 2 * 6 * (4 * 16 * 64 + 64 * 32 + 32)  # the activation unit over 6 behaviours
    assert mlp + cross + din <= cost["score_flops_per_candidate"] <= 1.2 * (mlp + cross + din)


def test_cross_layer_is_dcn_v2_eq_1_and_its_low_rank_form_eq_2() -> None:
    """``x_{l+1} = x_0 * (W x_l + b) + x_l``, by hand; with ``cross_rank`` ``W = U V^T``."""
    torch.manual_seed(0)
    x0, x = torch.randn(5, 6), torch.randn(5, 6)
    full = CrossLayer(6)
    w, b = full.up.weight, full.up.bias
    with torch.no_grad():
        b.normal_()
        want = torch.stack([x0[r] * (w @ x[r] + b) + x[r] for r in range(5)])
        torch.testing.assert_close(full(x0, x), want)
    low = CrossLayer(6, rank=2)
    u, v = low.up.weight, low.down.weight  # [6, 2], [2, 6]
    assert u.shape == (6, 2) and v.shape == (2, 6)
    with torch.no_grad():
        torch.testing.assert_close(low(x0, x), x0 * (x @ (u @ v).T + low.up.bias) + x)


def test_cross_layers_run_between_the_fields_and_the_mlp(schema: Schema, batch: Batch) -> None:
    """With cross layers the MLP reads Cross^L(x_0); without them it reads x_0 (checked by replaying the layers)."""
    model = Ranker(schema, RankerConfig(hidden=(8,), cross_layers=2, cross_rank=3)).eval()
    seen: list[torch.Tensor] = []
    model.mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        for layer in model.cross:
            layer.up.bias.normal_()
        model(batch)
        plain = Ranker(schema, RankerConfig(hidden=(8,), cross_layers=0)).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        plain.mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
        plain(batch)
        x0 = seen[1]
        x = model.cross[1](x0, model.cross[0](x0, x0))
    assert len(model.cross) == 2 and not torch.allclose(seen[0], x0)
    torch.testing.assert_close(seen[0], x)


def test_wide_adds_the_logistic_regression_of_every_feature(schema: Schema, batch: Batch) -> None:
    """``wide``: the logit is the deep logit plus LR's logit over the same features (Wide & Deep, Eq. 3)."""
    torch.manual_seed(0)
    model = Ranker(schema, RankerConfig(hidden=(8,), wide=True)).eval()
    assert isinstance(model.wide, LR)
    assert set(model.wide.sel.user + model.wide.sel.item + model.wide.sel.cross) == set(schema.names)
    with torch.no_grad():
        for p in model.wide.parameters():
            p.normal_()
        deep = Ranker(schema, RankerConfig(hidden=(8,))).eval()
        deep.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("wide.")})
        torch.testing.assert_close(model(batch), deep(batch) + model.wide(batch))
    assert Ranker(schema, SMALL).wide is None


def test_wide_only_fields_are_read_by_the_wide_part_alone(schema: Schema, batch: Batch) -> None:
    """``wide_only``: ids in the wide part only (Wide & Deep's split); the logit is deep(the rest) + LR(every field)."""
    torch.manual_seed(0)
    ids = ("user_id", "item_id", "hist_item_id")
    no_ids = tuple(n for n in schema.names if n not in ids)
    model = Ranker(schema, RankerConfig(hidden=(8,), wide=True, wide_only=ids))
    assert set(model.sel.user + model.sel.item + model.sel.cross) == set(no_ids) and not model.attended
    assert set(model.wide.sel.user + model.wide.sel.item + model.wide.sel.cross) == set(schema.names)
    model.eval()
    with torch.no_grad():
        for p in model.wide.parameters():
            p.normal_()
        deep = Ranker(schema, RankerConfig(hidden=(8,), features=no_ids)).eval()
        deep.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("wide.")})
        torch.testing.assert_close(model(batch), deep(batch) + model.wide(batch))
        flipped = replace(batch, features={**batch.features, "item_id": batch.features["item_id"].flip(0)})
        assert not torch.allclose(model(flipped), model(batch))
        torch.testing.assert_close(model(flipped) - model.wide(flipped), deep(batch))  # only the wide part reads it


def test_embedding_dropout_drops_field_vectors_in_training_only(schema: Schema, batch: Batch) -> None:
    model = Ranker(schema, RankerConfig(hidden=(8,), cross_layers=0, embedding_dropout=0.5))
    seen: list[torch.Tensor] = []
    model.mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    torch.manual_seed(0)
    model.train()(batch)
    model.eval()(batch)
    dropped = seen[0] == 0
    assert 0.3 < dropped.float().mean() < 0.7  # about half the inputs zeroed in training ...
    torch.testing.assert_close(seen[0][~dropped], 2 * seen[1][~dropped])  # ... the rest scaled by 1 / (1 - p)
    assert (seen[1] != 0).float().mean() > 0.9  # none in eval


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"cross_layers": -1}, "cross_layers"),
        ({"cross_rank": 0}, "cross_rank"),
        ({"embedding_dropout": 1.0}, "embedding_dropout"),
        ({"wide_only": ("item_id",)}, "wide_only needs wide"),
        ({"wide": True, "wide_only": ("nope",)}, "does not read"),
    ],
)
def test_bad_switches(schema: Schema, bad: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Ranker(schema, RankerConfig(hidden=(8,), **bad))


def test_a_checkpoint_from_before_cross_layers_loads_without_them(schema: Schema, tmp_path) -> None:
    """Its stored config has no ``cross_layers`` key; today's default (3) would not fit its weights."""
    from dataclasses import asdict

    from prerank.train.checkpoint import load_model, save_checkpoint

    old = Ranker(schema, RankerConfig(hidden=(16,), cross_layers=0))
    path = tmp_path / "old.pt"
    save_checkpoint(path, "ranker", old)
    ckpt = torch.load(path, weights_only=True)
    legacy = {k: v for k, v in asdict(old.config).items() if k not in ("cross_layers", "cross_rank", "wide")}
    torch.save({**ckpt, "model_config": legacy}, path)
    _, model, _ = load_model(path)
    assert model.config.cross_layers == 0 and model.config.hidden == (16,)
