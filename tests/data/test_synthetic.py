"""The synthetic generator: valid datasets, determinism, chunking, no leakage, and a non-separable truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prerank.data import synthetic
from prerank.data.parquet import SPLITS, ParquetSplit, make_loader, read_meta
from prerank.data.synthetic import SyntheticConfig, generate, make_world, true_logits
from prerank.evaluate.metrics import auc
from prerank.schema import Schema

SMALL = dict(
    n_users=300,
    n_items=200,
    n_categories=8,
    n_brands=24,
    n_interests=3,
    latent_dim=8,
    hist_len=10,
    log_len=30,
)
ROWS = 3000


def _read(root: Path, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((root / split).glob("*.parquet"))])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "data", rows=ROWS, seed=3, progress=False, **SMALL)


def test_dataset_is_valid_and_readable(dataset: Path) -> None:
    schema = Schema.load(dataset)
    meta = read_meta(dataset)
    assert meta["complete"] and meta["seed"] == 3 and meta["options"]["n_users"] == 300
    assert sum(meta["rows"].values()) == ROWS
    for split in SPLITS:
        table = _read(dataset, split)
        assert table.num_rows == meta["rows"][split] > 0
        level = table.column("label_level").to_numpy()
        np.testing.assert_array_equal(table.column("label").to_numpy(), (level >= 1).astype(np.float32))
        assert set(np.unique(table.column("stage").to_numpy())) == {0}
        batch = next(iter(make_loader(dataset, split, batch_size=512)))  # validates ids, dtypes, NaN
        assert batch.features["hist_item_id"].shape[1] == SMALL["hist_len"]
    items = pq.read_table(dataset / "items.parquet")
    np.testing.assert_array_equal(items.column("item_id").to_numpy(), np.arange(1, 201))
    assert ParquetSplit(dataset, "items").num_rows == 200
    assert {f.cost_type for f in schema.features} == {"I", "II", "III", "IV"}
    assert schema.has_label_level and schema.has_stage


def test_requests_and_time_split(dataset: Path) -> None:
    tables = {s: _read(dataset, s) for s in SPLITS}
    ids = {s: np.unique(t.column("request_id").to_numpy()) for s, t in tables.items()}
    all_ids = np.concatenate([ids[s] for s in SPLITS])
    np.testing.assert_array_equal(all_ids, np.arange(len(all_ids)))  # contiguous, disjoint, in time order
    assert ids["train"].size > 6 * ids["test"].size
    ts = {s: t.column("ts").to_numpy() for s, t in tables.items()}
    assert ts["train"].max() <= ts["valid"].min() and ts["valid"].max() <= ts["test"].min()
    for t in tables.values():
        rid = t.column("request_id").to_numpy()
        sizes = np.bincount(rid - rid.min())
        assert sizes[:-1].min() >= 10 and sizes.max() <= 50  # only the very last request may be cut
        # one request = one user at one time
        for col in ("user_id", "ts", "hour", "device"):
            values = t.column(col).to_numpy()
            assert all(len(np.unique(values[rid == r])) == 1 for r in np.unique(rid)[:50])
    levels = np.concatenate([t.column("label_level").to_numpy() for t in tables.values()])
    counts = np.bincount(levels, minlength=4)
    assert counts[0] > counts[1] > 0 and counts[2] > 0 and counts[3] > 0


def test_same_seed_gives_identical_files(dataset: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", rows=ROWS, seed=3, progress=False, **SMALL)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (dataset / f).read_bytes() == (again / f).read_bytes(), f
    other = generate(tmp_path / "other", rows=ROWS, seed=4, progress=False, **SMALL)
    assert not _read(other, "train").equals(_read(dataset, "train"))


def test_file_chunking_does_not_change_content(dataset: Path, tmp_path: Path) -> None:
    chunked = generate(tmp_path / "chunked", rows=ROWS, seed=3, progress=False, rows_per_file=400, **SMALL)
    assert len(list((chunked / "train").glob("*.parquet"))) > 3
    for split in SPLITS:
        assert _read(chunked, split).equals(_read(dataset, split))


def test_many_blocks_keep_exact_rows_and_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic, "BLOCK_REQUESTS", 7)  # ~100 requests -> 15 RNG blocks
    out = generate(tmp_path / "blocks", rows=ROWS + 11, seed=0, progress=False, **SMALL)
    meta = read_meta(out)
    assert sum(meta["rows"].values()) == ROWS + 11
    total = sum(meta["requests"].values())
    assert meta["requests"]["test"] == round(total * 0.1) and meta["requests"]["valid"] == round(total * 0.1)
    rid = np.concatenate([_read(out, s).column("request_id").to_numpy() for s in SPLITS])
    np.testing.assert_array_equal(np.unique(rid), np.arange(total))


def test_features_come_from_the_past_log_only(dataset: Path) -> None:
    config = SyntheticConfig(**SMALL)
    world = make_world(config, seed=3)
    t = _read(dataset, "test")
    users, ts = t.column("user_id").to_numpy(), t.column("ts").to_numpy()
    hist = t.column("hist_item_id").to_pylist()
    hist_cat = t.column("hist_category_id").to_pylist()
    cat = t.column("category_id").to_numpy()
    for row in range(0, t.num_rows, 37):
        u = users[row]
        past = world.log_items[u][world.log_ts[u] < ts[row]]
        assert hist[row] == past[-config.hist_len :].tolist()  # the latest events before the request, nothing after
        assert hist_cat[row] == world.item_category[hist[row]].tolist()
        expected = np.mean(np.asarray(hist_cat[row]) == cat[row]) if hist[row] else 0.0
        assert t.column("user_cat_affinity")[row].as_py() == pytest.approx(expected, abs=1e-6)
        count = int(np.sum(world.item_category[past] == cat[row]))
        bucket = t.column("user_cat_clicks")[row].as_py()
        assert synthetic._COUNT_EDGES[bucket - 1] <= count  # the bucket holds the count of the whole past log
        assert bucket == len(synthetic._COUNT_EDGES) or count < synthetic._COUNT_EDGES[bucket]


def test_meta_ground_truth_auc_is_the_auc_of_the_true_logits(dataset: Path) -> None:
    world = make_world(SyntheticConfig(**SMALL), seed=3)
    t = _read(dataset, "test")
    col = lambda name: t.column(name).to_numpy()  # noqa: E731
    z = true_logits(world, col("user_id"), col("item_id"), col("hour") - 1, col("device"))
    exact = auc(col("label"), z)
    assert read_meta(dataset)["ground_truth"]["auc"]["test"] == pytest.approx(exact, abs=1e-3)
    assert exact > 0.7
    # popularity is a main effect: the warm-up item CTR alone ranks better than chance
    assert auc(col("label"), col("item_ctr")) > 0.58


def test_interaction_is_not_separable() -> None:
    """The best rank-d bilinear fit of max_k <a_uk, b_i> leaves a large residual; a sum over k leaves none."""
    config = SyntheticConfig(**{**SMALL, "n_users": 400, "n_items": 300, "n_interests": 4})
    world = make_world(config, seed=0)
    dots = np.einsum("ukd,id->uik", world.interest_vec[1:], world.item_vec[1:])

    def residual_share(matrix: np.ndarray, rank: int) -> float:
        centred = matrix - matrix.mean(0) - matrix.mean(1, keepdims=True) + matrix.mean()  # drop main effects
        s = np.linalg.svd(centred, compute_uv=False)
        return float(np.sum(s[rank:] ** 2) / np.sum(s**2))

    d = config.latent_dim
    assert residual_share(dots.sum(-1), d) < 1e-12  # a separable truth: a d-dim two-tower fits it exactly
    assert residual_share(dots.max(-1), d) > 0.2
    assert residual_share(dots.max(-1), 2 * d) > 0.1


def test_streamed_auc_matches_exact() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=5000) * 2
    y = (rng.random(5000) < 1 / (1 + np.exp(-z))).astype(np.int8)
    stats = synthetic._SplitStats()
    stats.add(pa.table({"label_level": y, "request_id": np.arange(5000)}), z)
    assert stats.auc() == pytest.approx(auc(y, z), abs=1e-4)
    assert stats.summary()["rows"] == 5000


def test_bad_options_and_targets(tmp_path: Path, dataset: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic options"):
        generate(tmp_path / "x", rows=1000, n_user=5)
    with pytest.raises(ValueError, match="hist_len must not exceed log_len"):
        generate(tmp_path / "x", rows=1000, hist_len=50, log_len=20)
    with pytest.raises(ValueError, match="days must be a positive integer"):
        generate(tmp_path / "x", rows=1000, days=0)
    with pytest.raises(ValueError, match="base_logit must be a finite number"):
        generate(tmp_path / "x", rows=1000, base_logit="high")
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        generate(tmp_path / "x", rows=0)
    with pytest.raises(ValueError, match="too few for train/valid/test"):
        generate(tmp_path / "x", rows=60, progress=False, **SMALL)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no synthetic dataset"):
        generate(busy, rows=1000, progress=False, **SMALL)
    assert (busy / "notes.txt").read_text() == "keep me"


def test_regenerating_replaces_an_earlier_dataset(tmp_path: Path) -> None:
    out = generate(tmp_path / "d", rows=2000, seed=0, progress=False, rows_per_file=300, **SMALL)
    generate(out, rows=1500, seed=1, progress=False, **SMALL)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 1 and sum(meta["rows"].values()) == 1500
    assert sum(ParquetSplit(out, s).num_rows for s in SPLITS) == 1500  # no stale part files left
