"""Data-parallel training: 2 gloo ranks on CPU train the same model as 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_schema, tiny_table
from prerank.data.parquet import write_dataset
from prerank.train.checkpoint import read_checkpoint
from prerank.train.config import TrainConfig
from prerank.train.trainer import train_model

GLOBAL_BATCH = 64
#: Row groups of one local batch and a shuffle buffer of one global batch: step t of the single process then
#: reads exactly the row groups that the two ranks read at step t (the row-group order is shared), so the two
#: runs see the same global batches and must agree up to float rounding. SGD, because its update is linear in
#: the gradient: Adam divides by the gradient's own scale, which magnifies the rounding of near-zero gradients
#: (embedding rows: 4e-4 apart after 16 steps with Adam, against 1e-7 with SGD).
CONFIG = TrainConfig(
    epochs=2,
    batch_size=GLOBAL_BATCH,
    shuffle_buffer_rows=GLOBAL_BATCH,
    lr=0.1,
    optimizer="sgd",
    threads=1,
    progress=False,
    patience=5,
)
MODELS = {"two_tower": None, "int_tower": {"hidden": [32, 16], "cir_weight": 1.0}}


def _write(root: Path, train_rows: int, row_group_size: int) -> Path:
    schema = tiny_schema()
    splits = {"train": tiny_table(train_rows, 1, schema), "valid": tiny_table(96, 2, schema), "test": tiny_table(64, 3)}
    write_dataset(root, schema, splits, row_group_size=row_group_size)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("ddp") / "data", 512, GLOBAL_BATCH // 2)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 row groups of 30 rows and one of 10: one rank reads 90 rows (6 batches of 16 a rank), the other 70
    (5 batches), so the ranks must stop together or deadlock."""
    return _write(tmp_path_factory.mktemp("uneven") / "data", 160, 30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, jobs: list[tuple]) -> None:
    """One torchrun-like rank: the environment torchrun sets, then the ordinary training calls."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    for name, data, out, overrides, config in jobs:
        train_model(name, data, out, overrides, config, log=lambda _: None)
    torch.distributed.destroy_process_group()


def _run_ranks(world: int, jobs: list[tuple], timeout: float = 180.0) -> None:
    args = (world, _free_port(), jobs)
    ctx = mp.start_processes(_rank, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish in {timeout:.0f} s (a deadlock?)")


@pytest.fixture(scope="module")
def two_ranks(dataset: Path, uneven: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_runs")
    jobs = [(name, dataset, out / name, overrides, CONFIG) for name, overrides in MODELS.items()]
    jobs.append(("lr", uneven, out / "uneven", None, replace(CONFIG, epochs=1, batch_size=32)))
    _run_ranks(2, jobs)
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run / "last.pt")["state_dict"]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.slow
def test_two_gloo_ranks_train_the_model_of_one_process(name: str, dataset: Path, two_ranks: Path, tmp_path: Path):
    single = train_model(name, dataset, tmp_path / "one", MODELS[name], CONFIG, log=lambda _: None)
    train_model(name, dataset, tmp_path / "first", MODELS[name], replace(CONFIG, max_steps=1), log=lambda _: None)
    one, ddp = _weights(tmp_path / "one"), _weights(two_ranks / name)
    moved = max(float((one[k] - v).abs().max()) for k, v in _weights(tmp_path / "first").items())
    assert moved > 0.05, "training barely moved the weights: agreement would prove nothing"
    for key, value in one.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{name}.{k}: {m}")
    trainer = read_checkpoint(two_ranks / name / "last.pt")["trainer"]
    assert trainer["samples"] == 2 * 512, "the record counts every rank's rows"
    for a, b in zip(trainer["history"], single.history, strict=True):
        assert a["valid_auc"] == pytest.approx(b["valid_auc"], abs=1e-4)  # sharded evaluation, gathered on rank 0


@pytest.mark.slow
def test_uneven_shards_stop_together_and_resume_on_another_rank_count(uneven: Path, two_ranks: Path) -> None:
    run = two_ranks / "uneven"
    first = read_checkpoint(run / "last.pt")["trainer"]
    # 90 rows = 6 batches of 16 on one rank (the last of 10), 70 rows = 5 batches (the last of 6) on the other
    assert first["steps"] == 5 and first["samples"] == 5 * 16 + 4 * 16 + 6
    more = replace(CONFIG, epochs=2, batch_size=32)
    resumed = train_model("lr", uneven, run, None, more, resume=True, log=lambda _: None)
    assert [r["epoch"] for r in resumed.history] == [1, 2]


@pytest.mark.slow
def test_torchrun_runs_the_cli_on_two_ranks(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    cmd += ["-m", "prerank", "train", "--model", "lr", "--data", str(dataset), "--out", str(out)]
    cmd += ["--epochs", "1", "--batch-size", "64", "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "test.json").read_text())
    assert summary["epochs"] == 1 and 0.0 <= summary["test"]["auc"] <= 1.0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 alone writes


@pytest.mark.slow
def test_torchrun_runs_compare_on_two_ranks(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    cmd += ["-m", "prerank", "compare", "--models", "lr,two_tower", "--seeds", "1", "--data", str(dataset)]
    cmd += ["--out", str(out), "--epochs", "1", "--batch-size", "64", "--threads", "1", "--latency-candidates", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())
    runs = sorted((r["model"], r["seed"]) for r in records)  # rank 0 alone writes: each run once
    assert runs == [("lr", 0), ("two_tower", 0)]
    assert all(0.0 <= r["auc"] <= 1.0 and r["epochs"] == 1 for r in records)
    assert "two_tower" in (out / "results.md").read_text()
