"""Request-level loading: whole requests, padding and mask, straddling row groups, shuffling, filters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import tiny_table
from prerank.data.batch import Batch
from prerank.data.parquet import DataError, ParquetSplit, SplitWriter
from prerank.data.requests import (
    LIST_TIERS,
    STAGE_PRESETS,
    RequestStream,
    list_quotas,
    make_request_loader,
    resolve_stage_mix,
    resolve_stages,
)
from prerank.schema import STAGES, Schema

LENGTHS = [3, 12, 1, 7, 25, 2, 9, 4, 16, 5, 1, 8]  # a request (25 rows) spans several row groups and files


def _requests_table(schema: Schema, lengths: list[int] = LENGTHS, seed: int = 0) -> pa.Table:
    n = sum(lengths)
    rng = np.random.default_rng(seed)
    table = tiny_table(n, seed, schema)
    rid = np.repeat(np.arange(10, 10 + len(lengths)) * 3, lengths)  # sorted, not contiguous integers
    stage = np.concatenate([np.sort(rng.integers(0, 4, k)) for k in lengths])
    stage[np.r_[0, np.cumsum(lengths)[:-1]]] = 0  # every request has an impression
    label = np.where(stage == 0, col(table, "label"), 0).astype(np.float32)
    table = table.set_column(table.column_names.index("request_id"), "request_id", pa.array(rid))
    table = table.set_column(table.column_names.index("label"), "label", pa.array(label))
    table = table.append_column("stage", pa.array(stage.astype(np.int8)))
    table = table.append_column("teacher_logit", pa.array(rng.normal(size=n).astype(np.float32)))
    return table.append_column("row", pa.array(np.arange(n)))  # not in the schema: identifies the row in tests


def col(t: pa.Table, name: str) -> np.ndarray:
    return np.asarray(t.column(name).to_numpy())


def _write(root: Path, schema: Schema, table: pa.Table) -> Path:
    schema.save(root / "schema.json")
    w = SplitWriter(root, "train", rows_per_file=40, row_group_size=7)
    w.write(table)
    w.close()
    return root


@pytest.fixture
def requests_dir(tmp_path: Path, schema: Schema) -> tuple[Path, pa.Table]:
    table = _requests_table(schema)
    return _write(tmp_path / "req", schema, table), table


def _lists(batches: list[Batch]) -> dict[int, list[float]]:
    """Request id -> its teacher logits in list order (identifies rows), from padded batches."""
    out: dict[int, list[float]] = {}
    for b in batches:
        for r in range(b.mask.shape[0]):
            valid = b.mask[r]
            rid = int(b.request_id[r][valid][0])
            assert rid not in out, "a request was yielded twice"
            assert (b.request_id[r][valid] == rid).all()
            out[rid] = b.teacher_logit[r][valid].tolist()
    return out


def _expected(table: pa.Table) -> dict[int, list[float]]:
    rid, logit = col(table, "request_id"), col(table, "teacher_logit")
    return {int(r): logit[rid == r].tolist() for r in np.unique(rid)}


def _same(a: dict[int, list[float]], b: dict[int, list[float]]) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k]) and len(a[k]) == len(b[k]) for k in a)


def test_requests_straddling_row_groups_and_files_come_whole(requests_dir: tuple[Path, pa.Table]) -> None:
    root, table = requests_dir
    split = ParquetSplit(root, "train")
    assert len(split.files) > 1 and len(split.row_groups) > 8
    batches = list(make_request_loader(root, "train", 3))
    assert _same(_lists(batches), _expected(table))
    assert len(batches) == len(make_request_loader(root, "train", 3)) == 4


def test_padding_and_mask(requests_dir: tuple[Path, pa.Table], schema: Schema) -> None:
    root, _ = requests_dir
    b = next(iter(make_request_loader(root, "train", 4)))
    R, N = b.mask.shape
    assert (4, max(LENGTHS[:4])) == (R, N)
    assert b.mask.sum(1).tolist() == LENGTHS[:4]
    assert b.features["hist_item_id"].shape == (R, N, schema["hist_item_id"].max_len)
    for t in (b.label, b.stage, b.teacher_logit, b.request_id, b.label_level, *b.features.values()):
        assert t.shape[:2] == (R, N)
        assert (t[~b.mask] == 0).all()
    rows = b.flat()
    assert rows.mask is None and len(rows) == sum(LENGTHS[:4])
    assert rows.features["item_id"].shape == (sum(LENGTHS[:4]),)


def test_shuffle_yields_every_request_once_in_a_new_order(requests_dir: tuple[Path, pa.Table]) -> None:
    root, table = requests_dir
    stream = RequestStream(ParquetSplit(root, "train"), 2, shuffle=True, seed=3, buffer_requests=6)
    got = _lists(list(stream))
    assert _same(got, _expected(table))
    stream.set_epoch(1)
    order = [int(b.request_id[0, 0]) for b in stream]
    assert order != sorted(order)
    assert _same(_lists(list(stream)), _expected(table))


def test_sharding_over_ranks_and_workers_covers_each_request_once(requests_dir: tuple[Path, pa.Table]) -> None:
    root, table = requests_dir
    parts = [_lists(list(make_request_loader(root, "train", 2, rank=r, world_size=2))) for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert _same({**parts[0], **parts[1]}, _expected(table))
    with_workers = _lists(list(make_request_loader(root, "train", 2, num_workers=2, shuffle=True)))
    assert _same(with_workers, _expected(table))


@pytest.mark.parametrize("preset", sorted(STAGE_PRESETS))
def test_stage_presets(requests_dir: tuple[Path, pa.Table], preset: str) -> None:
    root, table = requests_dir
    keep = [STAGES.index(s) for s in STAGE_PRESETS[preset]]
    seen = set()
    rows = 0
    for b in make_request_loader(root, "train", 5, stages=preset):
        flat = b.flat()
        seen |= set(flat.stage.tolist())
        rows += len(flat)
    assert seen <= set(keep) and rows == int(np.isin(col(table, "stage"), keep).sum())


def test_stage_names_and_errors(tmp_path: Path, schema: Schema, requests_dir: tuple[Path, pa.Table]) -> None:
    assert resolve_stages(["random", "impression"]) == ("impression", "random")
    assert resolve_stages("impression,rank_candidate") == ("impression", "rank_candidate")
    with pytest.raises(ValueError, match="stages"):
        resolve_stages(["clicks"])
    plain = _requests_table(schema).drop_columns(["stage"])
    root = _write(tmp_path / "plain", schema, plain)
    with pytest.raises(DataError, match="stage"):
        make_request_loader(root, "train", 2, stages="no_random")
    assert _same(_lists(list(make_request_loader(root, "train", 4))), _expected(plain))


def _tier_counts(table: pa.Table, rid: int) -> np.ndarray:
    stage, label = (
        col(table, "stage")[col(table, "request_id") == rid],
        col(table, "label")[col(table, "request_id") == rid],
    )
    tier = np.where(stage == 0, np.where(label > 0, 0, 1), stage + 1)
    return np.bincount(tier, minlength=len(LIST_TIERS))


def _kept_tiers(b: Batch, r: int) -> np.ndarray:
    valid = b.mask[r]
    stage, label = b.stage[r][valid].numpy(), b.label[r][valid].numpy()
    return np.bincount(np.where(stage == 0, np.where(label > 0, 0, 1), stage + 1), minlength=len(LIST_TIERS))


@pytest.mark.parametrize("mix", [None, "own", "even", {"clicked": 1, "unclicked": 1, "random": 2}])
def test_max_list_len_keeps_the_quota_of_every_tier(requests_dir: tuple[Path, pa.Table], mix) -> None:
    root, table = requests_dir
    cap = 6
    weights = resolve_stage_mix(mix)  # its values are pinned by test_stage_mix_errors
    seen_capped = 0
    for b in make_request_loader(root, "train", 4, max_list_len=cap, shuffle=True, seed=1, stage_mix=mix):
        assert b.mask.shape[1] <= cap
        for r in range(b.mask.shape[0]):
            valid = b.mask[r]
            rid = int(b.request_id[r][valid][0])
            counts = _tier_counts(table, rid)
            want = list_quotas(counts[None], cap, weights)[0] if counts.sum() > cap or mix else counts
            assert (_kept_tiers(b, r) == want).all()
            assert (np.diff(b.stage[r][valid].numpy()) >= 0).all()  # original order kept
            seen_capped += counts.sum() > cap
    assert seen_capped >= 3


def test_a_capped_list_keeps_its_unclicked_impressions(tmp_path: Path, schema: Schema) -> None:
    """ML-1M-like lists (78% clicked): capping keeps the clicked/unclicked mix, not clicked first."""
    table = _requests_table(schema, [100])
    stage = np.array([0] * 90 + [1] * 4 + [3] * 6, dtype=np.int8)
    label = np.zeros(100, dtype=np.float32)
    label[:70] = 1
    table = table.set_column(table.column_names.index("stage"), "stage", pa.array(stage))
    table = table.set_column(table.column_names.index("label"), "label", pa.array(label))
    root = _write(tmp_path / "mix", schema, table)
    kept = _kept_tiers(next(iter(make_request_loader(root, "train", 1, max_list_len=20, shuffle=True))), 0)
    # clicked 70, unclicked 20, rank candidates 4, random 6: one of each, then 16 shared 70:20:4:6
    assert kept.tolist() == [12, 4, 2, 0, 2]


@pytest.mark.parametrize("seed", range(5))
def test_list_quotas_fill_the_cap_within_counts_and_keep_every_tier(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(200):
        counts = rng.integers(0, 30, (4, len(LIST_TIERS))) * (rng.random((4, len(LIST_TIERS))) < 0.7)
        cap = int(rng.integers(1, 40))
        weights = None if rng.random() < 0.5 else rng.random(len(LIST_TIERS)) * (rng.random(len(LIST_TIERS)) < 0.8)
        if weights is not None and weights.sum() == 0:
            continue
        quota = list_quotas(counts, cap, weights)
        eligible = counts if weights is None else np.where(weights > 0, counts, 0)
        assert ((quota >= 0) & (quota <= eligible)).all()
        assert (quota.sum(1) == np.minimum(cap, eligible.sum(1))).all()
        room = (eligible > 0).sum(1) <= cap
        assert ((quota > 0) | (eligible == 0)).all(1)[room].all()


def test_list_quotas_follow_the_weights() -> None:
    counts = np.array([[78, 22, 0, 0, 0], [200, 10, 5, 5, 0], [10, 0, 50, 0, 40]])
    assert list_quotas(counts, 20).tolist() == [[15, 5, 0, 0, 0], [16, 2, 1, 1, 0], [3, 0, 9, 0, 8]]
    assert list_quotas(counts, 20, np.ones(5)).tolist() == [[10, 10, 0, 0, 0], [5, 5, 5, 5, 0], [7, 0, 7, 0, 6]]
    assert list_quotas(counts, 20, np.array([1, 1, 0, 0, 0.0])).tolist() == [
        [10, 10, 0, 0, 0],
        [10, 10, 0, 0, 0],
        [10, 0, 0, 0, 0],
    ]


def test_stage_mix_errors(requests_dir: tuple[Path, pa.Table]) -> None:
    root, _ = requests_dir
    with pytest.raises(ValueError, match="unknown tiers"):
        make_request_loader(root, "train", 2, max_list_len=4, stage_mix={"clicks": 1})
    with pytest.raises(ValueError, match="not all 0"):
        make_request_loader(root, "train", 2, max_list_len=4, stage_mix={"clicked": 0})
    with pytest.raises(ValueError, match="not a named mix"):
        make_request_loader(root, "train", 2, max_list_len=4, stage_mix="clicked")
    assert resolve_stage_mix(None) is None
    assert resolve_stage_mix("own") is None
    assert resolve_stage_mix("even").tolist() == [1.0] * len(LIST_TIERS)


def test_non_contiguous_requests_are_rejected(tmp_path: Path, schema: Schema) -> None:
    table = _requests_table(schema, [3, 3])
    rid = col(table, "request_id")[[0, 3, 1, 4, 2, 5]]
    table = table.set_column(table.column_names.index("request_id"), "request_id", pa.array(rid))
    root = _write(tmp_path / "mixed", schema, table)
    with pytest.raises(DataError, match="not contiguous"):
        list(make_request_loader(root, "train", 2))


def test_missing_request_id_and_bad_arguments(tmp_path: Path, schema: Schema, requests_dir: tuple[Path, pa.Table]):
    root = _write(tmp_path / "norid", schema, _requests_table(schema).drop_columns(["request_id"]))
    with pytest.raises(DataError, match="request_id"):
        make_request_loader(root, "train", 2)
    good, _ = requests_dir
    with pytest.raises(ValueError, match="requests_per_batch"):
        make_request_loader(good, "train", 0)
    with pytest.raises(ValueError, match="max_list_len"):
        make_request_loader(good, "train", 2, max_list_len=0)


def test_drop_last(requests_dir: tuple[Path, pa.Table]) -> None:
    root, _ = requests_dir
    loader = make_request_loader(root, "train", 5, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == len(LENGTHS) // 5
    assert all(b.mask.shape[0] == 5 for b in batches)


def test_on_a_built_cascade(tiny_dataset: Path, tmp_path: Path, schema: Schema) -> None:
    from prerank.data.cascade import CascadeConfig, build_cascade
    from prerank.models.registry import build_model
    from prerank.train.checkpoint import save_checkpoint

    teacher = tmp_path / "t.pt"
    save_checkpoint(teacher, "two_tower", build_model("two_tower", schema))
    out = tmp_path / "cascade"
    build_cascade(
        tiny_dataset,
        teacher,
        out,
        CascadeConfig(retrieve=4, rank_candidates=2, prerank_candidates=2, random=3, rank_cut="teacher_top"),
    )
    batches = list(make_request_loader(out, "valid", 8, stages="no_random"))
    assert sum(b.mask.shape[0] for b in batches) == 16
    for b in batches:
        per_request = [(b.stage[r][b.mask[r]] != 0).sum().item() for r in range(b.mask.shape[0])]
        assert per_request == [4] * b.mask.shape[0]
        assert not (b.stage[b.mask] == STAGES.index("random")).any()
    assert torch.is_tensor(batches[0].teacher_logit)
