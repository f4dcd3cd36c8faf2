"""FIT: shapes, training path == inference path, trainable selection, ablation scorers, cost."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prerank.bench.cost import FlopCounter, score_cost
from prerank.data.batch import Batch
from prerank.models.base import ConfigError
from prerank.models.fit import FIT, FITConfig
from prerank.models.registry import build_model
from prerank.schema import Schema
from prerank.train.checkpoint import load_model, save_checkpoint

VARIANTS = ("fit", "fit_no_mqm", "fit_no_lss", "fit_summax", "fit_fc")


def _one_request(batch: Batch, schema: Schema) -> Batch:
    """Row 0's user/context features on every row: one user, N candidates."""
    user_side = {f.name for f in schema.tower("user", "context")}
    feats = {k: (v[:1].expand_as(v).clone() if k in user_side else v) for k, v in batch.features.items()}
    return Batch(features=feats, label=batch.label)


def test_state_shapes_and_meta_index(schema: Schema, batch: Batch) -> None:
    cfg = FITConfig()
    model = FIT(schema, cfg).eval()
    b, m = len(batch), cfg.num_meta
    with torch.no_grad():
        user, item = model.encode_user(batch), model.encode_item(batch)
    assert set(user) == {"user"} and user["user"].shape == (b, m, cfg.user_heads, cfg.head_dim)
    assert set(item) == {"item", "meta_index"}
    assert item["item"].shape == (b, cfg.item_heads, cfg.head_dim)
    idx = item["meta_index"]
    assert idx.dtype == torch.int64 and idx.shape == (b,)
    assert int(idx.min()) >= 0 and int(idx.max()) < m
    # cosine selection spreads random items over several meta vectors from the start
    assert idx.unique().numel() > 1


def test_training_mode_states_are_the_one_query_path(schema: Schema, batch: Batch) -> None:
    """In training mode the user state has no M axis: one selected meta query per row goes through DIN."""
    cfg = FITConfig()
    model = FIT(schema, cfg).train()
    user, item = model.encode_user(batch), model.encode_item(batch)
    assert set(user) == {"fields", "keys", "key_mask"}
    n_keys = 4 + schema["hist_item_id"].max_len  # user_id, age, user_ctr, hour + the behaviour sequence
    assert user["keys"].shape == (len(batch), n_keys, cfg.embedding_dim)
    assert item["query"].shape == (len(batch), cfg.embedding_dim)
    # the straight-through query's value is exactly the chosen meta vector
    assert torch.equal(item["query"].detach(), model.selector.meta.detach()[item["meta_index"]])


def test_training_path_equals_precomputed_meta_path_in_eval_mode(schema: Schema, batch: Batch) -> None:
    model = FIT(schema).eval()
    with torch.no_grad():
        selected = model(batch)  # select one meta query per row, then DIN
        precomputed = model.score(model.user_per_meta(batch), model.encode_item(batch), batch)
        request = _one_request(batch, schema)
        one_user = model.score(model.user_per_meta(request.select(slice(0, 1))), model.encode_item(request), request)
    torch.testing.assert_close(selected, precomputed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(request), one_user, rtol=1e-5, atol=1e-6)
    # the scores depend on the meta index: forcing another index changes them
    item = model.encode_item(request)
    shifted = {**item, "meta_index": (item["meta_index"] + 1) % model.selector.num_meta}
    with torch.no_grad():
        other = model.score(model.user_per_meta(request.select(slice(0, 1))), shifted, request)
    assert not torch.allclose(one_user, other)


def test_task_loss_trains_the_selection(schema: Schema, batch: Batch) -> None:
    """Straight-through: BCE alone reaches the attention unit's key projection and unchosen meta rows."""
    model = FIT(schema, FITConfig(cluster_weight=0.0)).train()
    assert model.auxiliary_loss(batch, {}, {}) is None
    loss = F.binary_cross_entropy_with_logits(model(batch), batch.label)
    loss.backward()
    assert model.key_proj.weight.grad is not None and model.key_proj.weight.grad.abs().sum() > 0
    chosen = model.encode_item(batch)["meta_index"].unique()
    unchosen = torch.ones(model.selector.num_meta, dtype=torch.bool)
    unchosen[chosen] = False
    grad = model.selector.meta.grad
    assert grad is not None
    assert grad[chosen].abs().sum() > 0
    assert unchosen.any() and grad[unchosen].abs().sum() > 0
    # the item encoder (its feature embeddings) gets gradient through the selection, not only the scorer
    model.zero_grad()
    model.encode_item(batch)["query"].sum().backward()
    for table in ("item_id", "category_id", "genres"):
        grad = model.emb.tables[table].weight.grad
        assert grad is not None and grad.abs().sum() > 0, table


def test_cluster_loss_pulls_the_chosen_meta_vector_toward_its_items(schema: Schema, batch: Batch) -> None:
    cfg = FITConfig(cluster_weight=1.0, commitment=0.25)
    model = FIT(schema, cfg).train()
    item = model.encode_item(batch)
    aux = model.auxiliary_loss(batch, model.encode_user(batch), item)
    assert aux is not None and aux.dim() == 0 and aux > 0
    aux.backward()
    grad = model.selector.meta.grad
    assert grad is not None
    chosen = item["meta_index"].unique()
    unchosen = torch.ones(cfg.num_meta, dtype=torch.bool)
    unchosen[chosen] = False
    assert grad[chosen].abs().sum() > 0 and grad[unchosen].abs().sum() == 0
    assert model.key_proj.weight.grad is not None and model.key_proj.weight.grad.abs().sum() > 0
    # one gradient step on the clustering loss alone raises the items' similarity to their meta vectors
    before = model.selector.logits(item["key"].detach()).gather(1, item["meta_index"][:, None]).mean()
    with torch.no_grad():
        model.selector.meta -= 0.5 * grad
    after = model.selector.logits(item["key"].detach()).gather(1, item["meta_index"][:, None]).mean()
    assert after > before


def test_cluster_loss_is_recomputed_from_an_eval_item_state(schema: Schema, batch: Batch) -> None:
    model = FIT(schema).train()
    train_aux = model.auxiliary_loss(batch, {}, model.encode_item(batch))
    with torch.no_grad():
        model.eval()
        cached = model.encode_item(batch)
    model.train()
    torch.testing.assert_close(model.auxiliary_loss(batch, {}, cached), train_aux)


def test_lss_matches_its_equations(schema: Schema, batch: Batch) -> None:
    model = FIT(schema).eval()
    lss = model.scorer
    u, v = torch.randn(5, lss.user_heads, lss.head_dim), torch.randn(5, lss.item_heads, lss.head_dim)
    sim = torch.einsum("nid,njd->nij", u, v)
    pre = (sim * lss.row_weight).sum(-1) + lss.row_bias
    rows = torch.where(pre > 0, pre, lss.activation.weight * pre)
    expected = rows @ lss.column.weight[0] + lss.column.bias
    torch.testing.assert_close(lss(u, lss.mix(v)), expected)
    # not a dot product in disguise: a bilinear score minus its bias is odd in u, this one is not
    x = lss.mix(v)
    assert not torch.allclose(lss(u, x) - lss.column.bias, -(lss(-u, x) - lss.column.bias))


def test_ablation_scorers_match_their_definitions(schema: Schema) -> None:
    u, v = torch.randn(5, 4, 8), torch.randn(5, 4, 8)
    summax = build_model("fit_summax", schema).scorer
    expected = torch.einsum("nid,njd->nij", u, v).amax(-1).sum(-1) + summax.bias
    torch.testing.assert_close(summax(u, v), expected)
    dot = build_model("fit_no_lss", schema).scorer
    a, b = torch.randn(5, 32), torch.randn(5, 32)
    torch.testing.assert_close(dot(a, b), (a * b).sum(-1) + dot.bias)
    fc = build_model("fit_fc", schema).scorer
    ua, vb = fc.user_part(a), fc.item_part(b)
    whole = fc.out(
        F.relu(torch.cat([a, b], -1) @ torch.cat([fc.user_proj.weight, fc.item_proj.weight], 1).T + fc.item_proj.bias)
    )
    torch.testing.assert_close(fc(ua, vb), whole.squeeze(-1))


@pytest.mark.parametrize("name", ("fit", "fit_no_lss", "fit_summax", "fit_fc"))
def test_scoring_by_meta_index_equals_scoring_gathered_rows(name: str, schema: Schema) -> None:
    scorer = build_model(name, schema).scorer
    user = scorer.user_part(torch.randn(6, 32))  # one user's part per meta vector [M, *U]
    item = scorer.item_part(torch.randn(9, 32))
    index = torch.randint(0, 6, (9,))
    with torch.no_grad():
        expected = scorer(user[index], item)
        torch.testing.assert_close(scorer(user, item, index), expected)
    # with autograd on, the per-candidate ops keep the factors they need: the gradients match too
    leaf = user.detach().requires_grad_()
    scorer(leaf, item.detach(), index).sum().backward()
    grad = leaf.grad
    leaf.grad = None
    scorer(leaf[index], item.detach()).sum().backward()
    torch.testing.assert_close(grad, leaf.grad)


def test_no_mqm_variant_is_a_plain_two_tower(schema: Schema, batch: Batch) -> None:
    model = build_model("fit_no_mqm", schema).eval()
    assert not hasattr(model, "selector") and not hasattr(model, "din")
    with torch.no_grad():
        user, item = model.encode_user(batch), model.encode_item(batch)
    assert user["user"].shape == (len(batch), 4, 8) and set(item) == {"item"}
    assert model.auxiliary_loss(batch, user, item) is None


@pytest.mark.parametrize("name", VARIANTS)
def test_score_is_much_cheaper_than_the_full_forward(name: str, schema: Schema, batch: Batch) -> None:
    model = build_model(name, schema)
    request = _one_request(batch, schema)
    cost = score_cost(model, request)
    with torch.no_grad(), FlopCounter() as counter:
        model(request)
    full_per_row = counter.flops / len(request)
    assert 0 < cost["score_flops_per_candidate"] < full_per_row / 10
    cfg = model.config
    index_bytes = 8 if cfg.use_mqm else 0
    item_floats = {"lss": 32, "summax": 32, "dot": cfg.rep_dim, "fc": cfg.fc_hidden}[cfg.scorer]
    assert cost["item_cache_bytes_per_item"] == 4 * item_floats + index_bytes


def test_lss_score_flops_follow_the_head_count(schema: Schema, batch: Batch) -> None:
    request = _one_request(batch, schema)
    flops = {
        (h_u, h_v): score_cost(FIT(schema, FITConfig(user_heads=h_u, item_heads=h_v)), request)[
            "score_flops_per_candidate"
        ]
        for h_u, h_v in ((2, 2), (8, 8), (2, 8))
    }
    # the item heads are mixed per item (item_part), so per candidate only the H_u dot products of width d
    # remain: 4x the user heads is about 4x the FLOPs, and the number of item heads does not count
    assert flops[8, 8] > 3 * flops[2, 2]
    assert flops[2, 8] == flops[2, 2]


def test_per_row_user_state_without_selected_query_is_an_error(schema: Schema, batch: Batch) -> None:
    model = FIT(schema).train()
    user = model.encode_user(batch)
    model.eval()
    with pytest.raises(ValueError, match="query"):
        model.score(user, model.encode_item(batch), batch)
    with pytest.raises(ValueError, match="meta_index"):
        model.score(model.encode_user(batch), {"item": model.encode_item(batch)["item"]}, batch)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_meta": 0}, "num_meta"),
        ({"scorer": "cosine"}, "scorer"),
        ({"temperature": 0.0}, "temperature"),
        ({"cluster_weight": -1.0}, "cluster_weight"),
        ({"user_heads": 0}, "user_heads"),
    ],
)
def test_bad_config_names_the_field(overrides: dict, field: str, schema: Schema) -> None:
    with pytest.raises(ConfigError, match=field):
        build_model("fit", schema, overrides)


def test_checkpoint_round_trip(tmp_path: Path, schema: Schema, batch: Batch) -> None:
    model = build_model("fit", schema).eval()
    save_checkpoint(tmp_path / "fit.pt", "fit", model)
    name, loaded, _ = load_model(tmp_path / "fit.pt")
    assert name == "fit"
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch))


def test_learns_a_user_item_interaction(schema: Schema, batch: Batch) -> None:
    """A few steps of Adam on a label that is an interaction of user age and item category."""
    torch.set_num_threads(1)
    model = FIT(schema, FITConfig(hidden=(32,))).train()
    label = ((batch.features["age"] % 2) == (batch.features["category_id"] % 2)).float()
    data = Batch(features=batch.features, label=label)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        user, item = model.encode_user(data), model.encode_item(data)
        main = F.binary_cross_entropy_with_logits(model.score(user, item, data), label)
        return main + model.auxiliary_loss(data, user, item)

    first = float(loss().detach())
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = F.binary_cross_entropy_with_logits(model(data), label)
    assert final < 0.5 * first


@pytest.mark.parametrize(
    "features",
    [
        ("user_id", "age", "hour", "item_id", "genres"),  # no user sequence: DIN keys are the user fields only
        ("hist_item_id", "item_id"),  # only a behaviour sequence as DIN keys
        ("user_id", "hist_item_id", "item_ctr"),  # dense-only item side: the key falls back to the dense field
    ],
)
def test_feature_subsets_keep_both_paths_equal(features: tuple[str, ...], schema: Schema, batch: Batch) -> None:
    model = FIT(schema, FITConfig(features=features)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model.score(model.encode_user(batch), model.encode_item(batch), batch))
        keys = model.user_inputs(batch)["keys"]
    n_singles = sum(schema[f].tower in ("user", "context") and schema[f].kind != "sequence" for f in features)
    n_seq = sum(schema[f].max_len for f in features if schema[f].tower == "user" and schema[f].kind == "sequence")
    assert keys.shape[1] == n_singles + n_seq


def test_dead_meta_vectors_restart_at_item_keys() -> None:
    from prerank.layers.fit_parts import MetaQuerySelector

    torch.manual_seed(0)
    sel = MetaQuerySelector(4, 3, temperature=0.1, restart_threshold=0.5, usage_decay=0.5)
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    index = torch.tensor([0, 0, 0, 1])  # vectors 2 and 3 are chosen by no item
    for _ in range(3):
        sel.observe(keys, index)
    assert sel.usage[2] < 0.5 / 4 and sel.usage[3] < 0.5 / 4 and sel.usage[0] > 0.5 / 4
    live_norm = sel.meta[:2].norm(dim=-1).mean()
    before = sel.meta.detach().clone()
    assert sel.restart_dead() == 2
    assert torch.equal(sel.meta[:2], before[:2])  # live vectors untouched
    unit_keys = F.normalize(keys, dim=-1)
    for row in sel.meta[2:]:
        assert torch.allclose(row.norm(), live_norm)
        assert (unit_keys @ F.normalize(row, dim=0)).max().item() == pytest.approx(1.0, abs=1e-6)  # a key direction
    assert sel.restart_dead() == 0  # their usage was reset to the uniform share
    off = MetaQuerySelector(4, 3, temperature=0.1, restart_threshold=0.0)
    off.observe(keys, index)
    assert off.restart_dead() == 0


def test_training_keeps_the_meta_vectors_apart_and_reports_it(schema: Schema, batch: Batch) -> None:
    def train(threshold: float) -> FIT:
        torch.manual_seed(0)
        model = FIT(schema, FITConfig(num_meta=8, restart_threshold=threshold, cluster_weight=1.0)).train()
        model.selector.usage_decay = 0.8  # a 60-step run: forget faster than the default 0.99
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(60):
            user, item = model.encode_user(batch), model.encode_item(batch)
            loss = F.binary_cross_entropy_with_logits(model.score(user, item, batch), batch.label)
            loss = loss + model.auxiliary_loss(batch, user, item)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model

    plain, restarted = train(0.0).meta_report(batch), train(0.3).meta_report(batch)
    assert set(plain) == {"meta_mean_cosine", "meta_used", "meta_user_spread"}
    assert plain["meta_used"] <= 3 and restarted["meta_used"] >= 6  # of 8; the items' choices spread out
    assert FIT(schema, FITConfig(use_mqm=False)).meta_report(batch) == {}
