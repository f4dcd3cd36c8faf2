"""The cascade builder: stages per request, teacher order, contiguity, filters, re-splits, errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from conftest import narrow_dataset, tiny_table
from prerank.data.cascade import (
    CascadeConfig,
    CoOccurrenceRetriever,
    _sample_random,
    build_cascade,
    request_uniforms,
)
from prerank.data.parquet import DataError, table_to_batch, write_dataset
from prerank.models.base import ConfigError
from prerank.models.registry import MODELS, build_model
from prerank.schema import STAGES, FeatureSpec, Schema, SchemaError
from prerank.train.checkpoint import load_model, save_checkpoint

SMALL = CascadeConfig(
    retrieve=8, rank_candidates=3, prerank_candidates=4, random=5, rank_cut="teacher_top", popularity="paper"
)
IMP, RANK, PRE, RND = (STAGES.index(s) for s in STAGES)


def read_split(root: Path, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((root / split).glob("part-*.parquet"))])


def col(t: pa.Table, name: str) -> np.ndarray:
    return np.asarray(t.column(name).to_numpy())


@pytest.fixture
def teacher(tmp_path: Path, schema: Schema) -> Path:
    path = tmp_path / "teacher.pt"
    save_checkpoint(path, "two_tower", build_model("two_tower", schema, {"hidden": (16,), "out_dim": 8}))
    return path


@pytest.fixture
def cascade(tiny_dataset: Path, teacher: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cascade"
    build_cascade(tiny_dataset, teacher, out, SMALL)
    return out


def test_stage_counts_per_request(tiny_dataset: Path, cascade: Path) -> None:
    for split in ("train", "valid", "test"):
        src, out = read_split(tiny_dataset, split), read_split(cascade, split)
        rid_in = col(src, "request_id")
        rid, stage = col(out, "request_id"), col(out, "stage")
        assert set(np.unique(rid)) == set(np.unique(rid_in))
        for r in np.unique(rid):
            counts = np.bincount(stage[rid == r], minlength=4)
            assert counts.tolist() == [int((rid_in == r).sum()), 3, 4, 5]


def test_rows_of_a_request_are_contiguous_and_sorted(cascade: Path) -> None:
    rid = col(read_split(cascade, "train"), "request_id")
    assert (np.diff(rid) >= 0).all()
    stage = col(read_split(cascade, "train"), "stage")
    for r in np.unique(rid):  # inside a request: impressions, rank, pre-rank, random
        assert (np.diff(stage[rid == r]) >= 0).all()


def test_teacher_order_splits_candidates_and_logits_are_the_teachers(cascade: Path, teacher: Path) -> None:
    out = read_split(cascade, "valid")
    rid, stage, logit = col(out, "request_id"), col(out, "stage"), col(out, "teacher_logit")
    for r in np.unique(rid):
        mine = rid == r
        assert logit[mine & (stage == RANK)].min() >= logit[mine & (stage == PRE)].max()
    _, model, _ = load_model(teacher)
    with torch.no_grad():
        again = model(table_to_batch(out, Schema.load(cascade))).numpy()
    np.testing.assert_allclose(again, logit, rtol=1e-5, atol=1e-6)


def test_no_item_is_both_impression_and_candidate(cascade: Path) -> None:
    out = read_split(cascade, "train")
    rid, stage, item = col(out, "request_id"), col(out, "stage"), col(out, "item_id")
    for r in np.unique(rid):
        mine = rid == r
        exposed = set(item[mine & (stage == IMP)])
        unexposed = item[mine & (stage != IMP)]
        assert not exposed & set(unexposed)
        assert len(set(unexposed)) == len(unexposed)


USER_SIDE = ("user_id", "age", "user_ctr", "hist_item_id", "hour")
ITEM_SIDE = ("category_id", "genres", "item_ctr")


def _side(row: dict, names: tuple[str, ...]) -> tuple:
    return tuple(
        tuple(v) if isinstance(v, list) else round(v, 6) if isinstance(v, float) else v for v in map(row.get, names)
    )


def test_unexposed_rows_take_user_side_of_their_impressions(cascade: Path) -> None:
    out = read_split(cascade, "test")
    unexposed = col(out, "stage") != IMP
    assert (col(out, "label")[unexposed] == 0).all() and (col(out, "label_level")[unexposed] == 0).all()
    user_sides: dict[int, list[tuple]] = {}
    anchors: dict[int, set[tuple]] = {}
    for row, u in zip(out.to_pylist(), unexposed, strict=True):
        side = _side(row, USER_SIDE)
        if not u:
            user_sides.setdefault(row["request_id"], []).append(side)
            continue
        assert side in user_sides[row["request_id"]]  # the user side of one of its impressions
        anchors.setdefault(row["request_id"], set()).add(side)
    # drawn per row, not one fixed row: most requests' candidates carry several impressions' user sides
    assert np.mean([len(a) > 1 for a in anchors.values()]) > 0.8


@pytest.mark.parametrize("item_side", ["logged", "catalogue"])
def test_unexposed_rows_take_item_side_of_logged_rows_or_catalogue(
    tiny_dataset: Path, teacher: Path, tmp_path: Path, item_side: str
) -> None:
    out = tmp_path / item_side
    build_cascade(tiny_dataset, teacher, out, CascadeConfig(**{**SMALL.__dict__, "item_side": item_side}))
    catalogue = pq.read_table(out / "items.parquet")
    cat_ids = col(catalogue, "item_id")
    assert len(np.unique(cat_ids)) == len(cat_ids)
    by_item = {row["item_id"]: _side(row, ITEM_SIDE) for row in catalogue.to_pylist()}
    logged: dict[int, set[tuple]] = {}
    for row in read_split(tiny_dataset, "train").to_pylist():
        logged.setdefault(row["item_id"], set()).add(_side(row, ITEM_SIDE))
    t = read_split(out, "train")
    unexposed = col(t, "stage") != IMP
    assert np.isin(col(t, "item_id")[unexposed], cat_ids).all()
    n_logged = 0
    used: dict[int, set[tuple]] = {}
    for row in (r for r, u in zip(t.to_pylist(), unexposed, strict=True) if u):
        side = _side(row, ITEM_SIDE)
        used.setdefault(row["item_id"], set()).add(side)
        if item_side == "logged" and row["item_id"] in logged:
            assert side in logged[row["item_id"]]
            n_logged += 1
        else:
            assert side == by_item[row["item_id"]]
    assert (n_logged > 0) == (item_side == "logged")
    # drawn per row: items logged several ways show several of them among their unexposed rows
    assert any(len(v) > 1 for v in used.values()) == (item_side == "logged")


def test_schema_and_meta(cascade: Path) -> None:
    schema = Schema.load(cascade)
    assert schema.has_stage and schema.has_teacher_logit and schema.has_label_level
    assert not schema.tower("cross")  # dropped by default: a zero cross feature would reveal the stage
    meta = json.loads((cascade / "meta.json").read_text())
    assert meta["rows"]["train"] == read_split(cascade, "train").num_rows
    assert meta["cascade"]["splits"]["train"]["rows_per_request"]["random"] == 5


def test_cross_pad_keeps_cross_features_at_padding(tiny_dataset: Path, tmp_path: Path, schema: Schema) -> None:
    teacher = tmp_path / "lr.pt"
    save_checkpoint(teacher, "lr", build_model("lr", schema))  # LR reads the cross features
    out = tmp_path / "pad"
    build_cascade(
        tiny_dataset,
        teacher,
        out,
        CascadeConfig(retrieve=4, rank_candidates=1, prerank_candidates=2, random=2, cross="pad"),
    )
    t = read_split(out, "train")
    unexposed = col(t, "stage") != IMP
    assert Schema.load(out).tower("cross")
    assert (col(t, "user_cat_affinity")[unexposed] == 0).all()
    assert (col(t, "user_cat_clicks")[unexposed] == 0).all()
    assert (col(t, "user_cat_affinity")[~unexposed] > 0).any()


def test_output_does_not_depend_on_chunking(tiny_dataset: Path, teacher: Path, tmp_path: Path) -> None:
    """Bounded chunks of a few requests each give exactly the rows one big chunk gives."""
    one, many = tmp_path / "one", tmp_path / "many"
    build_cascade(tiny_dataset, teacher, one, SMALL)
    build_cascade(tiny_dataset, teacher, many, CascadeConfig(**{**SMALL.__dict__, "chunk_rows": 100}))
    for split in ("train", "test"):
        assert len(list((many / split).glob("part-*"))) == 1  # chunks are appended, not written as parts
        assert read_split(one, split).equals(read_split(many, split))
    other_seed = tmp_path / "seed"
    build_cascade(tiny_dataset, teacher, other_seed, CascadeConfig(**{**SMALL.__dict__, "seed": 1}))
    assert not read_split(one, "train").equals(read_split(other_seed, "train"))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_any_registered_model_can_be_the_teacher(name: str, tiny_dataset: Path, tmp_path: Path, schema: Schema) -> None:
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, name, build_model(name, schema))
    out = tmp_path / name
    cfg = CascadeConfig(retrieve=3, rank_candidates=1, prerank_candidates=1, random=1, rank_cut="teacher_top")
    build_cascade(tiny_dataset, path, out, cfg)
    t = read_split(out, "valid")
    assert np.isfinite(col(t, "teacher_logit")).all()
    assert set(np.unique(col(t, "stage"))) == {IMP, RANK, PRE, RND}


def test_user_filter_keeps_users_above_both_thresholds(tiny_dataset: Path, teacher: Path, tmp_path: Path) -> None:
    pooled = pa.concat_tables([read_split(tiny_dataset, s) for s in ("train", "valid", "test")])
    rid, label = col(pooled, "request_id"), col(pooled, "label")
    rows = np.bincount(rid)
    pos = np.bincount(rid, weights=label)
    expected = set(np.flatnonzero((rows >= 10) & (pos >= 6)))
    assert 0 < len(expected) < len(np.unique(rid))
    out = tmp_path / "filtered"
    build_cascade(
        tiny_dataset, teacher, out, CascadeConfig(**{**SMALL.__dict__, "min_impressions": 10, "min_positives": 6})
    )
    kept = set()
    for s in ("train", "valid", "test"):
        if (out / s).is_dir():
            t = read_split(out, s)
            kept |= set(col(t, "request_id")[col(t, "stage") == IMP])
    assert kept == expected


def test_user_filter_by_user_field(tmp_path: Path, teacher: Path, schema: Schema) -> None:
    table = tiny_table(200, 5, schema)
    user = (col(table, "request_id") % 3 + 1).astype(np.int64)  # one user per request, 3 users
    table = table.set_column(table.column_names.index("user_id"), "user_id", pa.array(user))
    items = tiny_table(40, 9, schema).select([f.name for f in schema.tower("item")])
    root = tmp_path / "users"
    write_dataset(root, schema, {"train": table}, items=items)
    counts = np.bincount(user, weights=col(table, "label"))
    best = int(np.argmax(counts))
    out = tmp_path / "out"
    cfg = CascadeConfig(**{**SMALL.__dict__, "user_field": "user_id", "min_positives": int(counts[best])})
    build_cascade(root, teacher, out, cfg)
    assert set(col(read_split(out, "train"), "user_id")) == {best}


def _timed_dataset(tmp_path: Path, schema: Schema) -> Path:
    table = tiny_table(300, 4, schema)
    rid = col(table, "request_id")
    ts = (rid * 1000 + np.arange(len(rid))[::-1]) % 7919  # request time unrelated to request id order
    table = table.append_column("ts", pa.array(ts.astype(np.int64)))
    items = tiny_table(40, 9, schema).select([f.name for f in schema.tower("item")])
    root = tmp_path / "timed"
    write_dataset(
        root, schema, {"train": table.slice(0, 200), "test": table.slice(200)}, items=items, row_group_size=64
    )
    return root


def test_resplit_by_time_orders_requests(tmp_path: Path, teacher: Path, schema: Schema) -> None:
    root = _timed_dataset(tmp_path, schema)
    out = tmp_path / "out"
    build_cascade(root, teacher, out, CascadeConfig(**{**SMALL.__dict__, "resplit": (0.7, 0.1, 0.2)}))
    first_ts = {}
    n_requests = {}
    for s in ("train", "valid", "test"):
        t = read_split(out, s)
        rid, ts, stage = col(t, "request_id"), col(t, "ts"), col(t, "stage")
        n_requests[s] = len(np.unique(rid))
        first_ts[s] = [ts[(rid == r) & (stage == IMP)].min() for r in np.unique(rid)]
    assert max(first_ts["train"]) <= min(first_ts["valid"]) and max(first_ts["valid"]) <= min(first_ts["test"])
    total = sum(n_requests.values())
    src = pa.concat_tables([read_split(root, "train"), read_split(root, "test")])
    assert total == len(np.unique(col(src, "request_id")))  # a request in both source splits is merged
    assert n_requests["train"] == round(0.7 * total)


def test_resplit_by_request_is_seeded(tmp_path: Path, teacher: Path, tiny_dataset: Path) -> None:
    cfg = CascadeConfig(**{**SMALL.__dict__, "resplit": (0.5, 0.25, 0.25), "resplit_by": "request"})
    a, b = tmp_path / "a", tmp_path / "b"
    build_cascade(tiny_dataset, teacher, a, cfg)
    build_cascade(tiny_dataset, teacher, b, cfg)
    for s in ("train", "valid", "test"):
        assert set(col(read_split(a, s), "request_id")) == set(col(read_split(b, s), "request_id"))
    assert len(set(col(read_split(a, "train"), "request_id"))) == 32  # 64 pooled request ids


def test_resplit_by_time_needs_ts(tiny_dataset: Path, teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ts"):
        build_cascade(tiny_dataset, teacher, tmp_path / "o", CascadeConfig(resplit=(0.7, 0.1, 0.2)))


def test_a_teacher_of_another_feature_set_cannot_build_the_cascade(
    tiny_dataset: Path, tmp_path: Path, schema: Schema
) -> None:
    """A wide-set teacher reads fields the data lacks: a clear error (candidates are scored from the data's own
    features), and no output."""
    narrow = narrow_dataset(tiny_dataset, tmp_path / "narrow")
    path = tmp_path / "wide-teacher.pt"
    save_checkpoint(path, "ranker", build_model("ranker", schema, {"hidden": [8]}))
    with pytest.raises(SchemaError, match="'user_cat_affinity', which the dataset schema lacks.*another feature set"):
        build_cascade(narrow, path, tmp_path / "out", SMALL)
    assert not (tmp_path / "out").exists()


def test_cooccurrence_counts_train_positives_within_window() -> None:
    t = pa.table(
        {
            "request_id": pa.array([1, 1, 1, 1, 2, 2, 2], pa.int64()),
            "label": pa.array([1, 1, 0, 1, 1, 1, 1], pa.float32()),
            "item_id": pa.array([3, 4, 7, 5, 3, 4, 6], pa.int64()),
        }
    )
    r = CoOccurrenceRetriever.fit(iter([t]), "item_id", 10, np.arange(1, 10), window=1, top=10)
    nbr = r.neighbors[r.indptr[3] : r.indptr[4]].tolist()
    cnt = r.counts[r.indptr[3] : r.indptr[4]].tolist()
    assert nbr == [4] and cnt == [2]  # 3-4 twice; 3-5 not adjacent among positives of request 1
    assert r.neighbors[r.indptr[4] : r.indptr[5]].tolist() == [3, 5, 6]
    assert r.neighbors[r.indptr[7] : r.indptr[8]].tolist() == []  # item 7 was never a positive
    assert r.popular[:2].tolist() == [3, 4]
    in_cat = np.zeros(10, dtype=bool)
    in_cat[1:] = True
    taken = np.array([0 * 10 + 5])  # request 0 saw item 5
    req, item, n_cooc = r.retrieve(np.array([0, 0]), np.array([4, 3]), taken, 1, 4, in_cat)
    assert item[:n_cooc].tolist() == [3, 4, 6]  # 4's neighbours (3, 5, 6) plus 3's (4), minus seen 5
    assert n_cooc == 3 and len(item) == 4 and 5 not in item


def test_random_sampling_is_distinct_and_avoids_taken() -> None:
    catalogue = np.arange(1, 11)
    taken = np.array([0 * 100 + 1, 0 * 100 + 2, 1 * 100 + 3])
    rids = np.array([7, 9])
    req, item = _sample_random(0, rids, catalogue, taken, 8, 100)
    assert np.bincount(req).tolist() == [8, 8]
    assert not {1, 2} & set(item[req == 0]) and 3 not in item[req == 1]
    assert len(set(item[req == 0])) == 8
    req, item = _sample_random(0, rids, catalogue, taken, 20, 100)  # more than the catalogue holds
    assert np.bincount(req).tolist() == [8, 9]
    # a request's draws depend on its id and the seed, not on the other requests of its chunk
    alone_req, alone_item = _sample_random(0, rids[1:], catalogue, taken[2:] - 100, 5, 100)
    both_req, both_item = _sample_random(0, rids, catalogue, taken, 5, 100)
    assert alone_item.tolist() == both_item[both_req == 1].tolist()


def test_popularity_sampling_follows_the_weights_and_never_draws_weight_zero() -> None:
    catalogue = np.arange(1, 11)
    weights = np.array([0, 0, 1, 1, 2, 2, 4, 4, 8, 8], dtype=float)
    rids = np.arange(2000)
    req, item = _sample_random(0, rids, catalogue, np.zeros(0, dtype=np.int64), 1, 100, weights)
    assert np.bincount(req).tolist() == [1] * 2000
    freq = np.bincount(item, minlength=11)[1:] / 2000
    assert freq[:2].sum() == 0
    assert np.abs(freq - weights / weights.sum()).max() < 0.03
    # a request asking for more than the positive-weight items gets only those
    req, item = _sample_random(0, rids[:1], catalogue, np.zeros(0, dtype=np.int64), 9, 100, weights)
    assert sorted(item.tolist()) == list(range(3, 11))


def test_default_cascade_agrees_with_the_log(tiny_dataset: Path, teacher: Path, tmp_path: Path) -> None:
    """rank_cut="below_impressions": every candidate scores below its request's impressions; popularity="matched":
    random items are drawn by the split's impressions, so each is an item that split showed."""
    out = tmp_path / "agree"
    summary = build_cascade(
        tiny_dataset, teacher, out, CascadeConfig(retrieve=30, rank_candidates=3, prerank_candidates=4, random=5)
    )
    dropped = kept = 0
    for split in ("train", "valid", "test"):
        shown = set(col(read_split(tiny_dataset, split), "item_id").tolist())
        t = read_split(out, split)
        rid, stage, logit = col(t, "request_id"), col(t, "stage"), col(t, "teacher_logit")
        for r in np.unique(rid):
            mine = rid == r
            lowest = logit[mine & (stage == IMP)].min()
            assert (logit[mine & np.isin(stage, [RANK, PRE])] < lowest).all()
        assert set(col(t, "item_id")[stage == RND].tolist()) <= shown
        dropped += summary["splits"][split]["retrieved_above_impressions"]
        kept += int(np.isin(stage, [RANK, PRE]).sum())
    assert dropped > 0 and kept > 0  # the cut removed some items and kept others: the check is not vacuous


def test_the_unknown_id_may_recur_and_ignores_taken() -> None:
    """Cold items share the unknown id 0: drawing it twice in a request, or beside an unknown impression, is fine."""
    catalogue = np.array([0, 1, 2, 3])
    taken = np.array([0 * 100 + 0, 0 * 100 + 1])
    req, item = _sample_random(0, np.array([5]), catalogue, taken, 6, 100, np.array([8.0, 1, 1, 0]))
    assert len(item) == 6 and 1 not in item
    assert (item == 0).sum() >= 3  # 80% of the weight; distinct known items would cap it at one


def _with_unknown_impressions(root: Path, out: Path, share: float) -> Path:
    """A copy of ``root`` whose valid and test items are the unknown id 0 with probability ``share``."""
    shutil.copytree(root, out)
    rng = np.random.default_rng(0)
    for split in ("valid", "test"):
        for path in sorted((out / split).glob("part-*.parquet")):
            t = pq.read_table(path)
            item = col(t, "item_id").copy()
            item[rng.random(len(item)) < share] = 0
            pq.write_table(t.set_column(t.column_names.index("item_id"), "item_id", pa.array(item)), path)
    return out


def test_cold_items_are_sampled_like_unknown_impressions(tiny_dataset: Path, teacher: Path, tmp_path: Path) -> None:
    """unknown_items="sample": unexposed rows are the unknown id about as often as impressions are, and take the
    item features of logged unknown-id rows; "skip" never draws it (the Taobao shortcut of issue 24)."""
    data = _with_unknown_impressions(tiny_dataset, tmp_path / "cold", 0.6)
    config = CascadeConfig(retrieve=8, rank_candidates=3, prerank_candidates=4, random=4)
    shares = {}
    for mode in ("sample", "skip"):
        out = tmp_path / mode
        summary = build_cascade(data, teacher, out, replace(config, unknown_items=mode))
        t = read_split(out, "test")
        stage, item = col(t, "stage"), col(t, "item_id")
        shares[mode] = (item[stage == IMP] == 0).mean(), (item[stage == RND] == 0).mean()
        assert summary["splits"]["test"]["unknown_item_rows"] == int(((stage != IMP) & (item == 0)).sum())
        if mode == "sample":
            logged = {_side(r, ITEM_SIDE) for r in read_split(data, "test").to_pylist() if r["item_id"] == 0}
            cold = [_side(r, ITEM_SIDE) for r, s in zip(t.to_pylist(), stage, strict=True) if s != IMP]
            cold = [c for c, i in zip(cold, item[stage != IMP], strict=True) if i == 0]
            assert cold and set(cold) <= logged and len(set(cold)) > 1
    assert shares["skip"][1] == 0
    assert abs(shares["sample"][1] - shares["sample"][0]) < 0.1, shares
    train = read_split(tmp_path / "sample", "train")  # the training split has no unknown impressions to follow
    assert (col(train, "item_id")[col(train, "stage") != IMP] > 0).all()


def test_request_uniforms_look_uniform() -> None:
    u = request_uniforms(3, 1, np.repeat(np.arange(100), 100), np.tile(np.arange(100), 100))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 900  # 1000 expected per bin
    assert not np.array_equal(u, request_uniforms(4, 1, np.repeat(np.arange(100), 100), np.tile(np.arange(100), 100)))


def test_missing_catalogue_is_a_clear_error(tiny_dataset: Path, teacher: Path, tmp_path: Path) -> None:
    (tiny_dataset / "items.parquet").unlink()
    with pytest.raises(DataError, match="items.parquet"):
        build_cascade(tiny_dataset, teacher, tmp_path / "o", SMALL)


def test_teacher_schema_mismatch(tiny_dataset: Path, tmp_path: Path, schema: Schema) -> None:
    other = Schema(
        tuple(
            FeatureSpec(
                f.name, f.tower, f.kind, vocab_size=f.vocab_size + (f.name == "age"), max_len=f.max_len, shares=f.shares
            )
            for f in schema.features
        )
    )
    path = tmp_path / "t.pt"
    save_checkpoint(path, "two_tower", build_model("two_tower", other))
    with pytest.raises(SchemaError, match="'age' has vocab_size 6"):
        build_cascade(tiny_dataset, path, tmp_path / "o", SMALL)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank_candidates": 5, "prerank_candidates": 5}, "retrieve"),
        ({"random": -1}, "random"),
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"resplit": (0.5, 0.5, 0.5)}, "resplit"),
        ({"cross": "zero"}, "cross"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CascadeConfig(**{**SMALL.__dict__, **options})


def test_field_errors(tiny_dataset: Path, teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="item_field"):
        build_cascade(tiny_dataset, teacher, tmp_path / "o", CascadeConfig(**{**SMALL.__dict__, "item_field": "age"}))
    with pytest.raises(ConfigError, match="user_field"):
        build_cascade(tiny_dataset, teacher, tmp_path / "o", CascadeConfig(**{**SMALL.__dict__, "user_field": "x"}))


def test_output_errors(tiny_dataset: Path, teacher: Path, cascade: Path) -> None:
    with pytest.raises(ConfigError, match="not empty"):
        build_cascade(tiny_dataset, teacher, cascade, SMALL)
    with pytest.raises(ConfigError, match="input dataset"):
        build_cascade(tiny_dataset, teacher, tiny_dataset, SMALL)
    with pytest.raises(SchemaError, match="already a cascade"):
        build_cascade(cascade, teacher, cascade.parent / "again", SMALL)
    build_cascade(tiny_dataset, teacher, cascade, SMALL, overwrite=True)
    assert Schema.load(cascade).has_stage


def test_history_seeds_need_a_history_feature(tmp_path: Path, teacher: Path, schema: Schema) -> None:
    no_hist = Schema(tuple(f for f in schema.features if f.name != "hist_item_id"), has_label_level=True)
    items = tiny_table(40, 9, schema).select([f.name for f in schema.tower("item")])
    root = tmp_path / "nohist"
    write_dataset(root, no_hist, {"train": tiny_table(100, 1, schema).drop_columns(["hist_item_id"])}, items=items)
    t = tmp_path / "t.pt"
    save_checkpoint(t, "two_tower", build_model("two_tower", no_hist))
    with pytest.raises(ConfigError, match="seed_from='positives'"):
        build_cascade(root, t, tmp_path / "o", SMALL)
    build_cascade(root, t, tmp_path / "o", CascadeConfig(**{**SMALL.__dict__, "seed_from": "positives"}))
    assert read_split(tmp_path / "o", "train").num_rows > 100


def test_cli_build(tiny_dataset: Path, teacher: Path, tmp_path: Path) -> None:
    import prerank.cli.cascade  # noqa: F401  (registers the commands)
    from prerank.cli import app

    out = tmp_path / "cli"
    args = [
        "cascade",
        "build",
        "--data",
        str(tiny_dataset),
        "--teacher",
        str(teacher),
        "--out",
        str(out),
        "--retrieve",
        "6",
        "--rank-candidates",
        "2",
        "--prerank-candidates",
        "3",
        "--random",
        "4",
        "--resplit",
        "70,10,20",
        "--resplit-by",
        "request",
        "--no-progress",
        "--threads",
        "1",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert Schema.load(out).has_stage
    bad = CliRunner().invoke(app, args[:8] + ["--retrieve", "2", "--rank-candidates", "2", "--prerank-candidates", "3"])
    assert bad.exit_code == 2 and "retrieve" in bad.output


def test_filter_leaving_no_training_request_is_an_error_and_keeps_old_output(
    tiny_dataset: Path, teacher: Path, cascade: Path
) -> None:
    before = read_split(cascade, "train")
    cfg = CascadeConfig(**{**SMALL.__dict__, "min_impressions": 10_000})
    with pytest.raises(DataError, match="no training requests"):
        build_cascade(tiny_dataset, teacher, cascade, cfg, overwrite=True)
    assert read_split(cascade, "train").equals(before)


def test_match_popularity_follows_the_target_histogram() -> None:
    from prerank.data.cascade import match_popularity

    rng = np.random.default_rng(0)
    req = np.repeat(np.arange(200), 40)
    bucket = np.tile(np.r_[np.zeros(30, np.int64), np.ones(10, np.int64)], 200)  # pools: 75% bucket 0
    target = np.array([1.0, 3.0])  # impressions: 25% bucket 0
    kept = match_popularity(req, bucket, target, 8, rng.random(len(req)))
    assert np.bincount(req[kept]).tolist() == [8] * 200
    # 10 of 40 in the pool, about 75% of the kept (sampling without replacement runs short of bucket 1 a little)
    assert abs((bucket[kept] == 1).mean() - 0.75) < 0.1 and (bucket[kept] == 1).mean() > 0.5
    assert len(np.unique(kept)) == len(kept)
    # a bucket the impressions never reach is used only to fill a request whose pool has nothing else
    only_unwanted = match_popularity(np.zeros(3, np.int64), np.array([0, 0, 1]), np.array([0.0, 1.0]), 2, rng.random(3))
    assert sorted(only_unwanted.tolist()) == [0, 2] or sorted(only_unwanted.tolist()) == [1, 2]
