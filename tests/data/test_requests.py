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
from prerank.data.requests import STAGE_PRESETS, RequestStream, make_request_loader, resolve_stages
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


def test_max_list_len_shares_the_cap_between_impressions_and_the_rest(requests_dir: tuple[Path, pa.Table]) -> None:
    root, table = requests_dir
    rid_all, stage_all = col(table, "request_id"), col(table, "stage")
    cap = 6
    for b in make_request_loader(root, "train", 4, max_list_len=cap, shuffle=True, seed=1):
        assert b.mask.shape[1] <= cap
        for r in range(b.mask.shape[0]):
            valid = b.mask[r]
            rid = int(b.request_id[r][valid][0])
            n_imp = int((stage_all[rid_all == rid] == 0).sum())
            n_all = int((rid_all == rid).sum())
            n_other = n_all - n_imp
            kept_other = min(n_other, max(cap - n_imp, cap // 2))
            assert int(valid.sum()) == min(cap, n_all)
            if n_all > cap:
                assert int((b.stage[r][valid] != 0).sum()) == kept_other
                assert int((b.stage[r][valid] == 0).sum()) == min(n_imp, cap - kept_other)
            assert (np.diff(b.stage[r][valid].numpy()) >= 0).all()  # original order kept


def test_max_list_len_keeps_positive_impressions_first(tmp_path: Path, schema: Schema) -> None:
    table = _requests_table(schema, [10])
    stage = np.zeros(10, dtype=np.int8)
    label = np.array([0, 0, 0, 1, 0, 0, 1, 0, 0, 1], dtype=np.float32)
    table = table.set_column(table.column_names.index("stage"), "stage", pa.array(stage))
    table = table.set_column(table.column_names.index("label"), "label", pa.array(label))
    root = _write(tmp_path / "pos", schema, table)
    b = next(iter(make_request_loader(root, "train", 1, max_list_len=4)))
    assert b.label.sum() == 3 and b.mask.sum() == 4


def test_max_list_len_keeps_candidates_for_users_with_many_impressions(tmp_path: Path, schema: Schema) -> None:
    table = _requests_table(schema, [30])
    stage = np.array([0] * 20 + [1] * 4 + [3] * 6, dtype=np.int8)
    label = np.zeros(30, dtype=np.float32)
    label[[2, 7]] = 1
    table = table.set_column(table.column_names.index("stage"), "stage", pa.array(stage))
    table = table.set_column(table.column_names.index("label"), "label", pa.array(label))
    root = _write(tmp_path / "many", schema, table)
    b = next(iter(make_request_loader(root, "train", 1, max_list_len=10, shuffle=True)))
    kept = b.stage[0][b.mask[0]]
    assert (kept == 0).sum() == 5 and (kept != 0).sum() == 5 and b.label.sum() == 2


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
        tiny_dataset, teacher, out, CascadeConfig(retrieve=4, rank_candidates=2, prerank_candidates=2, random=3)
    )
    batches = list(make_request_loader(out, "valid", 8, stages="no_random"))
    assert sum(b.mask.shape[0] for b in batches) == 16
    for b in batches:
        per_request = [(b.stage[r][b.mask[r]] != 0).sum().item() for r in range(b.mask.shape[0])]
        assert per_request == [4] * b.mask.shape[0]
        assert not (b.stage[b.mask] == STAGES.index("random")).any()
    assert torch.is_tensor(batches[0].teacher_logit)
