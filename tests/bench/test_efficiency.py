"""The serving benchmark on a tiny model: records, FLOP bound arithmetic, reports and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

import prerank.cli.serve  # noqa: F401  (registers the commands)
from conftest import tiny_schema, tiny_table
from prerank.bench.efficiency import (
    BenchConfig,
    matmul_gflops,
    profile_score,
    request_rows,
    run_bench,
    sample_requests,
    target_from_artifact,
    target_from_model,
    time_calls,
    write_report,
)
from prerank.cli import app
from prerank.data.parquet import write_dataset
from prerank.models.registry import build_model
from prerank.schema import Schema
from prerank.serve.export import export
from prerank.train.checkpoint import save_checkpoint

NUM_ITEMS = 30

FIELDS = (
    "model",
    "candidates",
    "threads",
    "p50_ms_cached",
    "p99_ms_cached",
    "p50_ms_full",
    "p99_ms_full",
    "p50_cpu_ms_cached",
    "p50_cpu_ms_full",
    "flops_per_candidate",
    "flop_bound_ms",
    "item_cache_bytes_per_item",
    "candidates_per_s",
    "speedup_cached_vs_full",
    "machine",
)
TINY = BenchConfig(candidates=(10, 50), threads=(1,), requests=5, warmup=1, distinct=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset whose catalogue lists item ids 1..NUM_ITEMS once each."""
    root = tmp_path_factory.mktemp("bench") / "data"
    schema = tiny_schema()
    items = tiny_table(NUM_ITEMS, 9, schema).select([f.name for f in schema.tower("item")])
    items = items.set_column(
        items.schema.get_field_index("item_id"), "item_id", pa.array(np.arange(1, NUM_ITEMS + 1), pa.int64())
    )
    write_dataset(root, schema, {"train": tiny_table(64, 1, schema)}, items=items, row_group_size=16)
    return root


def test_bench_records_and_report(data_dir: Path, tmp_path: Path) -> None:
    records = run_bench([target_from_model("two_tower", data_dir)], data_dir, TINY)
    assert [(r["candidates"], r["threads"]) for r in records] == [(10, 1), (50, 1)]
    for r in records:
        assert all(k in r for k in FIELDS)
        assert 0 < r["p50_ms_cached"] <= r["p99_ms_cached"] and 0 < r["p50_ms_full"] <= r["p99_ms_full"]
        # two_tower scores with one D-dim dot product per candidate (+ bias): at least 2 D FLOPs
        assert r["flops_per_candidate"] >= 2 * 64
        gflops = r["matmul_gflops_1thread"]
        assert gflops > 0 and r["machine"]["matmul_gflops_1thread"] > 0
        expected_bound = r["flops_per_candidate"] * r["candidates"] / (gflops * 1e9) * 1e3
        assert r["flop_bound_ms"] == pytest.approx(expected_bound, rel=1e-2)
        assert r["item_cache_bytes_per_item"] == 64 * 4
        assert r["speedup_cached_vs_full"] == pytest.approx(r["p50_ms_full"] / r["p50_ms_cached"])
    write_report(records, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved == json.loads(json.dumps(records))
    md = (tmp_path / "out" / "bench.md").read_text()
    assert md.count("| two_tower |") == 2 and "GFLOP/s" in md


def test_bench_an_artifact(data_dir: Path, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "lr.pt", "lr", build_model("lr", tiny_schema()))
    export(tmp_path / "lr.pt", data_dir, tmp_path / "art")
    target = target_from_artifact(tmp_path / "art", data_dir)
    records = run_bench([target], data_dir, BenchConfig(candidates=(5,), threads=(1,), requests=3, warmup=0))
    assert records[0]["model"] == "lr" and records[0]["source"] == str(tmp_path / "art")


def test_requests_come_from_the_data(data_dir: Path) -> None:
    rows = request_rows(data_dir)
    schema = Schema.load(data_dir)
    samples = sample_requests(rows, schema, np.arange(1, NUM_ITEMS + 1), 3, 40, seed=1)
    for s in samples:
        assert set(s.user) == {f.name for f in schema.tower("user", "context")}
        assert len(s.candidates) == 40 and set(s.candidates) <= set(range(1, NUM_ITEMS + 1))
        assert all(len(v) == 40 for v in s.cross.values())
    users = rows.features["user_id"].tolist()
    assert all(s.user["user_id"] in users for s in samples)


def test_matmul_rate_and_timer() -> None:
    assert matmul_gflops(size=64, repeats=3) > 0.01
    wall, cpu = time_calls(lambda x: torch.ones(x).sum(), [10, 20], requests=4, warmup=1)
    assert wall.shape == cpu.shape == (4,) and (wall > 0).all() and (cpu >= 0).all()


def test_profile_score_names_the_operators(data_dir: Path) -> None:
    text = profile_score(target_from_model("two_tower", data_dir), data_dir, 20, repeats=2)
    assert text.startswith("two_tower, one request of N=20 on 1 thread: encode_user") and "aten::" in text


def test_bench_config_is_validated() -> None:
    with pytest.raises(ValueError, match="candidates"):
        BenchConfig(candidates=(0,))
    with pytest.raises(ValueError, match="threads"):
        BenchConfig(threads=())


def test_cli_bench_writes_json(data_dir: Path, tmp_path: Path) -> None:
    args = ["bench", "--data", str(data_dir), "--model", "two_tower", "--candidates", "8", "--threads", "1"]
    r = CliRunner().invoke(
        app, [*args, "--requests", "3", "--warmup", "0", "--out", str(tmp_path), "--cache-dtype", "float32,bfloat16"]
    )
    assert r.exit_code == 0, r.output
    records = json.loads((tmp_path / "bench.json").read_text())
    got = [(x["model"], x["cache_dtype"], x["item_cache_bytes_per_item"]) for x in records]
    assert got == [("two_tower", "float32", 256), ("two_tower", "bfloat16", 128)]
    wrong = CliRunner().invoke(app, [*args, "--cache-dtype", "fp8"])
    assert wrong.exit_code != 0 and "--cache-dtype must list some of" in " ".join(wrong.output.split())
    bad = CliRunner().invoke(app, ["bench", "--data", str(data_dir), "--model", "nope"])
    assert bad.exit_code != 0 and "unknown model" in " ".join(bad.output.split())
