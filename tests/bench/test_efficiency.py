"""The serving benchmark on tiny models: every path's columns, runtimes that agree, reports and the CLI."""

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
    PATHS,
    BenchConfig,
    BenchTarget,
    RuntimeMismatch,
    request_rows,
    run_bench,
    sample_requests,
    target_from_artifact,
    target_from_model,
    time_paths,
    write_report,
)
from prerank.cli import app
from prerank.data.parquet import write_dataset
from prerank.models.registry import build_model
from prerank.schema import Schema
from prerank.serve import native
from prerank.serve.export import export_model
from prerank.serve.runtime import OnnxRuntime

NUM_ITEMS = 39
TINY = BenchConfig(candidates=(10, 50), threads=(1, 2), requests=4, warmup=1, distinct=2)
HAS_NATIVE = native.status().startswith("on")
FIELDS = (
    "model",
    "source",
    "cache_dtype",
    "candidates",
    "threads",
    "requests",
    *(f"p{q}_ms_{p}" for p in PATHS for q in (50, 99)),
    "scorer_runtime",
    "best_standard",
    "best_standard_ms",
    "native_speedup",
    "native_note",
    "max_abs_diff_torch",
    "max_abs_diff_onnx",
    "max_abs_diff_native",
    "max_abs_diff_full",
    "flops_per_candidate",
    "item_cache_bytes_per_item",
    "machine",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's ``tiny_dataset``, once per module: a catalogue of item ids 1..NUM_ITEMS, train/valid/test rows."""
    root = tmp_path_factory.mktemp("bench") / "tiny"
    schema = tiny_schema()
    items = tiny_table(NUM_ITEMS, 9, schema).select([f.name for f in schema.tower("item")])
    ids = pa.array(np.arange(1, NUM_ITEMS + 1), pa.int64())
    items = items.set_column(items.column_names.index("item_id"), "item_id", ids)
    splits = {"train": tiny_table(512, 1, schema), "valid": tiny_table(128, 2, schema), "test": tiny_table(128, 3)}
    write_dataset(root, schema, splits, items=items, row_group_size=100)
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-work")


@pytest.fixture(scope="module")
def targets(data_dir: Path, workdir: Path) -> list[BenchTarget]:
    """IntTower (which has a native kernel) and TwoTower (which has none), exported at random init."""
    return [target_from_model(m, data_dir, workdir) for m in ("int_tower", "two_tower")]


@pytest.fixture(scope="module")
def records(targets: list[BenchTarget], data_dir: Path) -> list[dict]:
    return run_bench(targets, data_dir, TINY)


def test_records_have_every_column(records: list[dict]) -> None:
    settings = [(n, t) for n in TINY.candidates for t in TINY.threads]
    assert [(r["model"], r["candidates"], r["threads"]) for r in records] == [
        (m, n, t) for m in ("int_tower", "two_tower") for n, t in settings
    ]
    for r in records:
        assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
        for path in ("full", "eager", "torch", "onnx", "scorer"):
            assert 0 < r[f"p50_ms_{path}"] <= r[f"p99_ms_{path}"]
        standard = {k: r[f"p50_ms_{k}"] for k in ("eager", "torch", "onnx")}
        assert r["best_standard"] == min(standard, key=standard.__getitem__)
        assert r["best_standard_ms"] == min(standard.values())
        assert r["source"] == "random init" and r["cache_dtype"] == "float32" and r["scorer_runtime"] == "onnx"
        assert r["flops_per_candidate"] > 0
        assert r["machine"]["torch"] == torch.__version__ and "native" in r["machine"]
    two = [r for r in records if r["model"] == "two_tower"]
    assert all(r["p50_ms_native"] is None and r["native_speedup"] is None for r in two)
    assert all("TwoTower" in r["native_note"] for r in two)
    assert all(r["item_cache_bytes_per_item"] == 64 * 4 for r in two)
    if HAS_NATIVE:
        for r in (r for r in records if r["model"] == "int_tower"):
            assert r["p50_ms_native"] > 0 and r["native_note"] == ""
            assert r["native_speedup"] == pytest.approx(r["best_standard_ms"] / r["p50_ms_native"])


def test_runtimes_agree_with_eager(records: list[dict]) -> None:
    for r in records:
        for k in ("torch", "onnx"):
            assert r[f"max_abs_diff_{k}"] < 1e-4
        if r["p50_ms_native"] is not None:
            assert r["max_abs_diff_native"] < 1e-4
        assert r["max_abs_diff_full"] < 1e-4  # a float32 cache: the full forward gives the same logits


def test_a_runtime_that_disagrees_is_refused(
    targets: list[BenchTarget], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = OnnxRuntime.score
    monkeypatch.setattr(OnnxRuntime, "score", lambda self, *a: real(self, *a) + 1e-3)
    config = BenchConfig(candidates=(5,), threads=(1,), requests=1, warmup=0, distinct=1)
    with pytest.raises(RuntimeMismatch, match="two_tower at N=5 on 1 thread: the onnx runtime's logits differ"):
        run_bench(targets[1:], data_dir, config)


def test_report_files(records: list[dict], tmp_path: Path) -> None:
    write_report(records, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "bench.json").read_text()) == json.loads(json.dumps(records))
    md = (tmp_path / "out" / "bench.md").read_text()
    assert md.count("| two_tower |") == md.count("| int_tower |") == 4
    assert "| model | cache | N | threads | full | eager | torch | onnx | native | best standard |" in md


def test_an_artifact_without_onnx_is_exported_again(data_dir: Path, tmp_path: Path) -> None:
    model = build_model("lr", tiny_schema())
    export_model("lr", model, data_dir, tmp_path / "art", formats=("torch",))
    target = target_from_artifact(tmp_path / "art", data_dir, tmp_path / "work")
    assert target.name == "lr" and target.artifact.parent == tmp_path / "work" and "re-exported" in target.source
    full = target_from_artifact(target.artifact, data_dir, tmp_path / "work2")
    assert full.artifact == target.artifact and full.source == str(target.artifact)


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


def test_time_paths_times_every_path_in_turns() -> None:
    order: list[str] = []
    calls = {k: (lambda x, k=k: order.append(k), [0]) for k in ("a", "b")}
    times = time_paths(calls, requests=4, warmup=1, blocks=2)
    assert set(times) == {"a", "b"} and all(t.shape == (4,) and (t >= 0).all() for t in times.values())
    assert order == ["a", "b", "a", "a", "b", "b", "b", "b", "a", "a"]  # warm-up, then blocks in rotating order


def test_bench_config_is_validated() -> None:
    with pytest.raises(ValueError, match="candidates"):
        BenchConfig(candidates=(0,))
    with pytest.raises(ValueError, match="threads"):
        BenchConfig(threads=())
    assert BenchConfig().candidates == (100, 1000, 10_000) and BenchConfig().threads == (1, 2)


def test_cli_bench_writes_the_report(targets: list[BenchTarget], data_dir: Path, tmp_path: Path) -> None:
    args = ["bench", "--data", str(data_dir), "--artifact", str(targets[1].artifact), "--candidates", "8"]
    r = CliRunner().invoke(app, [*args, "--threads", "1", "--requests", "2", "--warmup", "0", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "two_tower" in r.output and "best standard" in r.output
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [(x["model"], x["candidates"], x["threads"]) for x in saved] == [("two_tower", 8, 1)]
    assert "| two_tower |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give --artifact and/or --model"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "lr", "--cache-dtype", "fp8"], "--cache-dtype must list some of"),
        (["--model", "lr", "--candidates", "0"], "--candidates must list integers >= 1"),
        (["--model", "lr", "--threads", "one"], "--threads must be a comma list of integers"),
        (["--artifact", "/nonexistent/art"], "does not exist"),
    ],
)
def test_cli_bench_rejects_bad_options(data_dir: Path, extra: list[str], message: str) -> None:
    r = CliRunner().invoke(app, ["bench", "--data", str(data_dir), *extra])
    assert r.exit_code != 0 and message in " ".join(r.output.split()), r.output


def test_served_latency_reports_cpu_per_request_at_a_fixed_rate(data_dir: Path, tmp_path: Path) -> None:
    from prerank.bench.efficiency import served_latency

    torch.manual_seed(0)
    model = build_model("cold", Schema.load(data_dir))
    got = served_latency("cold", model, data_dir, tmp_path / "art", candidates=20, requests=10, warmup=1, rate=50.0)
    assert got["latency_p50_ms"] > 0 and got["latency_candidates"] == 20
    assert 0 < got["cpu_ms_per_request"] < 1e3 and got["cpu_rate"] == 50.0
    assert 0 < got["cpu_rate_achieved"] <= 10 / (9 / 50.0)  # request i is never sent before t0 + i / rate
    plain = served_latency("cold", model, data_dir, tmp_path / "art2", candidates=20, requests=4, warmup=1)
    assert "cpu_ms_per_request" not in plain
