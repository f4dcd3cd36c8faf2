"""RankTower (Yan & Li 2024): shapes, the detached gate, GAU and max-sim against the equations, costs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from prerank.bench.cost import score_cost
from prerank.data.batch import Batch
from prerank.layers.gau import GatedAttentionUnit, GatedCrossAttentionLayer, MultiHeadGatedNetwork
from prerank.losses import build_loss, to_lists
from prerank.models.base import ConfigError
from prerank.models.rank_tower import RankTower, RankTowerConfig, max_similarity
from prerank.models.registry import build_model
from prerank.schema import Schema
from prerank.train.checkpoint import load_model, save_checkpoint


def one_request(batch: Batch, schema: Schema, n: int) -> Batch:
    """Row 0's user/context features on the first n rows: one request, n candidates."""
    user_side = {f.name for f in schema.tower("user", "context")}
    rows = batch.select(slice(0, n))
    feats = {k: (v[:1].expand_as(v).clone() if k in user_side else v) for k, v in rows.features.items()}
    return Batch(features=feats, label=rows.label)


def test_states_and_scores_have_the_documented_shapes(schema: Schema, batch: Batch) -> None:
    cfg = RankTowerConfig(user_heads=3, item_heads=5, head_dim=8, attention_dim=6, value_dim=10)
    model = RankTower(schema, cfg).eval()
    user, item = model.encode_user(batch), model.encode_item(batch)
    b = len(batch)
    widths = {"r": 8, "q": 6, "g": 10, "k": 6, "v": 10}
    assert {k: tuple(v.shape) for k, v in user.items()} == {"e": (b, 3, 8)}
    assert {k: tuple(v.shape) for k, v in item.items()} == {k: (b, 5, w) for k, w in widths.items()}
    assert model.score(user, item).shape == (b,)  # cross features are not used: pair may be None


@pytest.mark.parametrize("cross_layers", [1, 2])
def test_one_user_state_broadcasts_over_candidates(schema: Schema, batch: Batch, cross_layers: int) -> None:
    model = RankTower(schema, RankTowerConfig(user_heads=2, item_heads=3, cross_layers=cross_layers)).eval()
    request = one_request(batch, schema, 16)
    with torch.no_grad():
        full = model(request)
        cached = model.score(model.encode_user(request.select(slice(0, 1))), model.encode_item(request))
    torch.testing.assert_close(full, cached, rtol=1e-5, atol=1e-6)


def test_multi_head_gated_network_matches_eq_1() -> None:
    net = MultiHeadGatedNetwork(6, (8,), heads=2, head_dim=3, gate_hidden=4)
    x = torch.randn(5, 6)
    e = net(x)
    expected = (net.mlp(x) * torch.sigmoid(net.gate(x))).view(5, 2, 3)
    torch.testing.assert_close(e, expected)


def test_gate_sends_no_gradient_into_the_input() -> None:
    net = MultiHeadGatedNetwork(6, (8,), heads=2, head_dim=3, gate_hidden=4)
    x = torch.randn(5, 6, requires_grad=True)
    (g,) = torch.autograd.grad(net(x).square().sum(), x)
    gate_const = torch.sigmoid(net.gate(x)).detach()
    (g_detached,) = torch.autograd.grad((net.mlp(x) * gate_const).view(5, 2, 3).square().sum(), x)
    (g_through,) = torch.autograd.grad((net.mlp(x) * torch.sigmoid(net.gate(x))).view(5, 2, 3).square().sum(), x)
    torch.testing.assert_close(g, g_detached)
    assert not torch.allclose(g, g_through)  # the check above can tell the two apart
    net(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.gate.parameters())


def test_embeddings_learn_only_through_the_tower_mlp(schema: Schema, batch: Batch) -> None:
    def embedding_grad(silence_mlp: bool) -> float:
        model = RankTower(schema).train()
        if silence_mlp:  # the MLP's output no longer depends on X, only the (detached) gate does
            with torch.no_grad():
                model.user_tower.mlp[0].weight.zero_()
                model.item_tower.mlp[0].weight.zero_()
        F.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
        assert model.user_tower.gate[0].weight.grad.abs().sum() > 0
        return sum(p.grad.abs().sum().item() for p in model.emb.parameters() if p.grad is not None)

    assert embedding_grad(silence_mlp=False) > 0
    assert embedding_grad(silence_mlp=True) == 0.0


def test_gated_attention_unit_matches_eq_5_to_7() -> None:
    gau = GatedAttentionUnit(dim=4, attention_dim=3, value_dim=5)
    xq, xkv = torch.randn(2, 3, 4), torch.randn(2, 6, 4)
    q = F.silu(xq @ gau.w_q.weight.T + gau.w_q.bias)
    k = F.silu(xkv @ gau.w_k.weight.T + gau.w_k.bias)
    v = F.silu(xkv @ gau.w_v.weight.T + gau.w_v.bias)
    u = torch.sigmoid(xq @ gau.w_u.weight.T + gau.w_u.bias)
    a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(3), dim=-1)
    expected = (u * (a @ v)) @ gau.w_o.weight.T + gau.w_o.bias
    torch.testing.assert_close(gau(xq, xkv), expected)
    assert a.shape == (2, 3, 6)  # A in R^{H_q x H_k}


def test_cross_attention_is_bidirectional_with_residual_and_norm() -> None:
    layer = GatedCrossAttentionLayer(dim=4, attention_dim=4, value_dim=4)
    e_u, e_i = torch.randn(1, 2, 4), torch.randn(1, 3, 4)
    out_u, out_i = layer(e_u, e_i)
    torch.testing.assert_close(out_u, layer.user_norm(e_u + layer.user_gau(e_u, e_i)))
    torch.testing.assert_close(out_i, layer.item_norm(e_i + layer.item_gau(e_i, e_u)))
    other_u, _ = layer(e_u, torch.randn(1, 3, 4))
    assert not torch.allclose(out_u, other_u)  # the user's attended embedding depends on the candidate


def test_max_similarity_matches_eq_8_by_hand() -> None:
    e_u = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    e_i = torch.tensor([[[3.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]])
    # user 1: max(1, 1/sqrt2, -1) = 1; user 2: max(0, 1/sqrt2, 0) = 1/sqrt2
    assert max_similarity(e_u, e_i).item() == pytest.approx(1.0 + 1.0 / math.sqrt(2.0))


def test_temperature_is_learnable(schema: Schema, batch: Batch) -> None:
    model = RankTower(schema, RankTowerConfig(temperature=0.5, bias=False)).eval()
    assert "log_temperature" in dict(model.named_parameters())
    assert model.temperature.item() == pytest.approx(0.5)
    with torch.no_grad():
        before = model(batch)
        model.log_temperature.fill_(math.log(0.25))
        after = model(batch)
    torch.testing.assert_close(after, 2.0 * before)  # logits scale with 1 / tau
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
    assert model.log_temperature.grad.abs() > 0
    opt.step()
    assert model.temperature.item() != pytest.approx(0.25)


def test_score_cost_counts_only_the_pair_dependent_work(schema: Schema, batch: Batch) -> None:
    cfg = RankTowerConfig()
    model = RankTower(schema, cfg)
    h_u, h_i, k, dk, dv = cfg.user_heads, cfg.item_heads, cfg.head_dim, cfg.attention_dim, cfg.value_dim
    small, large = score_cost(model, one_request(batch, schema, 8)), score_cost(model, one_request(batch, schema, 64))
    flops = large["score_flops_per_candidate"]
    # linear in N, up to a per-request constant (the user's projections, its gate folded into W_O)
    marginal = (64 * flops - 8 * small["score_flops_per_candidate"]) / 56
    per_request = 64 * (flops - marginal)
    assert 0 < per_request <= 2 * (4 * h_u * k * (dk + dv) + h_u * dv * k)
    # matrix products per candidate: Q K^T and A V in both branches, both W_O, the cosine matrix
    matmuls = 2 * (2 * h_u * h_i * dk + 2 * h_u * h_i * dv) + 2 * (h_u + h_i) * dv * k + 2 * h_u * h_i * k
    assert matmuls <= marginal <= 1.5 * matmuls
    assert large["item_cache_bytes_per_item"] == 4 * h_i * (k + 2 * dk + 2 * dv)
    # the towers are not re-run per candidate: a full forward costs far more per row
    two_tower = score_cost(build_model("two_tower", schema), one_request(batch, schema, 8))
    assert two_tower["score_flops_per_candidate"] < flops


def test_bad_config_is_named(schema: Schema) -> None:
    with pytest.raises(ConfigError, match="user_heads"):
        RankTower(schema, RankTowerConfig(user_heads=0))
    with pytest.raises(ConfigError, match="temperature"):
        RankTower(schema, RankTowerConfig(temperature=0.0))
    with pytest.raises(ConfigError, match="dropout"):
        RankTower(schema, RankTowerConfig(dropout=1.0))
    with pytest.raises(ConfigError, match="cross_layers"):
        build_model("rank_tower", schema, {"cross_layers": 0})


def test_checkpoint_round_trip(schema: Schema, batch: Batch, tmp_path: Path) -> None:
    model = build_model("rank_tower", schema, {"hidden": [32, 16], "cross_layers": 2}).eval()
    save_checkpoint(tmp_path / "rt.pt", "rank_tower", model)
    name, loaded, _ = load_model(tmp_path / "rt.pt")
    assert name == "rank_tower"
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(batch), model(batch))


def test_trains_with_the_hybrid_loss_on_request_lists(schema: Schema, batch: Batch) -> None:
    """The trainer's listwise path: model(batch.flat()) scattered back to [R, N] with to_lists."""
    r, n = 8, 8
    rows = batch.select(slice(0, r * n))
    lists = Batch(
        features={k: v.reshape(r, n, *v.shape[1:]) for k, v in rows.features.items()},
        label=rows.label.reshape(r, n),
        label_level=rows.label_level.reshape(r, n),
        stage=torch.randint(0, 4, (r, n)),
        teacher_logit=torch.randn(r, n),
        mask=torch.rand(r, n) < 0.8,
    )
    model = build_model("rank_tower", schema).train()
    logits = to_lists(model(lists.flat()), lists.mask)
    loss = build_loss("hybrid")(logits, lists)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert model.emb.tables["item_id"].weight.grad.abs().sum() > 0
    assert model.cross.layers[0].user_gau.w_q.weight.grad.abs().sum() > 0
