"""Row alignment of two datasets prepared from the same log with different feature sets.

A recipe's ``--features wide`` set (FSCD, issue 22) keeps the default set's rows in the same order and adds fields
only a ranker can afford. A teacher trained on the wide set scores the wide rows, and its logits go into the default
set that the pre-rankers train on (``prerank teacher score --features-from``). That is only right if row ``r`` of a
split is the same impression in both: this module checks it on the columns that identify an impression.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prerank.data.parquet import DataError

#: Columns compared row by row where both datasets have them (``request_id`` and ``label`` always).
ALIGN_COLUMNS: tuple[str, ...] = ("request_id", "label", "label_level", "ts", "user_id", "item_id")


def dataset_splits(root: str | Path) -> list[str]:
    """The split folders of ``root`` that hold Parquet files, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a dataset directory")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.parquet")))


def split_parts(root: str | Path, split: str) -> list[Path]:
    """The Parquet parts of ``root/split`` in the order their rows are read."""
    return sorted((Path(root) / split).glob("*.parquet"))


def _columns(parts: list[Path]) -> set[str]:
    return set(pq.read_schema(parts[0]).names) if parts else set()


def _read(parts: list[Path], columns: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts]).combine_chunks()


def check_aligned(source: str | Path, target: str | Path, splits: list[str] | None = None) -> dict[str, int]:
    """Raise :class:`DataError` unless every split of ``target`` (or ``splits``) has, in ``source``, the same number
    of rows and the same values, row for row, in every :data:`ALIGN_COLUMNS` column both have; returns rows per
    split. The message names the split, the first row and column that differ, and both values.

    Reads only those columns (a few numbers per row).
    """
    splits = dataset_splits(target) if splits is None else splits
    if not splits:
        raise DataError(f"{target} has no split folders with Parquet files")
    rows: dict[str, int] = {}
    for split in splits:
        src, tgt = split_parts(source, split), split_parts(target, split)
        if not src or not tgt:
            raise DataError(f"split {split!r}: {source if not src else target}/{split} has no Parquet files")
        have_src, have_tgt = _columns(src), _columns(tgt)
        for required in ("request_id", "label"):
            if required not in have_src or required not in have_tgt:
                raise DataError(f"split {split!r}: both datasets need a {required!r} column to be aligned")
        columns = [c for c in ALIGN_COLUMNS if c in have_src and c in have_tgt]
        a, b = _read(src, columns), _read(tgt, columns)
        if a.num_rows != b.num_rows:
            raise DataError(
                f"split {split!r}: {target} has {b.num_rows:,} rows, {source} has {a.num_rows:,}: "
                "they are not the same log"
            )
        for c in columns:
            x, y = a[c].to_numpy(zero_copy_only=False), b[c].to_numpy(zero_copy_only=False)
            differ = x != y
            if np.issubdtype(x.dtype, np.floating):
                differ &= ~(np.isnan(x) & np.isnan(y))
            if differ.any():
                r = int(np.flatnonzero(differ)[0])
                raise DataError(
                    f"split {split!r}, row {r}: column {c!r} is {y[r]!r} in {target} but {x[r]!r} in {source} "
                    f"({int(differ.sum()):,} rows differ): the rows are not aligned"
                )
        rows[split] = a.num_rows
    return rows
