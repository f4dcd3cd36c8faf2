"""Request-level loading: batches of whole requests for listwise losses and full-stage training.

RankTower (ranktower.txt) Sec. 3.1 trains on "user-level listwise samples containing multiple
positive items and multiple objectives": one list per request with its impressions (graded labels)
and, on a cascade dataset, its rank candidates, pre-rank candidates and random items.

A batch holds ``R`` requests padded to the longest list ``N``: every tensor is ``[R, N, ...]``
(categorical ``[R, N]``, sequence ``[R, N, L]``, dense ``[R, N]``, label/stage/... ``[R, N]``) and
``mask`` ``[R, N]`` is False on padding, where every value is 0. ``batch.flat()`` gives the row batch
of the valid rows in request order.

Streaming follows :class:`~prerank.data.parquet.BatchStream`: row groups are read one at a time
(shuffled per epoch and sharded over workers and ranks) and requests are shuffled inside a buffer of
``buffer_requests`` requests. Rows of one request must be contiguous (the cascade builder writes
them so); a request may straddle row groups and files. Each request belongs to the row group where
it starts: that group's reader carries the request's tail over from the following groups, and the
reader of a following group skips rows that continue a request started before it.

Stage filters give the sampling ablations of RankTower Table 2 (:data:`STAGE_PRESETS`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prerank.data.batch import Batch
from prerank.data.parquet import DataError, ParquetSplit, RowGroup, read_row_group
from prerank.schema import STAGES, Schema

#: RankTower Table 2: full-stage sampling and its ablations, as the stages each keeps.
STAGE_PRESETS: dict[str, tuple[str, ...]] = {
    "full": STAGES,
    "no_random": ("impression", "rank_candidate", "prerank_candidate"),
    "no_candidates": ("impression", "random"),
    "no_candidates_random": ("impression",),
}


def resolve_stages(stages: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """A preset name of :data:`STAGE_PRESETS` or a sequence of stage names -> the stages to keep."""
    if stages is None:
        return None
    if isinstance(stages, str):
        if stages in STAGE_PRESETS:
            return STAGE_PRESETS[stages]
        stages = [s.strip() for s in stages.split(",")]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(
            f"stages must be a preset {sorted(STAGE_PRESETS)} or names from {STAGES}, got {list(stages)!r}"
        )
    return tuple(s for s in STAGES if s in stages)


def rank_within(groups: np.ndarray) -> np.ndarray:
    """Position of each element inside its run of equal consecutive ``groups`` values (0, 1, ...)."""
    n = len(groups)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.ones(n, dtype=bool)
    new[1:] = groups[1:] != groups[:-1]
    idx = np.arange(n)
    return idx - np.maximum.accumulate(np.where(new, idx, 0))


def ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (start, length)."""
    starts, lengths = starts.astype(np.int64), lengths.astype(np.int64)
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _zero_padding(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.reshape(mask.shape + (1,) * (t.dim() - mask.dim()))
    return torch.where(m, t, torch.zeros((), dtype=t.dtype))


def pad_requests(rows: Batch, index: torch.Tensor, mask: torch.Tensor) -> Batch:
    """Gather ``rows`` (a row batch) at ``index`` ``[R, N]`` into a request batch; zero where ``~mask``."""
    out = rows.select(index)
    for f in fields(out):
        v = getattr(out, f.name)
        if isinstance(v, torch.Tensor):
            setattr(out, f.name, _zero_padding(v, mask))
        elif isinstance(v, dict):
            setattr(out, f.name, {k: _zero_padding(t, mask) for k, t in v.items()})
    out.mask = mask
    return out


class RequestStream(IterableDataset):
    """An iterable over request batches of one split (see the module docstring).

    Args:
        split: the split to read; it needs a ``request_id`` column.
        requests_per_batch: ``R``, requests per batch.
        shuffle: permute row groups per epoch and requests inside the buffer.
        buffer_requests: requests held for shuffling (bounds memory).
        max_list_len: cap on a request's list; a longer list keeps its stage mix (see :meth:`_subsample`).
        stage_mix: ``{tier: weight}`` over :data:`LIST_TIERS` for capped lists (tiers left out are dropped);
            None keeps each list's own proportions.
        stages: stages to keep (a :data:`STAGE_PRESETS` name or stage names); needs a ``stage`` column.
        drop_last: drop a final batch with fewer than ``R`` requests.
    """

    def __init__(
        self,
        split: ParquetSplit,
        requests_per_batch: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        buffer_requests: int = 4096,
        max_list_len: int | None = None,
        stages: str | Sequence[str] | None = None,
        stage_mix: dict[str, float] | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if requests_per_batch < 1:
            raise ValueError(f"requests_per_batch must be >= 1, got {requests_per_batch}")
        if max_list_len is not None and max_list_len < 1:
            raise ValueError(f"max_list_len must be >= 1 or None, got {max_list_len}")
        columns = set(pq.read_schema(split.files[0]).names)
        if "request_id" not in columns:
            raise DataError(f"split {split.split!r} under {split.root} has no 'request_id' column to group requests by")
        keep = resolve_stages(stages)
        if keep is not None and "stage" not in columns:
            raise DataError(f"stages={list(keep)} needs a 'stage' column; {split.root} is not a cascade dataset")
        self.split = split
        self.requests_per_batch = requests_per_batch
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_requests = max(buffer_requests, requests_per_batch)
        self.max_list_len = max_list_len
        self.stage_mix = resolve_stage_mix(stage_mix)
        self.stage_codes = None if keep is None else torch.tensor([STAGES.index(s) for s in keep])
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._first, self._last, self.num_requests = self._scan_request_ids()

    def _scan_request_ids(self) -> tuple[np.ndarray, np.ndarray, int]:
        """First and last request id of every row group, and the number of requests in the split."""
        first, last, runs = [], [], 0
        for g in self.split.row_groups:
            rid = read_row_group(g.path, g.index, ["request_id"]).column(0).to_numpy()
            first.append(rid[0])
            last.append(rid[-1])
            runs += 1 + int(np.count_nonzero(rid[1:] != rid[:-1]))
        first_a, last_a = np.asarray(first, dtype=np.int64), np.asarray(last, dtype=np.int64)
        continued = int(np.count_nonzero(first_a[1:] == last_a[:-1]))
        return first_a, last_a, runs - continued

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch; an upper bound when a stage filter empties some requests."""
        n = self.num_requests / self.world_size
        return int(n // self.requests_per_batch) if self.drop_last else math.ceil(n / self.requests_per_batch)

    def _shard(self) -> tuple[list[int], int]:
        order = np.arange(len(self.split.row_groups))
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(order)
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        shard, n_shards = self.rank * n_workers + worker, self.world_size * n_workers
        return [int(i) for i in order[shard::n_shards]], shard

    def _read(self, i: int, cache: dict[int, pa.Table]) -> pa.Table:
        if i not in cache:
            cache.clear()  # one group of look-ahead is enough when groups are read in order
            g: RowGroup = self.split.row_groups[i]
            cache[i] = self.split.read_table(g)
        return cache[i]

    def _owned(self, i: int, cache: dict[int, pa.Table]) -> pa.Table | None:
        """Rows of the requests that start in row group ``i``, including tails in later groups."""
        t = self._read(i, cache)
        rid = t.column("request_id").to_numpy()
        start = 0
        if i > 0 and self._first[i] == self._last[i - 1]:
            start = int(np.argmax(rid != rid[0])) if (rid != rid[0]).any() else len(rid)
        if start == len(rid):
            return None
        parts = [t.slice(start)]
        j = i + 1
        while j < len(self.split.row_groups) and self._first[j] == self._last[i]:
            nxt = self._read(j, cache)
            nrid = nxt.column("request_id").to_numpy()
            n = int(np.argmax(nrid != self._last[i])) if (nrid != self._last[i]).any() else len(nrid)
            parts.append(nxt.slice(0, n))
            if n < len(nrid):
                break
            j += 1
        return pa.concat_tables(parts)

    def _rows(self, i: int, cache: dict[int, pa.Table]) -> Batch | None:
        """The owned rows of group ``i`` as a validated row batch, stage-filtered, with contiguity checked."""
        table = self._owned(i, cache)
        if table is None:
            return None
        g = self.split.row_groups[i]
        rows = self.split.to_batch(table, where=f"{g.path} (row group {g.index})")
        rid = rows.request_id.numpy()
        runs = 1 + int(np.count_nonzero(rid[1:] != rid[:-1]))
        if runs != len(np.unique(rid)):
            raise DataError(
                f"{g.path} (row group {g.index}): rows of one request are not contiguous; request-level loading "
                "needs rows grouped by request_id (as `prerank cascade build` writes them)"
            )
        if self.stage_codes is not None:
            rows = rows.select(torch.isin(rows.stage, self.stage_codes))
        return rows if len(rows) else None

    def __iter__(self) -> Iterator[Batch]:
        groups, shard = self._shard()
        rng = np.random.default_rng((self.seed, self.epoch, shard))
        cache: dict[int, pa.Table] = {}
        buffer: list[Batch] = []
        buffered = 0
        for i in groups:
            rows = self._rows(i, cache)
            if rows is None:
                continue
            buffer.append(rows)
            buffered += _count_requests(rows)
            if buffered >= (self.buffer_requests if self.shuffle else self.requests_per_batch):
                rest = yield from self._emit(Batch.concat(buffer), rng, final=False)
                buffer, buffered = ([rest], _count_requests(rest)) if rest is not None else ([], 0)
        if buffer:
            yield from self._emit(Batch.concat(buffer), rng, final=True)

    def _emit(self, rows: Batch, rng: np.random.Generator, *, final: bool) -> Iterator[Batch]:
        """Yield full batches of the buffered requests; return the leftover rows (or None)."""
        rid = rows.request_id.numpy()
        new = np.ones(len(rid), dtype=bool)
        new[1:] = rid[1:] != rid[:-1]
        starts = np.flatnonzero(new)
        lengths = np.diff(np.append(starts, len(rid)))
        order = rng.permutation(len(starts)) if self.shuffle else np.arange(len(starts))
        R = self.requests_per_batch
        full = len(order) - len(order) % R
        for b in range(0, full, R):
            yield self._batch(rows, starts[order[b : b + R]], lengths[order[b : b + R]], rng)
        rest = order[full:]
        if not len(rest):
            return None
        if final:
            if not self.drop_last:
                yield self._batch(rows, starts[rest], lengths[rest], rng)
            return None
        rest = np.sort(rest)
        return rows.select(torch.from_numpy(ragged_arange(starts[rest], lengths[rest])))

    def _batch(self, rows: Batch, starts: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> Batch:
        """Pad the requests at ``starts`` (with ``lengths``) of ``rows`` into an ``[R, N]`` batch."""
        req = np.repeat(np.arange(len(starts)), lengths)
        idx = ragged_arange(starts, lengths)
        if self.max_list_len is not None and lengths.max() > self.max_list_len:
            req, idx = self._subsample(rows, req, idx, rng)
        col = rank_within(req)
        n_cols = int(col.max()) + 1
        index = torch.zeros(len(starts), n_cols, dtype=torch.long)
        mask = torch.zeros(len(starts), n_cols, dtype=torch.bool)
        index[req, col] = torch.from_numpy(idx)
        mask[req, col] = True
        return pad_requests(rows, index, mask)

    def _subsample(
        self, rows: Batch, req: np.ndarray, idx: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keep at most ``max_list_len`` rows per request, with the list's stage mix (:func:`list_quotas`).

        Each row falls in one of :data:`LIST_TIERS` (clicked and unclicked impressions, then the unexposed
        stages); each tier gets the slots :func:`list_quotas` gives it, filled by a uniform random subset of
        the tier's rows. Kept rows stay in their original order.
        """
        tier = row_tiers(rows, idx)
        n_req, n_tiers = int(req.max()) + 1, len(LIST_TIERS)
        counts = np.bincount(req * n_tiers + tier, minlength=n_req * n_tiers).reshape(n_req, n_tiers)
        quota = list_quotas(counts, self.max_list_len, self.stage_mix)
        order = np.lexsort((rng.random(len(idx)), tier, req))
        group = req[order] * n_tiers + tier[order]
        keep = np.sort(order[rank_within(group) < quota.reshape(-1)[group]])
        return req[keep], idx[keep]


#: What a list is made of: impressions split by their label, then the unexposed stages of the cascade.
LIST_TIERS: tuple[str, ...] = ("clicked", "unclicked", *STAGES[1:])


def row_tiers(rows: Batch, idx: np.ndarray) -> np.ndarray:
    """Index into :data:`LIST_TIERS` of each row ``idx`` of ``rows`` (a graded label > 0 counts as clicked)."""
    stage = rows.stage.numpy()[idx].astype(np.int64) if rows.stage is not None else np.zeros(len(idx), np.int64)
    clicked = rows.label.numpy()[idx] > 0 if rows.label is not None else np.zeros(len(idx), dtype=bool)
    return np.where(stage == 0, np.where(clicked, 0, 1), stage + 1)


#: Named stage mixes, so a mix can be a grid value (``compare --grid stage_mix=own,even``): ``own`` keeps each
#: list's own proportions (the same as None), ``even`` gives every tier the same share of the cap.
STAGE_MIXES: dict[str, dict[str, float] | None] = {"own": None, "even": dict.fromkeys(LIST_TIERS, 1.0)}


def resolve_stage_mix(mix: dict[str, float] | str | None) -> np.ndarray | None:
    """``{tier: weight}`` or a :data:`STAGE_MIXES` name -> weights over :data:`LIST_TIERS` (a tier left out
    weighs 0); None (and ``own``) stays None."""
    if isinstance(mix, str):
        if mix not in STAGE_MIXES:
            raise ValueError(f"stage_mix {mix!r} is not a named mix ({sorted(STAGE_MIXES)}) nor tier=weight pairs")
        mix = STAGE_MIXES[mix]
    if mix is None:
        return None
    unknown = sorted(set(mix) - set(LIST_TIERS))
    if unknown:
        raise ValueError(f"stage_mix has unknown tiers {unknown}; the tiers are {list(LIST_TIERS)}")
    weights = np.array([float(mix.get(t, 0.0)) for t in LIST_TIERS])
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"stage_mix weights must be finite, >= 0 and not all 0, got {mix}")
    return weights


def list_quotas(counts: np.ndarray, cap: int, weights: np.ndarray | None = None) -> np.ndarray:
    """How many rows of each tier a capped list keeps: ``counts`` ``[R, T]`` -> quotas ``[R, T]``.

    A list of at most ``cap`` rows keeps everything. A longer one first keeps one row of every tier it
    has (in tier order while the cap allows, so a clicked impression is never dropped), then shares the
    rest of the cap between its tiers in proportion to ``weights`` (``[T]``; None: to the list's own
    counts, so the cap keeps the list's stage mix). A tier of weight 0 keeps nothing. Each list keeps
    exactly ``min(cap, rows of its weighted tiers)`` rows.
    """
    counts = counts.astype(np.int64)
    weight = counts.astype(np.float64) if weights is None else np.broadcast_to(np.asarray(weights, float), counts.shape)
    eligible = np.where(weight > 0, counts, 0)
    short = eligible.sum(1) <= cap
    first = (eligible > 0) & (np.cumsum(eligible > 0, axis=1) <= cap) & ~short[:, None]
    rest = _water_fill(eligible - first, cap - first.sum(1), np.where(eligible - first > 0, weight, 0.0))
    return np.where(short[:, None], eligible, first + rest)


def _water_fill(counts: np.ndarray, budget: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Share ``budget[r]`` slots over row ``r``'s tiers in proportion to ``weight``, at most ``counts`` each.

    A tier whose share exceeds its rows keeps them all and its spare slots go to the others in the same
    proportions; fractional shares are rounded by largest remainder.
    """
    quota = np.zeros_like(counts)
    open_ = weight > 0
    while True:
        free = budget[:, None] - np.where(open_, 0, quota).sum(1, keepdims=True)
        w = weight * open_
        share = free * w / np.maximum(w.sum(1, keepdims=True), 1e-300)
        saturated = open_ & (share >= counts)
        if not saturated.any():
            break
        quota = np.where(saturated, counts, quota)
        open_ &= ~saturated
    base = np.floor(share).astype(np.int64)
    quota = np.where(open_, base, quota)
    left = budget - quota.sum(1)
    rank = np.argsort(np.argsort(-np.where(open_, share - base, -1.0), axis=1, kind="stable"), axis=1)
    return quota + (open_ & (rank < left[:, None]))


def _count_requests(rows: Batch) -> int:
    rid = rows.request_id.numpy()
    return 1 + int(np.count_nonzero(rid[1:] != rid[:-1])) if len(rid) else 0


def make_request_loader(
    root: str | Path,
    split: str,
    requests_per_batch: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    max_list_len: int | None = None,
    stages: str | Sequence[str] | None = None,
    stage_mix: dict[str, float] | None = None,
    num_workers: int = 0,
    schema: Schema | None = None,
    buffer_requests: int = 4096,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader of request batches ``[R, N, ...]`` with ``mask`` ``[R, N]`` for ``root/split``."""
    stream = RequestStream(
        ParquetSplit(root, split, schema),
        requests_per_batch,
        shuffle=shuffle,
        seed=seed,
        buffer_requests=buffer_requests,
        max_list_len=max_list_len,
        stages=stages,
        stage_mix=stage_mix,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False, collate_fn=_identity)


def _identity(b: Batch) -> Batch:
    return b


__all__ = [
    "LIST_TIERS",
    "STAGE_MIXES",
    "STAGE_PRESETS",
    "RequestStream",
    "make_request_loader",
    "pad_requests",
    "ragged_arange",
    "rank_within",
    "list_quotas",
    "resolve_stage_mix",
    "resolve_stages",
    "row_tiers",
]
