"""Fault injection: ``prerank train``, ``teacher score`` and ``export`` killed with SIGKILL at seeded random points.

Training checkpoints once an epoch (``last.pt``, written atomically), so a kill loses at most the epoch in progress;
resuming restores weights, optimizer, RNG and the epoch's data order, so the killed-and-resumed run ends with the
weights of an uninterrupted one. ``teacher score`` and ``export`` write to temporary names and rename, so whatever is
visible under the final names is always complete (the old or the new), and a rerun finishes the job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_schema
from prerank.io import CheckpointError
from prerank.models.registry import build_model
from prerank.serve.export import export, load_artifact
from prerank.train.checkpoint import read_checkpoint, save_checkpoint
from prerank.train.config import TrainConfig
from prerank.train.trainer import train_model

from .conftest import write_tiny

pytestmark = pytest.mark.slow

CLI = "from prerank.cli import main; main()"
EPOCHS = 8
#: Two-Tower with dropout, so that resuming must restore the torch RNG as well as the data order.
TRAIN = ["--model", "two_tower", "--model-option", "dropout=0.2", "--epochs", str(EPOCHS), "--batch-size", "64"]
TRAIN += ["--lr", "0.003", "--patience", str(EPOCHS), "--threads", "1", "--seed", "7", "--no-progress"]


def prerank(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def kill_when(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    delay: float,
    watch: Callable[[], None] = lambda: None,
    timeout: float = 120,
) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds, calling ``watch()`` (which asserts what must
    hold at every moment) all along; False if the command finished before it could be killed."""
    deadline = time.monotonic() + timeout
    while not ready():
        watch()
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the command made no progress"
        time.sleep(0.01)
    kill_at = time.monotonic() + delay
    while time.monotonic() < kill_at:
        watch()
        if proc.poll() is not None:
            return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    watch()
    return True


def finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out
    return out


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny schema with 6,000 training rows in three files, so that an epoch takes a moment."""
    root = write_tiny(tmp_path_factory.mktemp("faults") / "data", rows=(6000, 500, 500))
    for split, parts in (("train", 3), ("valid", 2)):  # several files per split: a kill can fall between two
        table = pq.read_table(root / split / "part-00000.parquet")
        (root / split / "part-00000.parquet").unlink()
        step = -(-table.num_rows // parts)
        for i in range(parts):
            pq.write_table(table.slice(i * step, step), root / split / f"part-{i:05d}.parquet", row_group_size=500)
    return root


def test_training_killed_three_times_resumes_to_the_uninterrupted_weights(data: Path, tmp_path: Path) -> None:
    ref_dir = tmp_path / "reference"
    cfg = TrainConfig(epochs=EPOCHS, batch_size=64, lr=0.003, patience=EPOCHS, threads=1, seed=7, progress=False)
    ref = train_model("two_tower", data, ref_dir, {"dropout": 0.2}, config=cfg, log=lambda _: None)
    assert ref.epochs == EPOCHS
    epoch_seconds = ref.train_seconds / EPOCHS

    run = tmp_path / "run"
    rng = np.random.default_rng(27)
    kills, resumed_at = 0, []
    while kills < 3:
        # kill part-way through the epoch after one or two more logged epochs
        target = lines(run / "metrics.jsonl") + 1 + int(rng.integers(0, 2))
        proc = prerank("train", "--data", str(data), "--out", str(run), *TRAIN, *(["--resume"] if kills else []))
        delay = float(rng.uniform(0.05, 1.0)) * epoch_seconds
        killed = kill_when(proc, lambda t=target: lines(run / "metrics.jsonl") >= t, delay)
        assert killed, "the run finished before it could be killed; make the epochs longer"
        kills += 1
        logged = lines(run / "metrics.jsonl")
        saved = read_checkpoint(run / "last.pt")["trainer"]["epoch"] + 1  # never a torn file: it loads
        # at most one checkpoint interval lost: the log is written just before last.pt, so it is ahead by <= 1
        assert logged - 1 <= saved <= logged
        resumed_at.append(saved)
    out = finish(prerank("train", "--data", str(data), "--out", str(run), *TRAIN, "--resume"))
    assert f"at epoch {resumed_at[-1] + 1}" in " ".join(out.split())
    assert resumed_at == sorted(resumed_at) and resumed_at[-1] < EPOCHS

    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))  # no epoch logged twice, none missing
    for mine, theirs in zip(history, ref.history, strict=True):
        assert mine["valid_auc"] == pytest.approx(theirs["valid_auc"], abs=1e-6)
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)
    for name in ("best.pt", "last.pt"):
        got, want = read_checkpoint(run / name)["state_dict"], read_checkpoint(ref_dir / name)["state_dict"]
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5, msg=f"{name}:{key}")


def _parts(root: Path) -> list[Path]:
    return sorted(root.glob("*/part-*.parquet"))


def whole(rows: dict[Path, int]) -> None:
    """Every Parquet part under its final name is a complete file with all its rows."""
    for path, n in rows.items():
        assert pq.read_metadata(path).num_rows == n, path


def test_teacher_score_killed_never_shows_a_half_written_file(data: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(data, root)
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    save_checkpoint(teacher, "ranker", build_model("ranker", tiny_schema(), {"hidden": [1024, 1024]}))
    rows = {p: pq.read_metadata(p).num_rows for p in _parts(root)}
    args = ["teacher", "score", "--teacher", str(teacher), "--data", str(root), "--batch-size", "256"]
    delay = float(np.random.default_rng(5).uniform(0.0, 0.3))
    scoring = lambda: any(root.glob("*/.part-*.tmp"))  # noqa: E731
    assert kill_when(prerank(*args), scoring, delay, watch=lambda: whole(rows)), "scoring finished before the kill"
    finish(prerank(*args))
    assert json.loads((root / "schema.json").read_text())["has_teacher_logit"]
    for p, n in rows.items():
        table = pq.read_table(p)
        assert table.num_rows == n and np.isfinite(table.column("teacher_logit").to_numpy()).all()


def test_export_killed_leaves_the_old_artifact_or_none_never_half_a_new_one(data: Path, tmp_path: Path) -> None:
    old_ckpt, new_ckpt = tmp_path / "old.pt", tmp_path / "new.pt"
    for seed, path in ((0, old_ckpt), (1, new_ckpt)):
        torch.manual_seed(seed)
        save_checkpoint(path, "two_tower", build_model("two_tower", tiny_schema()))
    art = tmp_path / "art"
    old = export(old_ckpt, data, art, formats=("torch",))["weights_sha256"]
    args = ["export", "--checkpoint", str(new_ckpt), "--data", str(data), "--out", str(art), "--formats", "torch"]
    delay = float(np.random.default_rng(9).uniform(0.0, 1.0))
    exporting = lambda: any(tmp_path.glob(".art.*.tmp"))  # noqa: E731
    assert kill_when(prerank(*args), exporting, delay, watch=lambda: complete(art)), "export finished before the kill"
    if art.exists():  # absent only if killed between moving the old artifact aside and the new one in
        sha = load_artifact(art, runtime="torch").manifest["weights_sha256"]
        assert sha in (old, read_weights_sha(new_ckpt))
    finish(prerank(*args))
    assert load_artifact(art, runtime="torch").manifest["weights_sha256"] == read_weights_sha(new_ckpt)


def complete(art: Path) -> None:
    """The artifact under its final name, if any, has its manifest and every file the manifest lists."""
    if not art.exists():
        return
    files = json.loads((art / "manifest.json").read_text())["files"]
    assert all((art / f).is_file() for f in files), art


def read_weights_sha(checkpoint: Path) -> str:
    from prerank.serve.export import weights_sha256

    return weights_sha256(read_checkpoint(checkpoint)["state_dict"])


def test_a_torn_checkpoint_is_refused_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, "lr", build_model("lr", tiny_schema()))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
