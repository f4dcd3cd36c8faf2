"""Out-of-fold teacher logits (K-fold cross-fitting), so that a student distilled on the train split never learns
from a teacher's score of a row that teacher was trained on.

An in-fold teacher has seen the train rows it scores: its logits there are sharper and more often right than on
unseen rows, and a student that imitates them learns the teacher's memorisation of the labels rather than its
judgement. Cross-fitting removes that: the train rows are split into K folds; for each fold a teacher is trained
on the other K - 1 folds (early-stopped on the valid split, as the full teacher) and scores the held-out fold.
Valid and test are scored by the teacher fitted on all of train (as at serving time, where the teacher has seen
every logged row).

Folds are drawn per row (``by="row"``, uniform, seeded) or per request (``by="request"``: all rows of a
``request_id`` in one fold). Per row, a fold teacher still sees other rows of the held-out row's request and user, as
the full teacher does when it scores valid and test; but the rows of one request are then scored by different fold
teachers, and each of them learnt the request from its other rows, whose labels exclude the held-out ones (the
leave-one-out effect of target encoding): when the teacher memorises the user or request, the fold teacher whose
held-out rows of a request hold its positives saw fewer of them and scores the request lower than the fold teacher
whose held-out rows are negatives. So per-row folds can invert the order inside requests (on Taobao UserBehavior the
out-of-fold logits' GAUC on train was 0.39 per row, 0.54 within the rows one teacher scored). Per-request folds score
every row of a request with one teacher that never saw it, so the order within a request is that teacher's judgement
(GAUC on train 0.54 there), but the teacher no longer knows the rest of the request's day either (train AUC 0.665
against 0.701 per row), and on that log the students distilled from per-request logits were worse, on AUC and GAUC,
than those from per-row logits (docs/results.md, issue 21 part 4). Per row stays the default; which is better is a
question for each log's valid split.
The train split is read once into memory (its Parquet columns, not tensors) to cut it into folds.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prerank.data.parquet import ParquetSplit, table_to_batch, write_dataset
from prerank.io import atomic_path
from prerank.models.base import PreRanker
from prerank.schema import Schema
from prerank.train.config import TrainConfig
from prerank.train.ensemble import fit

FOLD_BY = ("row", "request")


def fold_of_rows(n: int, folds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """``[n]`` fold index of each row: a seeded permutation of the rows cut into ``folds`` near-equal parts; with
    ``groups`` (``[n]``, e.g. request ids), of the distinct groups instead, so that a group's rows share one fold."""
    if folds < 2:
        raise ValueError(f"out-of-fold scoring needs at least 2 folds, got {folds}")
    if groups is not None:
        keys, group_of_row = np.unique(groups, return_inverse=True)
        if len(keys) < folds:
            raise ValueError(f"the train split has {len(keys)} requests, fewer than the {folds} folds")
        return fold_of_rows(len(keys), folds, seed)[group_of_row]
    if n < folds:
        raise ValueError(f"the train split has {n} rows, fewer than the {folds} folds")
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return fold


@torch.no_grad()
def _logits(model: PreRanker, table: pa.Table, schema: Schema, batch_size: int) -> np.ndarray:
    model.eval()
    out = [
        model(table_to_batch(table.slice(s, batch_size), schema)).float().numpy()
        for s in range(0, table.num_rows, batch_size)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def out_of_fold_logits(
    model_name: str,
    model_config: dict,
    data_dir: str | Path,
    work_dir: str | Path,
    *,
    folds: int,
    config: TrainConfig,
    seed: int = 0,
    by: str = "row",
    batch_size: int = 8192,
    log: Callable[[str], None] = print,
) -> tuple[list[Path], list[np.ndarray]]:
    """Train ``folds`` teachers (registry ``model_name`` with ``model_config``, trainer ``config``; an ``ensemble``
    teacher's members one by one, as ``teacher fit --ensemble`` does) on the train split of ``data_dir`` minus one
    fold each, and score each held-out fold. Folds are drawn ``by`` row or by request (module docstring).

    Returns the train split's Parquet parts and, for each part, the out-of-fold logits of its rows in file order.
    ``work_dir`` holds the fold datasets and runs (``fold-K/``), removed when done.
    """
    if by not in FOLD_BY:
        raise ValueError(f"folds are drawn by one of {', '.join(FOLD_BY)}, got {by!r}")
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    schema = Schema.load(data_dir)
    parts = ParquetSplit(data_dir, "train", schema).files
    tables = [pq.read_table(p) for p in parts]
    train = pa.concat_tables(tables).combine_chunks()
    if by == "request" and "request_id" not in train.column_names:
        raise ValueError(f"{data_dir} has no request_id column, so its folds cannot be drawn by request")
    groups = train.column("request_id").to_numpy() if by == "request" else None
    fold = fold_of_rows(train.num_rows, folds, seed, groups)
    logits = np.full(train.num_rows, np.nan, dtype=np.float32)
    shutil.rmtree(work_dir, ignore_errors=True)  # what an interrupted run left
    items = pq.read_table(data_dir / "items.parquet") if (data_dir / "items.parquet").exists() else None
    valid = pa.concat_tables([pq.read_table(p) for p in ParquetSplit(data_dir, "valid", schema).files])
    try:
        for k in range(folds):
            held = np.flatnonzero(fold == k)
            fold_dir = work_dir / f"fold-{k}"
            write_dataset(
                fold_dir / "data",
                schema,
                {"train": train.take(np.flatnonzero(fold != k)), "valid": valid},
                items=items,
                meta={"cross_fitting": {"fold": k, "folds": folds, "seed": seed, "source": str(data_dir)}},
            )
            log(f"fold {k + 1}/{folds}: training the teacher on {train.num_rows - len(held):,} rows")
            model = fit(model_name, model_config, fold_dir / "data", fold_dir / "run", config, log=log)
            logits[held] = _logits(model, train.take(held), schema, batch_size)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    bounds = np.cumsum([0] + [t.num_rows for t in tables])
    return parts, [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def write_logits(path: Path, logits: np.ndarray) -> None:
    """Replace (or add) the ``teacher_logit`` column of the Parquet file ``path`` with ``logits``, atomically."""
    table = pq.read_table(path)
    if len(logits) != table.num_rows:
        raise ValueError(f"{path} has {table.num_rows} rows but {len(logits)} logits were given")
    if "teacher_logit" in table.column_names:
        table = table.drop_columns(["teacher_logit"])
    table = table.append_column(pa.field("teacher_logit", pa.float32()), pa.array(logits, pa.float32()))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
