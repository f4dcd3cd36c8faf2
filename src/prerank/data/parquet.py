"""Streaming Parquet datasets: the on-disk format of DESIGN.md "Data".

Layout of a dataset directory::

    DIR/schema.json            the :class:`~prerank.schema.Schema`
    DIR/meta.json              how it was made (recipe, protocol, seed, row counts)
    DIR/train/part-*.parquet   one folder per split (train, valid, test)
    DIR/items.parquet          the item catalogue: one row per item id with every item feature

Reading never loads a whole split: files are read row group by row group, converted column-wise
to tensors, shuffled inside a bounded buffer and cut into :class:`~prerank.data.batch.Batch`es.
Every row group is checked against the schema on the way (columns, dtypes, vocabulary range,
NaN), and the error names the file and the column.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prerank.data.batch import Batch
from prerank.io import atomic_write, atomic_write_text
from prerank.schema import Schema, SchemaError

SPLITS: tuple[str, ...] = ("train", "valid", "test")


class DataError(ValueError):
    """The data does not satisfy its schema (names the file and the column)."""


# ----------------------------------------------------------------------------------- writing


def _arrow_type(kind: str) -> pa.DataType:
    return {"categorical": pa.int64(), "sequence": pa.list_(pa.int32()), "dense": pa.float32()}[kind]


RESERVED_TYPES: dict[str, pa.DataType] = {
    "request_id": pa.int64(),
    "label": pa.float32(),
    "label_level": pa.int8(),
    "stage": pa.int8(),
    "teacher_logit": pa.float32(),
    "ts": pa.int64(),
}


def arrow_schema(schema: Schema, reserved: tuple[str, ...]) -> pa.Schema:
    """The Arrow schema prerank writes for ``schema`` plus the given reserved columns."""
    cols = [pa.field(r, RESERVED_TYPES[r]) for r in reserved]
    cols += [pa.field(f.name, _arrow_type(f.kind)) for f in schema.features]
    return pa.schema(cols)


class SplitWriter:
    """Write one split as numbered Parquet parts, each part atomically.

    ``write(table)`` appends rows; parts are cut at ``rows_per_file`` and row groups at
    ``row_group_size``, so memory stays bounded however many rows are written.
    """

    def __init__(self, root: str | Path, split: str, *, rows_per_file: int = 1_000_000, row_group_size: int = 65_536):
        self.dir = Path(root) / split
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("part-*.parquet"):
            old.unlink()
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._part = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        while self._pending_rows >= self.rows_per_file:
            full = pa.concat_tables(self._pending)
            self._flush(full.slice(0, self.rows_per_file))
            rest = full.slice(self.rows_per_file)
            self._pending, self._pending_rows = [rest], rest.num_rows

    def _flush(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        path = self.dir / f"part-{self._part:05d}.parquet"
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=self.row_group_size))
        self._part += 1

    def close(self) -> None:
        if self._pending_rows:
            self._flush(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0


def write_dataset(
    root: str | Path,
    schema: Schema,
    splits: dict[str, pa.Table],
    *,
    items: pa.Table | None = None,
    meta: dict | None = None,
    row_group_size: int = 65_536,
) -> None:
    """Write a whole dataset: ``schema.json``, one folder per split, the item catalogue, ``meta.json``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, table in splits.items():
        w = SplitWriter(root, name, row_group_size=row_group_size)
        w.write(table)
        w.close()
    rows = {name: t.num_rows for name, t in splits.items()}
    finish_dataset(root, schema, rows, items=items, meta=meta, row_group_size=row_group_size)


def finish_dataset(
    root: str | Path,
    schema: Schema,
    rows: dict[str, int],
    *,
    items: pa.Table | None = None,
    meta: dict | None = None,
    row_group_size: int = 65_536,
) -> None:
    """Complete a dataset whose splits were written (e.g. by :class:`SplitWriter`): the item catalogue,
    ``meta.json`` (with the split sizes ``rows``) and ``schema.json``."""
    root = Path(root)
    if items is not None:
        atomic_write(root / "items.parquet", lambda tmp: pq.write_table(items, tmp, row_group_size=row_group_size))
    info = dict(meta or {})
    info["rows"] = rows
    atomic_write_text(root / "meta.json", json.dumps(info, indent=2, default=str))
    schema.save(root / "schema.json")


# ----------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RowGroup:
    path: Path
    index: int
    num_rows: int


class ParquetSplit:
    """One split (or the item catalogue) of a dataset directory: its files, schema and row groups."""

    def __init__(self, root: str | Path, split: str, schema: Schema | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset directory {self.root} does not exist")
        self.schema = schema or Schema.load(self.root)
        self.split = split
        if split == "items":
            files = [self.root / "items.parquet"] if (self.root / "items.parquet").exists() else []
        else:
            files = sorted((self.root / split).glob("*.parquet"))
        if not files:
            raise DataError(f"no Parquet files for split {split!r} under {self.root}")
        self.files = files
        self.row_groups: list[RowGroup] = []
        for path in files:
            try:
                md = pq.ParquetFile(path).metadata
            except Exception as e:
                raise DataError(f"{path} is not a readable Parquet file: {e}") from e
            self._check_columns(path, pq.read_schema(path))
            self.row_groups += [RowGroup(path, i, md.row_group(i).num_rows) for i in range(md.num_row_groups)]
        self.num_rows = sum(g.num_rows for g in self.row_groups)
        if self.num_rows == 0:
            raise DataError(f"split {split!r} under {self.root} has no rows")

    @functools.cached_property
    def columns(self) -> list[str]:
        """Columns this reader loads: features, plus reserved columns present in the files."""
        present = set(pq.read_schema(self.files[0]).names)
        feats = [f.name for f in self.schema.features]
        if self.split == "items":
            feats = [f.name for f in self.schema.tower("item")]
        return [r for r in RESERVED_TYPES if r in present and r != "ts"] + feats

    def _check_columns(self, path: Path, arrow: pa.Schema) -> None:
        names = set(arrow.names)
        wanted = self.schema.tower("item") if self.split == "items" else self.schema.features
        missing = [f.name for f in wanted if f.name not in names]
        if self.split != "items" and "label" not in names:
            missing.append("label")
        if missing:
            raise SchemaError(f"{path}: columns {missing} named by the schema are missing from the data")
        for f in wanted:
            t = arrow.field(f.name).type
            ok = {
                "categorical": pa.types.is_integer(t),
                "dense": pa.types.is_floating(t) or pa.types.is_integer(t),
                "sequence": (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type),
            }[f.kind]
            if not ok:
                raise SchemaError(f"{path}: column {f.name!r} has type {t}, which does not fit kind {f.kind!r}")
        for r in ("label", "teacher_logit", "request_id", "label_level", "stage"):
            if r in names:
                t = arrow.field(r).type
                if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
                    raise SchemaError(f"{path}: reserved column {r!r} must be numeric, got {t}")

    def read_table(self, group: RowGroup) -> pa.Table:
        return read_row_group(group.path, group.index, self.columns)

    def to_batch(self, table: pa.Table, where: str = "") -> Batch:
        """Convert an Arrow table to a :class:`Batch`, validating every column."""
        return table_to_batch(table, self.schema, where=where)


def read_row_group(path: Path, index: int, columns: list[str] | None = None) -> pa.Table:
    """Row group ``index`` of ``path``; a :class:`DataError` naming the file and row group if it cannot be decoded
    (garbage in a data page, a file truncated after its footer was read)."""
    try:
        return pq.ParquetFile(path).read_row_group(index, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path} (row group {index}) is corrupt: {' '.join(str(e).split())}") from e


def _padded_sequence(col: pa.ChunkedArray | pa.Array, max_len: int) -> np.ndarray:
    """A list column as ``[n, max_len]`` int64, keeping the last ``max_len`` ids, left-aligned, 0-padded."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if arr.null_count:
        arr = arr.fill_null(pa.scalar([], arr.type))
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.minimum(np.diff(offsets), max_len)
    start = offsets[1:] - lengths
    pos = np.arange(max_len)[None, :]
    valid = pos < lengths[:, None]
    if values.size == 0:
        return np.zeros((n, max_len), dtype=np.int64)
    idx = np.minimum(start[:, None] + pos, values.size - 1)
    return np.where(valid, values[idx], 0)


def table_to_batch(table: pa.Table, schema: Schema, *, where: str = "") -> Batch:
    """Arrow table -> validated :class:`Batch` (see :class:`ParquetSplit` for the checks)."""
    feats: dict[str, torch.Tensor] = {}
    present = set(table.column_names)
    for f in schema.features:
        if f.name not in present:
            continue
        col = table.column(f.name)
        if f.kind == "sequence":
            arr = _padded_sequence(col, f.max_len)
        else:
            if col.null_count:
                raise DataError(f"{where}: column {f.name!r} has {col.null_count} null values")
            arr = col.to_numpy()
        if f.kind == "dense":
            arr = np.array(arr, dtype=np.float32)  # writable copy for torch
            if not np.isfinite(arr).all():
                raise DataError(f"{where}: dense column {f.name!r} has NaN or infinite values")
            feats[f.name] = torch.from_numpy(arr)
            continue
        vocab = schema.vocab(f.name)
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= vocab:
                raise DataError(
                    f"{where}: column {f.name!r} has ids in [{lo}, {hi}] outside its vocabulary [0, {vocab})"
                )
        feats[f.name] = torch.from_numpy(np.array(arr, dtype=np.int64))

    def reserved(name: str, dtype: np.dtype, finite: bool) -> torch.Tensor | None:
        if name not in present:
            return None
        col = table.column(name)
        if col.null_count:
            raise DataError(f"{where}: column {name!r} has {col.null_count} null values")
        arr = np.array(col.to_numpy(), dtype=dtype)
        if finite and not np.isfinite(arr).all():
            raise DataError(f"{where}: column {name!r} has NaN or infinite values")
        return torch.from_numpy(arr)

    label = reserved("label", np.float32, True)
    if label is not None and label.numel() and not bool(((label == 0) | (label == 1)).all()):
        raise DataError(f"{where}: column 'label' must be 0 or 1")
    return Batch(
        features=feats,
        label=label,
        request_id=reserved("request_id", np.int64, False),
        label_level=reserved("label_level", np.int64, False),
        stage=reserved("stage", np.int64, False),
        teacher_logit=reserved("teacher_logit", np.float32, True),
    )


class BatchStream(IterableDataset):
    """An iterable over :class:`Batch`es of one split, streamed row group by row group.

    Shuffling (training) permutes row-group order per epoch and rows inside a buffer of at least
    ``buffer_rows`` rows, so memory is bounded by the buffer, not the split. Row groups are
    sharded over DataLoader workers and over distributed ranks (``rank``/``world_size``).
    """

    def __init__(
        self,
        split: ParquetSplit,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        buffer_rows: int = 262_144,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_rows = max(buffer_rows, batch_size)
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.split.num_rows / self.world_size
        return int(n // self.batch_size) if self.drop_last else math.ceil(n / self.batch_size)

    def _groups(self) -> list[RowGroup]:
        groups = list(self.split.row_groups)
        if self.shuffle:
            rng = np.random.default_rng((self.seed, self.epoch))
            groups = [groups[i] for i in rng.permutation(len(groups))]
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        shard, n_shards = self.rank * n_workers + worker, self.world_size * n_workers
        return groups[shard::n_shards]

    def __iter__(self) -> Iterator[Batch]:
        rng = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank)) % (2**62))
        buffer: list[Batch] = []
        buffered = 0
        for g in self._groups():
            where = f"{g.path} (row group {g.index})"
            buffer.append(self.split.to_batch(self.split.read_table(g), where=where))
            buffered += g.num_rows
            if buffered >= self.buffer_rows:
                rest = yield from self._emit(Batch.concat(buffer), rng, final=False)
                buffer, buffered = ([rest], len(rest)) if rest is not None else ([], 0)
        if buffer:
            yield from self._emit(Batch.concat(buffer), rng, final=True)

    def _emit(self, rows: Batch, rng: torch.Generator, *, final: bool) -> Iterator[Batch]:
        n = len(rows)
        if self.shuffle:
            rows = rows.select(torch.randperm(n, generator=rng))
        full = n - n % self.batch_size
        for start in range(0, full, self.batch_size):
            yield rows.select(slice(start, start + self.batch_size))
        if full == n:
            return None
        tail = rows.select(slice(full, n))
        if not final:
            return tail
        if not self.drop_last:
            yield tail
        return None


def make_loader(
    root: str | Path,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    schema: Schema | None = None,
    rank: int = 0,
    world_size: int = 1,
    buffer_rows: int = 262_144,
) -> DataLoader:
    """A DataLoader of :class:`Batch`es for ``root/split`` (batching happens in :class:`BatchStream`)."""
    stream = BatchStream(
        ParquetSplit(root, split, schema),
        batch_size,
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        buffer_rows=buffer_rows,
    )
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False, collate_fn=_identity)


def _identity(b: Batch) -> Batch:
    return b


def read_meta(root: str | Path) -> dict:
    path = Path(root) / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}
