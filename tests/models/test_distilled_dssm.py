"""Distilled DSSM: contract for every switch combination, FM identity, NOVA's non-invasive values,
SENET/bilinear shapes, the split MLP head, gradients."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from conftest import tiny_schema, tiny_table
from prerank.data.batch import Batch
from prerank.data.parquet import table_to_batch
from prerank.layers.attention import NOVAAttention
from prerank.layers.field import BILINEAR_TYPES, SENET, BilinearInteraction
from prerank.layers.mlp import SplitMLP
from prerank.models.base import ConfigError
from prerank.models.distilled_dssm import DistilledDSSM, DistilledDSSMConfig
from prerank.models.registry import MODELS, build_model
from prerank.schema import FeatureSpec, Schema

SWITCHES = ("use_fm", "use_nova", "use_senet", "use_bilinear")
COMBOS = [
    DistilledDSSMConfig(head=head, **dict(zip(SWITCHES, flags, strict=True)))
    for head in ("dot", "mlp")
    for flags in itertools.product((False, True), repeat=len(SWITCHES))
]


def _id(config: DistilledDSSMConfig) -> str:
    return config.head + "".join(f"-{s[4:]}" for s in SWITCHES if getattr(config, s))


def side_schema() -> Schema:
    """The tiny schema plus ``hist_category_id``, a side-info sequence aligned with ``hist_item_id``."""
    base = tiny_schema()
    extra = FeatureSpec("hist_category_id", "user", "sequence", max_len=6, shares="category_id", n_values=6)
    return replace(base, features=(*base.features, extra))


def one_request(batch: Batch, schema: Schema) -> Batch:
    user_side = {f.name for f in schema.tower("user", "context")}
    return Batch(features={k: v[:1].expand_as(v).clone() if k in user_side else v for k, v in batch.features.items()})


@pytest.mark.parametrize("config", COMBOS, ids=_id)
def test_contract_for_every_switch_combination(config: DistilledDSSMConfig, schema: Schema, batch: Batch) -> None:
    model = DistilledDSSM(schema, config).eval()
    request = one_request(batch, schema)
    with torch.no_grad():
        full = model(batch)
        torch.testing.assert_close(full, model.score(model.encode_user(batch), model.encode_item(batch)))
        # one user state [1, ...] broadcast over N cached items
        cached = model.score(model.encode_user(request.select(slice(0, 1))), model.encode_item(request))
        torch.testing.assert_close(cached, model(request), rtol=1e-5, atol=1e-6)
    assert full.shape == (len(batch),) and torch.isfinite(full).all()


@pytest.mark.parametrize("config", COMBOS, ids=_id)
def test_gradients_reach_every_parameter(config: DistilledDSSMConfig, schema: Schema, batch: Batch) -> None:
    model = DistilledDSSM(schema, config).train()
    torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None]
    assert not dead, f"parameters without gradient: {dead}"


def test_registered_ablation_rows() -> None:
    rows = {name: cfg for name, (cls, cfg) in MODELS.items() if cls is DistilledDSSM}
    assert set(rows) >= {"distilled_dssm", "dssm_plain", "dssm_mlp", "dssm_mlp_fm"}
    full = rows["distilled_dssm"]
    assert full.head == "mlp" and all(getattr(full, s) for s in SWITCHES)
    plain = rows["dssm_plain"]
    assert plain.head == "dot" and not any(getattr(plain, s) for s in SWITCHES)
    no_nova = build_model("distilled_dssm", tiny_schema(), {"use_nova": False})
    assert not hasattr(no_nova, "nova") and hasattr(no_nova, "senet")


def test_fm_is_the_sum_of_per_behaviour_inner_products(schema: Schema, batch: Batch) -> None:
    """``<sum_l e_{s_l}, e_t>`` equals ``sum_l <e_{s_l}, e_t>`` over the valid behaviours; padding adds nothing."""
    model = DistilledDSSM(schema, DistilledDSSMConfig(head="dot", use_nova=False))
    with torch.no_grad():
        table = model.emb.tables["item_id"].weight
        table[0].normal_()  # a non-zero padding row: excluded by the mask, not by the table
        got = model.fm(model.encode_user(batch), model.encode_item(batch))
    hist, target = batch.features["hist_item_id"], batch.features["item_id"]
    expected = torch.stack(
        [
            sum((torch.dot(table[s], table[t]) for s in row.tolist() if s > 0), torch.zeros(()))
            for row, t in zip(hist, target.tolist(), strict=True)
        ]
    )
    assert (hist == 0).any() and (hist > 0).any()
    torch.testing.assert_close(got, expected)


def test_fm_term_is_added_to_the_logit(schema: Schema, batch: Batch) -> None:
    with_fm = DistilledDSSM(schema, DistilledDSSMConfig(use_nova=False)).eval()
    without = DistilledDSSM(schema, DistilledDSSMConfig(use_nova=False, use_fm=False)).eval()
    without.load_state_dict(with_fm.state_dict())
    with torch.no_grad():
        user, item = with_fm.encode_user(batch), with_fm.encode_item(batch)
        torch.testing.assert_close(with_fm(batch), without(batch) + with_fm.fm(user, item))


def test_nova_side_info_moves_the_weights_not_the_values() -> None:
    torch.manual_seed(0)
    nova = NOVAAttention(8)
    items, side = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    other = side + torch.randn_like(side)
    w, w_other = nova.weights(items, side, mask), nova.weights(items, other, mask)
    assert not torch.allclose(w[:2], w_other[:2])
    # the outputs are weighted sums of the same values, E W_V, whatever the side information
    values = items @ nova.value.weight.T
    torch.testing.assert_close(nova(items, side, mask), w @ values)
    torch.testing.assert_close(nova(items, other, mask), w_other @ values)
    # padded keys get no weight; an empty sequence pools to 0
    assert (w[0][:, 3:] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 5))
    assert torch.equal(nova.pooled(items, side, mask)[2], torch.zeros(8))


def test_nova_reads_the_side_info_sequence_in_queries_and_keys_only() -> None:
    """In the model: changing ``hist_category_id`` changes the attention, never the values (item embeddings)."""
    schema = side_schema()
    batch = table_to_batch(tiny_table(32, 0, schema), schema)
    model = DistilledDSSM(schema, DistilledDSSMConfig(use_fm=False)).eval()
    assert model.history == "hist_item_id" and model.side_info == ("hist_category_id",)
    seen: list[tuple[torch.Tensor, ...]] = []
    hook = model.nova.register_forward_hook(lambda m, args, out: seen.append((args[0], args[1], out)))
    shifted = batch.features["hist_category_id"]
    shifted = torch.where(shifted > 0, shifted % 7 + 1, shifted)
    with torch.no_grad():
        model.encode_user(batch)
        model.encode_user(Batch(features={**batch.features, "hist_category_id": shifted}))
    hook.remove()
    (items, side, out), (items2, side2, out2) = seen
    assert torch.equal(items, items2)  # the values' input: the history's item embeddings only
    assert not torch.equal(side, side2) and not torch.allclose(out, out2)
    # the tiny schema has no side-info sequence: the recency position is the only side information
    assert DistilledDSSM(tiny_schema()).side_info == ()


def test_nova_recency_position_counts_back_from_the_latest_behaviour(schema: Schema, batch: Batch) -> None:
    """Histories are left-aligned: the last valid id is the latest, and gets recency position 0."""
    model = DistilledDSSM(schema).eval()
    seen: list[torch.Tensor] = []
    hook = model.nova.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    hist = torch.tensor([[5, 7, 9, 0, 0, 0], [4, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        model.encode_user(Batch(features={**{k: v[:2] for k, v in batch.features.items()}, "hist_item_id": hist}))
    hook.remove()
    pos = model.position.weight
    torch.testing.assert_close(seen[0][0, :3], pos[[2, 1, 0]])
    torch.testing.assert_close(seen[0][1, 0], pos[0])


@pytest.mark.parametrize("kind", BILINEAR_TYPES)
def test_bilinear_shapes_and_pairs(kind: str) -> None:
    torch.manual_seed(0)
    layer = BilinearInteraction(4, 8, kind)
    fields = torch.randn(5, 4, 8)
    out = layer(fields)
    assert out.shape == (5, 6, 8) and layer.num_pairs == 6
    n_maps = {"field_all": 1, "field_each": 4, "field_interaction": 6}[kind]
    assert layer.weight.shape == (n_maps, 8, 8)
    pairs = list(itertools.combinations(range(4), 2))
    for p, (i, j) in enumerate(pairs):
        w = layer.weight[{"field_all": 0, "field_each": i, "field_interaction": p}[kind]]
        torch.testing.assert_close(out[:, p], (fields[:, i] @ w) * fields[:, j])
    with pytest.raises(ValueError):
        BilinearInteraction(1, 8)


def test_item_tower_input_widths(schema: Schema, batch: Batch) -> None:
    d, f_i = 16, 4  # item_id, category_id, genres, item_ctr
    widths = {
        (False, False): f_i * d,
        (True, False): f_i * d,
        (False, True): f_i * d + 6 * d,
        (True, True): f_i * d + 2 * 6 * d,
    }
    for (senet, bilinear), width in widths.items():
        model = DistilledDSSM(schema, DistilledDSSMConfig(use_senet=senet, use_bilinear=bilinear))
        assert model.item_tower[0].in_features == width
        assert model.item_vector(batch).shape == (len(batch), 32)
    se = SENET(f_i)
    assert se(torch.randn(3, f_i, d)).shape == (3, f_i, d)


def test_split_mlp_head_equals_the_unsplit_mlp() -> None:
    torch.manual_seed(0)
    head = SplitMLP(6, 5, (7, 4)).eval()
    u, i = torch.randn(1, 6), torch.randn(9, 5)
    split = head.combine(head.user_part(u), head.item_part(i))
    torch.testing.assert_close(split, head(torch.cat([u.expand(9, -1), i], -1)))
    assert split.shape == (9,)


def test_model_states_and_head_split(schema: Schema, batch: Batch) -> None:
    model = DistilledDSSM(schema).eval()
    user, item = model.encode_user(batch), model.encode_item(batch)
    assert set(user) == set(item) == {"head", "fm"}
    assert user["head"].shape == item["head"].shape == (len(batch), 64)
    assert user["fm"].shape == item["fm"].shape == (len(batch), 16)
    with torch.no_grad():
        unsplit = model.head(torch.cat([model.user_vector(batch), model.item_vector(batch)], -1))
        torch.testing.assert_close(model(batch), unsplit + model.fm(user, item))
    dot = DistilledDSSM(schema, DistilledDSSMConfig(head="dot", use_fm=False))
    assert set(dot.encode_user(batch)) == {"u"} and set(dot.encode_item(batch)) == {"i"}


def test_config_errors(schema: Schema) -> None:
    with pytest.raises(ConfigError, match="head"):
        DistilledDSSMConfig(head="cosine")
    with pytest.raises(ConfigError, match="behaviour sequence"):
        DistilledDSSM(schema, DistilledDSSMConfig(features=("user_id", "age", "item_id", "category_id")))
    with pytest.raises(ConfigError, match="side_info"):
        DistilledDSSM(schema, DistilledDSSMConfig(side_info=("user_id",)))
    # without FM and NOVA no sequence is needed
    config = DistilledDSSMConfig(
        use_fm=False, use_nova=False, use_bilinear=False, features=("user_id", "item_id", "age")
    )
    DistilledDSSM(schema, config)
    with pytest.raises(ConfigError, match="two item-side"):
        DistilledDSSM(schema, replace(config, use_bilinear=True))
