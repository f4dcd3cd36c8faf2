"""Serving efficiency: per-request latency with the item cache vs the full forward, against a FLOP bound.

One request = one user and N candidate items (DESIGN.md "Definitions": latency). For every model,
candidate count N and thread count it measures, in process and under :func:`torch.inference_mode`:

- ``cached``: what the server runs per request (:meth:`~prerank.serve.scorer.Scorer.logits`, the model's
  :meth:`~prerank.models.base.PreRanker.bind`), ``score_cached(encode_user(user), item cache, rows, pair)``
  (``score`` of the gathered item states, or a model's fused native kernel, :mod:`prerank.kernels`; IntTower's
  and RankTower's whole request, and FIT's user side, in one native call), on already-validated tensors;
- ``scorer``: :meth:`~prerank.serve.scorer.Scorer.score` from plain Python lists, i.e. ``cached`` plus
  input validation and conversion (what an HTTP request adds before the network);
- ``full``: ``model(batch)`` on N rows holding the user's features repeated and each candidate's raw
  item features (the batch is built before the clock starts, so the full path is not charged for it).

User and cross features come from the data's rows, candidates are drawn from the item catalogue (with
replacement when N exceeds it). The FLOP bound is the counted FLOPs of ``score`` per candidate
(:func:`prerank.bench.cost.score_cost`) x N divided by this machine's single-thread fp32 matmul rate
(:func:`matmul_gflops`), measured right before and right after each record's ``cached`` timing (the higher of
the two), so that the bound and the latency it is compared with see the same phase of a shared machine, whose
speed drifts by up to 2x within minutes. The latency target is p50 within 3x of that bound, or under 0.5 ms where
the bound is tiny.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prerank.bench.cost import score_cost, state_bytes_per_row
from prerank.data.batch import Batch
from prerank.data.parquet import BatchStream, ParquetSplit
from prerank.io import atomic_write_text
from prerank.kernels import native
from prerank.models.base import PreRanker
from prerank.models.registry import build_model
from prerank.schema import Schema
from prerank.serve.export import ItemCache, build_item_cache, load_artifact
from prerank.serve.scorer import Scorer

TARGET_FACTOR = 3.0
TARGET_FLOOR_MS = 0.5


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        candidates: candidate counts N per request.
        threads: torch intra-op thread counts.
        requests: timed requests per (N, threads) and path.
        warmup: untimed requests before each timing.
        distinct: distinct requests (user rows and candidate draws) cycled through.
        seed: seeds candidate draws and the initialisation of untrained models.
    """

    candidates: tuple[int, ...] = (100, 1000, 5000)
    threads: tuple[int, ...] = (1, 2)
    requests: int = 200
    warmup: int = 20
    distinct: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.candidates or min(self.candidates) < 1:
            raise ValueError(f"candidates must be a non-empty list of counts >= 1, got {self.candidates}")
        if not self.threads or min(self.threads) < 1:
            raise ValueError(f"threads must be a non-empty list of counts >= 1, got {self.threads}")
        if self.requests < 1 or self.warmup < 0 or self.distinct < 1:
            raise ValueError("requests and distinct must be >= 1 and warmup >= 0")


@dataclass(frozen=True)
class BenchTarget:
    """A model with its item cache; ``source`` says where it came from (an artifact or random init)."""

    name: str
    model: PreRanker
    cache: ItemCache
    source: str


@dataclass(frozen=True)
class RequestSample:
    """One JSON-able request: a user's features, candidate item ids and per-candidate cross features."""

    user: dict[str, Any]
    candidates: list[int]
    cross: dict[str, list[Any]]

    def payload(self) -> dict[str, Any]:
        """The ``POST /score`` body."""
        return {"user": self.user, "candidates": self.candidates, "cross": self.cross}


# ----------------------------------------------------------------------------------- inputs


def read_rows(root: str | Path, split: str, max_rows: int, schema: Schema | None = None) -> Batch:
    """The first ``max_rows`` rows of ``root/split`` (``items`` for the catalogue) as one batch."""
    stream = BatchStream(ParquetSplit(root, split, schema), min(max_rows, 65_536), buffer_rows=min(max_rows, 65_536))
    parts, n = [], 0
    for b in stream:
        parts.append(b)
        n += len(b)
        if n >= max_rows:
            break
    return Batch.concat(parts).select(slice(0, max_rows))


def request_rows(root: str | Path, max_rows: int = 4096, schema: Schema | None = None) -> Batch:
    """Rows to take user and cross features from: the test split, else valid, else train."""
    for split in ("test", "valid", "train"):
        if any((Path(root) / split).glob("*.parquet")):
            return read_rows(root, split, max_rows, schema)
    raise FileNotFoundError(f"{root} has no test, valid or train split to take request features from")


def _value(t: torch.Tensor, kind: str) -> Any:
    if kind == "dense":
        return float(t)
    if kind == "sequence":
        return [int(v) for v in t if v > 0]
    return int(t)


def sample_requests(
    rows: Batch, schema: Schema, item_ids: np.ndarray, n_requests: int, n_candidates: int, seed: int = 0
) -> list[RequestSample]:
    """``n_requests`` requests: user features of random ``rows``, ``n_candidates`` ids from ``item_ids``.

    Cross features are taken from random rows of ``rows`` (realistic values, though not of that pair).
    """
    if len(item_ids) == 0:
        raise ValueError("no item ids to draw candidates from")
    rng = np.random.default_rng(seed)
    user_side = schema.tower("user", "context")
    cross = schema.tower("cross")
    out = []
    for _ in range(n_requests):
        r = int(rng.integers(len(rows)))
        user = {f.name: _value(rows.features[f.name][r], f.kind) for f in user_side}
        ids = rng.choice(item_ids, n_candidates, replace=n_candidates > len(item_ids))
        pick = rng.integers(len(rows), size=n_candidates)
        pair = {f.name: [_value(v, f.kind) for v in rows.features[f.name][pick]] for f in cross}
        out.append(RequestSample(user=user, candidates=[int(i) for i in ids], cross=pair))
    return out


def _full_batch(scorer: Scorer, sample: RequestSample, catalogue: Batch, position: np.ndarray) -> Batch:
    """N rows: the user's features repeated, each candidate's raw item features, the cross features."""
    n = len(sample.candidates)
    user = scorer.user_batch(sample.user).features
    items = catalogue.select(torch.from_numpy(position[np.asarray(sample.candidates)]))
    pair = scorer.pair_batch(sample.cross, n)
    feats = {k: v.expand(n, *v.shape[1:]).clone() for k, v in user.items()}
    feats.update(items.features)
    if pair is not None:
        feats.update(pair.features)
    return Batch(features=feats)


# ----------------------------------------------------------------------------------- timing


def matmul_gflops(size: int = 512, repeats: int = 20) -> float:
    """Single-thread fp32 ``torch.mm`` rate of this machine, GFLOP/s (2 size^3 FLOPs per product).

    The fastest of ``repeats`` products: the rate the machine attains, so the FLOP bound built on it is
    a lower bound on time even when other processes slow some repeats down.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
        with torch.inference_mode():
            for _ in range(3):
                torch.mm(a, b)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.mm(a, b)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2 * size**3 / min(times) / 1e9


def time_calls(
    fn: Callable[[Any], object], inputs: list[Any], requests: int, warmup: int
) -> tuple[np.ndarray, np.ndarray]:
    """Wall and process-CPU milliseconds of ``requests`` calls of ``fn`` cycling over ``inputs``, after warm-up.

    CPU time (all threads of the process) is less disturbed than wall time when other processes share the
    cores; wall time is what a request waits.
    """
    with torch.inference_mode():
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
        wall, cpu = np.empty(requests), np.empty(requests)
        for i in range(requests):
            x = inputs[i % len(inputs)]
            c0, t0 = time.process_time(), time.perf_counter()
            fn(x)
            wall[i], cpu[i] = time.perf_counter() - t0, time.process_time() - c0
    return wall * 1e3, cpu * 1e3


def machine_info(gflops: float) -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "matmul_gflops_1thread": round(gflops, 2),
        "native_kernels": native.status(),
    }


# ----------------------------------------------------------------------------------- targets


def target_from_model(name: str, data_dir: str | Path, seed: int = 0, cache_dtype: str = "float32") -> BenchTarget:
    """An untrained (randomly initialised) registry model on the data's schema, with its item cache (float states
    stored as ``cache_dtype``, see :func:`prerank.serve.export.build_item_cache`)."""
    torch.manual_seed(seed)
    model = build_model(name, Schema.load(data_dir)).eval()
    cache = build_item_cache(model, data_dir, cache_dtype=cache_dtype)
    return BenchTarget(name=name, model=model, cache=cache, source="random init")


def target_from_artifact(path: str | Path, data_dir: str | Path) -> BenchTarget:
    """A verified artifact; its schema must be the data's (the requests come from the data)."""
    art = load_artifact(path, expected_schema=Schema.load(data_dir))
    return BenchTarget(name=art.name, model=art.model, cache=art.cache, source=str(path))


def bench_target(
    target: BenchTarget, data_dir: str | Path, config: BenchConfig, max_items: int = 200_000
) -> list[dict[str, Any]]:
    """Records for one model: every (N, threads) of ``config``."""
    model, cache = target.model.eval(), target.cache
    schema = model.schema
    catalogue = read_rows(data_dir, "items", max_items, schema)
    cat_ids = catalogue.features[cache.id_feature].numpy()
    cached_ids = cat_ids[cache.rows(torch.from_numpy(cat_ids)).numpy() != 0]
    if cached_ids.size == 0:
        raise ValueError(f"none of the catalogue items of {data_dir} is in the item cache of {target.name}")
    position = np.zeros(schema.vocab(cache.id_feature), dtype=np.int64)
    position[cat_ids] = np.arange(len(cat_ids))
    rows = request_rows(data_dir, schema=schema)
    cache_bytes = state_bytes_per_row(cache.states)
    records = []
    for n in config.candidates:
        samples = sample_requests(rows, schema, cached_ids, config.distinct, n, seed=config.seed + n)
        probe = Scorer(model, cache, max_candidates=n)
        full = [_full_batch(probe, s, catalogue, position) for s in samples]
        cached = [
            (probe.user_batch(s.user), cache.rows(torch.tensor(s.candidates)), probe.pair_batch(s.cross, n))
            for s in samples
        ]
        flops = score_cost(model, full[0])["score_flops_per_candidate"]
        for threads in config.threads:
            scorer = Scorer(model, cache, threads=threads, max_candidates=n)
            gflops = matmul_gflops()
            t_cached, cpu_cached = time_calls(lambda x, s=scorer: s.logits(*x), cached, config.requests, config.warmup)
            gflops = max(gflops, matmul_gflops())
            bound_ms = flops * n / (gflops * 1e9) * 1e3
            t_scorer, _ = time_calls(
                lambda x, s=scorer: s.score(x.user, x.candidates, cross=x.cross),
                samples,
                config.requests,
                config.warmup,
            )
            t_full, cpu_full = time_calls(model, full, config.requests, config.warmup)
            p50_cached, p50_full = float(np.percentile(t_cached, 50)), float(np.percentile(t_full, 50))
            target_ms = max(TARGET_FACTOR * bound_ms, TARGET_FLOOR_MS)
            records.append(
                {
                    "model": target.name,
                    "cache_dtype": cache.cache_dtype,
                    "source": target.source,
                    "candidates": n,
                    "threads": threads,
                    "requests": config.requests,
                    "p50_ms_cached": p50_cached,
                    "p99_ms_cached": float(np.percentile(t_cached, 99)),
                    "p50_cpu_ms_cached": float(np.percentile(cpu_cached, 50)),
                    "p50_ms_scorer": float(np.percentile(t_scorer, 50)),
                    "p99_ms_scorer": float(np.percentile(t_scorer, 99)),
                    "p50_ms_full": p50_full,
                    "p99_ms_full": float(np.percentile(t_full, 99)),
                    "p50_cpu_ms_full": float(np.percentile(cpu_full, 50)),
                    "candidates_per_s": n / p50_cached * 1e3,
                    "speedup_cached_vs_full": p50_full / p50_cached,
                    "flops_per_candidate": flops,
                    "flop_bound_ms": bound_ms,
                    "matmul_gflops_1thread": gflops,
                    "latency_target_ms": target_ms,
                    "latency_target_met": p50_cached <= target_ms,
                    "item_cache_bytes_per_item": cache_bytes,
                }
            )
    return records


def run_bench(targets: list[BenchTarget], data_dir: str | Path, config: BenchConfig = BenchConfig()) -> list[dict]:
    """Bench every target; each record carries the machine info (with the matmul rate at the start of the run) and
    its own matmul rate (around its timing, which its FLOP bound uses)."""
    before = torch.get_num_threads()
    try:
        machine = machine_info(matmul_gflops())
        records = []
        for target in targets:
            records += [{**r, "machine": machine} for r in bench_target(target, data_dir, config)]
    finally:
        torch.set_num_threads(before)
    return records


def profile_score(target: BenchTarget, data_dir: str | Path, n: int, repeats: int = 5, top: int = 8) -> str:
    """Where one request of ``n`` candidates spends its time on 1 thread.

    Returns the median milliseconds of ``encode_user``, the cache gather, ``score`` and ``score_cached`` (what
    the scorer runs: gather + ``score``, or a fused native kernel), then torch.profiler's table of the ``top``
    operators of ``score_cached`` by self CPU time, grouped by input shape, so a model that
    misses its FLOP bound shows which operator (and which shapes) to fix.
    """
    from torch.profiler import ProfilerActivity, profile

    model, cache = target.model.eval(), target.cache
    sample = sample_requests(request_rows(data_dir, schema=model.schema), model.schema, cache.ids().numpy(), 1, n)[0]
    before = torch.get_num_threads()
    scorer = Scorer(model, cache, threads=1, max_candidates=n)
    user_batch, rows = scorer.user_batch(sample.user), cache.rows(torch.tensor(sample.candidates))
    pair = scorer.pair_batch(sample.cross, n)
    try:
        with torch.inference_mode():
            user, items = model.encode_user(user_batch), cache.gather(rows)
            steps = {
                "encode_user": lambda _: model.encode_user(user_batch),
                "gather": lambda _: cache.gather(rows),
                "score": lambda _: model.score(user, items, pair),
                "score_cached": lambda _: model.score_cached(user, cache.states, rows, pair),
            }
            split = {k: float(np.median(time_calls(fn, [None], repeats * 4, 2)[0])) for k, fn in steps.items()}
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(repeats):
                    model.score_cached(user, cache.states, rows, pair)
    finally:
        torch.set_num_threads(before)
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=32, max_shapes_column_width=64
    )
    times = ", ".join(f"{k} {v:.3f} ms" for k, v in split.items())
    return f"{target.name}, one request of N={n} on 1 thread: {times}\nscore_cached, {repeats} calls:\n{table}"


# ----------------------------------------------------------------------------------- reports


COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", "{}"),
    ("cache", "cache_dtype", "{}"),
    ("N", "candidates", "{}"),
    ("threads", "threads", "{}"),
    ("p50 cached ms", "p50_ms_cached", "{:.3f}"),
    ("p99 cached ms", "p99_ms_cached", "{:.3f}"),
    ("p50 cached CPU ms", "p50_cpu_ms_cached", "{:.3f}"),
    ("p50 scorer ms", "p50_ms_scorer", "{:.3f}"),
    ("p50 full ms", "p50_ms_full", "{:.3f}"),
    ("p99 full ms", "p99_ms_full", "{:.3f}"),
    ("speedup", "speedup_cached_vs_full", "{:.1f}x"),
    ("cand/s", "candidates_per_s", "{:,.0f}"),
    ("FLOPs/cand", "flops_per_candidate", "{:,.0f}"),
    ("bound ms", "flop_bound_ms", "{:.4f}"),
    ("GFLOP/s", "matmul_gflops_1thread", "{:.0f}"),
    ("target met", "latency_target_met", "{}"),
    ("cache B/item", "item_cache_bytes_per_item", "{:,}"),
)


def table_rows(records: list[dict]) -> list[list[str]]:
    return [[fmt.format(r[key]) for _, key, fmt in COLUMNS] for r in records]


def markdown(records: list[dict]) -> str:
    """The records as a Markdown table, with the machine and the targets' definition."""
    machine = records[0]["machine"] if records else {}
    head = [c[0] for c in COLUMNS]
    lines = [
        "# prerank serving benchmark",
        "",
        f"Machine: {machine.get('cpu')} ({machine.get('cpu_count')} logical CPUs), torch {machine.get('torch')}, "
        f"single-thread fp32 matmul {machine.get('matmul_gflops_1thread')} GFLOP/s at the start of this run "
        "(each record's bound uses the rate measured around its own timing, its GFLOP/s column), "
        f"native kernels {machine.get('native_kernels')}.",
        "",
        "cached = the scorer's bound request: encode_user + score_cached (item-cache gather + score, or a fused "
        "native kernel), or one native call for the whole request (IntTower, RankTower) or the user side (FIT); "
        "scorer = cached + validation from Python lists; "
        "full = model(batch) of N rows. Latencies are per request (one user, N candidates); CPU ms is the "
        "process CPU time of a request (less disturbed by other load than wall time). "
        f"Target: p50 cached <= max({TARGET_FACTOR:g} x FLOP bound, {TARGET_FLOOR_MS} ms).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(records)]
    return "\n".join(lines) + "\n"


def write_report(records: list[dict], out_dir: str | Path) -> None:
    """``out_dir/bench.json`` (the records) and ``out_dir/bench.md`` (a table), each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(records, indent=2))
    atomic_write_text(out / "bench.md", markdown(records))
