"""Serving efficiency: per-request latency of every way prerank can run a request, side by side in one process.

One request = one user and N candidate items (DESIGN.md "Definitions": latency). Every model is benched from an
artifact (:mod:`prerank.serve.export`; a registry model at random init, or an artifact lacking a graph format, is
exported to a temporary directory first). For every candidate count N and thread count, on the same prepared
requests and under :func:`torch.inference_mode`, it times:

- ``full``:   ``model(batch)`` in PyTorch eager on N rows holding the user's features repeated and each
  candidate's raw item features (the batch is built before the clock starts);
- ``eager``:  the served request (:meth:`~prerank.serve.scorer.Scorer.logits`: user graph, item-cache gather,
  score graph) on :class:`~prerank.serve.runtime.EagerRuntime`, the model in PyTorch eager;
- ``torch``:  the same on :class:`~prerank.serve.runtime.TorchExportRuntime`, the torch.export programs;
- ``onnx``:   the same on :class:`~prerank.serve.runtime.OnnxRuntime` with that many intra-op threads;
- ``native``: the same on the optional C backend (:func:`prerank.serve.native.open_native`: IntTower and
  RankTower only; None for other models, or where there is no compiler);
- ``scorer``: :meth:`~prerank.serve.scorer.Scorer.score` from plain Python lists on the default runtime
  (:data:`~prerank.serve.runtime.DEFAULT_RUNTIME`), i.e. that runtime plus input validation and conversion (what an
  HTTP request adds before the network).

``threads`` sets torch's intra-op threads (every path), onnxruntime's session threads and the native runtime's
concurrent kernel calls. Before timing a setting, every runtime's logits of one request must equal eager's (rtol
:data:`RTOL`, atol :data:`ATOL`); the largest absolute differences are recorded. The paths are timed in turns of
blocks of consecutive requests, so that a shared machine's drift in speed hits all of them alike. User and cross
features come from the data's rows, candidates are drawn from the item catalogue (with replacement when N
exceeds it).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prerank.bench.cost import score_cost, state_bytes_per_row
from prerank.data.batch import Batch
from prerank.data.parquet import BatchStream, ParquetSplit
from prerank.io import atomic_write_text
from prerank.models.registry import build_model
from prerank.schema import Schema
from prerank.serve import native
from prerank.serve.export import Artifact, ItemCache, export_model, load_artifact
from prerank.serve.graphs import FORMATS, GRAPHS, SUFFIX
from prerank.serve.runtime import DEFAULT_RUNTIME, OnnxRuntime, Runtime, TorchExportRuntime
from prerank.serve.scorer import Scorer

PATHS = ("full", "eager", "torch", "onnx", "native", "scorer")  # every timed path, in report order
STANDARD = ("eager", "torch", "onnx")  # the runtimes that need no compiler
CHECKED = ("torch", "onnx", "native")  # runtimes whose logits must equal eager's
RTOL, ATOL = 1e-4, 1e-5


class RuntimeMismatch(ValueError):
    """A runtime's logits differ from eager's by more than :data:`RTOL` / :data:`ATOL`."""


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        candidates: candidate counts N per request.
        threads: thread counts (torch intra-op, onnxruntime session, native concurrent calls).
        requests: timed requests per (N, threads) and path.
        warmup: untimed requests per path before each timing.
        distinct: distinct requests (user rows and candidate draws) cycled through.
        seed: seeds candidate draws and the initialisation of untrained models.
    """

    candidates: tuple[int, ...] = (100, 1000, 10_000)
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
    """A model to bench: an artifact directory with torch and ONNX graphs; ``source`` says where it came from (an
    artifact path or random init)."""

    name: str
    artifact: Path
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


Call = tuple[Callable[[Any], object], list[Any]]


def time_paths(calls: dict[str, Call], requests: int, warmup: int, blocks: int = 4) -> dict[str, np.ndarray]:
    """Wall milliseconds of ``requests`` calls of each ``fn`` cycling over its ``inputs``, after ``warmup`` calls.

    The requests are split into ``blocks`` runs of consecutive calls; the paths take turns by block (the order
    rotating), so each path runs warm, yet drift of the machine's speed is spread over all of them.
    """
    names = list(calls)
    blocks = max(1, min(blocks, requests))
    edges = np.linspace(0, requests, blocks + 1).astype(int)
    out = {name: np.empty(requests) for name in names}
    with torch.inference_mode():
        for fn, inputs in calls.values():
            for i in range(warmup):
                fn(inputs[i % len(inputs)])
        for b in range(blocks):
            shift = b % len(names)
            for name in names[shift:] + names[:shift]:
                fn, inputs = calls[name]
                for i in range(edges[b], edges[b + 1]):
                    x = inputs[i % len(inputs)]
                    t0 = time.perf_counter()
                    fn(x)
                    out[name][i] = time.perf_counter() - t0
    return {name: t * 1e3 for name, t in out.items()}


def time_calls(fn: Callable[[Any], object], inputs: list[Any], requests: int, warmup: int) -> np.ndarray:
    """Wall milliseconds of ``requests`` calls of ``fn`` cycling over ``inputs``, after ``warmup`` calls."""
    return time_paths({"fn": (fn, inputs)}, requests, warmup, blocks=1)["fn"]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """The CPU, library versions and whether native kernels can be compiled here."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "native": native.status(),
    }


# ----------------------------------------------------------------------------------- targets


def _has_all_formats(manifest: dict[str, Any]) -> bool:
    graphs = manifest.get("graphs", {})
    return all(f"{g}{SUFFIX[fmt]}" in graphs for g in GRAPHS for fmt in FORMATS)


def target_from_model(
    name: str, data_dir: str | Path, workdir: str | Path, *, seed: int = 0, cache_dtype: str = "float32"
) -> BenchTarget:
    """An untrained (randomly initialised, seeded) registry model on the data's schema, exported with torch and ONNX
    graphs and an item cache of the data's catalogue (float states stored as ``cache_dtype``) under ``workdir``."""
    torch.manual_seed(seed)
    model = build_model(name, Schema.load(data_dir)).eval()
    out = Path(workdir) / f"{name}-{cache_dtype}"
    export_model(name, model, data_dir, out, cache_dtype=cache_dtype, source={"bench": "random init"})
    return BenchTarget(name=name, artifact=out, source="random init")


def target_from_artifact(path: str | Path, data_dir: str | Path, workdir: str | Path) -> BenchTarget:
    """A verified artifact; its schema must be the data's (the requests come from the data). One that lacks the
    torch or ONNX graphs is exported again, with both, under ``workdir`` (its cache then holds the data's
    catalogue)."""
    art = load_artifact(path, runtime="eager", expected_schema=Schema.load(data_dir))
    if _has_all_formats(art.manifest):
        return BenchTarget(name=art.name, artifact=Path(path), source=str(path))
    assert art.model is not None
    out = Path(workdir) / f"{art.name}-{Path(path).name}"
    export_model(art.name, art.model, data_dir, out, cache_dtype=art.cache.cache_dtype, source={"artifact": str(path)})
    return BenchTarget(name=art.name, artifact=out, source=f"{path} (re-exported with {', '.join(FORMATS)} graphs)")


# ----------------------------------------------------------------------------------- benching


def _open_native(art: Artifact, threads: int) -> tuple[Runtime | None, str]:
    """The native runtime of the artifact's model, bound to its cache, or ``(None, why not)``."""
    assert art.model is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt = native.open_native(art.model, art.runtime.signature, threads=threads)
        if rt is not None and rt.bind(art.cache.states) is None:
            rt = None
    if rt is not None:
        return rt, ""
    why = "; ".join(str(w.message) for w in caught) or f"no native runtime for {type(art.model).__name__}"
    return None, why


def _check(scorers: dict[str, Scorer], request: tuple, full_logits: torch.Tensor, where: str) -> dict[str, float]:
    """Max absolute difference of each runtime's logits (and the full forward's) from eager's on one request;
    :class:`RuntimeMismatch` where a runtime's exceed rtol :data:`RTOL` / atol :data:`ATOL`."""
    ref = scorers["eager"].logits(*request)
    diffs: dict[str, float] = {}
    for name in CHECKED:
        if name not in scorers:
            continue
        got = scorers[name].logits(*request)
        diffs[name] = float((got - ref).abs().max())
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=RTOL, atol=ATOL):
            raise RuntimeMismatch(
                f"{where}: the {name} runtime's logits differ from eager's by up to {diffs[name]:.3g} "
                f"(allowed: rtol {RTOL:g}, atol {ATOL:g})"
            )
    diffs["full"] = float((full_logits - ref).abs().max())
    return diffs


def _p(t: np.ndarray | None, q: float) -> float | None:
    return None if t is None else float(np.percentile(t, q))


@contextlib.contextmanager
def _no_progress() -> Iterator[Callable[[str], None]]:
    yield lambda _: None


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on stderr over ``total`` settings; yields ``advance(description)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("bench", total=total)

        def advance(description: str) -> None:
            bar.update(task, advance=1, description=description)

        yield advance


def cached_catalogue(
    data_dir: str | Path, cache: ItemCache, schema: Schema, name: str, max_items: int = 200_000
) -> tuple[Batch, np.ndarray, np.ndarray]:
    """The first ``max_items`` catalogue rows, their item ids, and those of them in the item cache (the candidates
    requests draw from); a ``ValueError`` naming ``name`` when the cache holds none of them."""
    catalogue = read_rows(data_dir, "items", max_items, schema)
    cat_ids = catalogue.features[cache.id_feature].numpy()
    cached = cat_ids[cache.rows(torch.from_numpy(cat_ids)).numpy() != 0]
    if cached.size == 0:
        raise ValueError(f"none of the catalogue items of {data_dir} is in the item cache of {name}")
    return catalogue, cat_ids, cached


def bench_target(
    target: BenchTarget,
    data_dir: str | Path,
    config: BenchConfig,
    *,
    advance: Callable[[str], None] = lambda _: None,
    max_items: int = 200_000,
) -> list[dict[str, Any]]:
    """Records for one target: every (N, threads) of ``config``; ``advance(description)`` after each setting."""
    art = load_artifact(target.artifact, runtime="eager", expected_schema=Schema.load(data_dir))
    model, cache, schema, sig = art.model, art.cache, art.schema, art.runtime.signature
    assert model is not None
    catalogue, cat_ids, cached_ids = cached_catalogue(data_dir, cache, schema, target.name, max_items)
    position = np.zeros(schema.vocab(cache.id_feature), dtype=np.int64)
    position[cat_ids] = np.arange(len(cat_ids))
    rows = request_rows(data_dir, schema=schema)
    cache_bytes = state_bytes_per_row(cache.states)
    graph_dir = Path(target.artifact) / "graphs"
    limit = max(config.candidates)
    torch_rt = TorchExportRuntime(graph_dir, sig)

    per_threads: dict[int, dict[str, Scorer]] = {}
    native_note = ""
    for threads in config.threads:
        opts: dict[str, Any] = {"threads": threads, "max_candidates": limit}
        native_rt, why = _open_native(art, threads)
        native_note = native_note or why
        runtimes: dict[str, Runtime | None] = {
            "eager": art.runtime,
            "torch": torch_rt,
            "onnx": OnnxRuntime(graph_dir, sig, threads=threads),
            "native": native_rt,
        }
        per_threads[threads] = {k: Scorer(rt, cache, schema, **opts) for k, rt in runtimes.items() if rt is not None}

    records = []
    for n in config.candidates:
        samples = sample_requests(rows, schema, cached_ids, config.distinct, n, seed=config.seed + n)
        probe = per_threads[config.threads[0]]["eager"]
        full = [_full_batch(probe, s, catalogue, position) for s in samples]
        prepared = [
            (probe.user_batch(s.user), cache.rows(torch.tensor(s.candidates)), probe.pair_batch(s.cross, n))
            for s in samples
        ]
        flops = score_cost(model, full[0])["score_flops_per_candidate"]
        for threads in config.threads:
            scorers = per_threads[threads]
            torch.set_num_threads(threads)
            where = f"{target.name} at N={n} on {threads} thread{'s' if threads > 1 else ''}"
            with torch.inference_mode():
                diffs = _check(scorers, prepared[0], model(full[0]), where)
            calls: dict[str, Call] = {"full": (model, full)}
            for name in ("eager", "torch", "onnx", "native"):
                if name in scorers:
                    calls[name] = (lambda x, s=scorers[name]: s.logits(*x), prepared)
            default = scorers[DEFAULT_RUNTIME]
            calls["scorer"] = (lambda x, s=default: s.score(x.user, x.candidates, cross=x.cross), samples)
            times = time_paths(calls, config.requests, config.warmup)
            torch.set_num_threads(threads)  # the timed scorers set it too; keep it for what follows
            p50 = {path: _p(times.get(path), 50) for path in PATHS}
            best = min(STANDARD, key=lambda k: p50[k])  # type: ignore[arg-type,return-value]
            best_ms = p50[best]
            record: dict[str, Any] = {
                "model": target.name,
                "source": target.source,
                "cache_dtype": cache.cache_dtype,
                "candidates": n,
                "threads": threads,
                "requests": config.requests,
            }
            for path in PATHS:
                record[f"p50_ms_{path}"] = p50[path]
                record[f"p99_ms_{path}"] = _p(times.get(path), 99)
            record |= {
                "scorer_runtime": DEFAULT_RUNTIME,
                "best_standard": best,
                "best_standard_ms": best_ms,
                "native_speedup": None if p50["native"] is None else best_ms / p50["native"],  # type: ignore[operator]
                "native_note": native_note if p50["native"] is None else "",
                **{f"max_abs_diff_{k}": diffs.get(k) for k in (*CHECKED, "full")},
                "flops_per_candidate": flops,
                "item_cache_bytes_per_item": cache_bytes,
            }
            records.append(record)
            advance(f"{target.name} N={n} threads={threads}")
    return records


def run_bench(
    targets: list[BenchTarget], data_dir: str | Path, config: BenchConfig = BenchConfig(), *, progress: bool = False
) -> list[dict]:
    """Bench every target (:func:`bench_target`); each record carries the machine info. ``progress`` shows a rich
    progress bar on stderr over the (model, N, threads) settings. Restores torch's thread count."""
    before = torch.get_num_threads()
    machine = machine_info()
    total = len(targets) * len(config.candidates) * len(config.threads)
    records = []
    try:
        with _progress(total) if progress else _no_progress() as advance:
            for target in targets:
                got = bench_target(target, data_dir, config, advance=advance)
                records += [{**r, "machine": machine} for r in got]
    finally:
        torch.set_num_threads(before)
    return records


# ----------------------------------------------------------------------------------- reports


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


COLUMNS: tuple[tuple[str, Callable[[dict], str]], ...] = (
    ("model", lambda r: r["model"]),
    ("cache", lambda r: r["cache_dtype"]),
    ("N", lambda r: f"{r['candidates']:,}"),
    ("threads", lambda r: str(r["threads"])),
    ("full", lambda r: _ms(r["p50_ms_full"])),
    ("eager", lambda r: _ms(r["p50_ms_eager"])),
    ("torch", lambda r: _ms(r["p50_ms_torch"])),
    ("onnx", lambda r: _ms(r["p50_ms_onnx"])),
    ("native", lambda r: _ms(r["p50_ms_native"])),
    ("best standard", lambda r: f"{_ms(r['best_standard_ms'])} ({r['best_standard']})"),
    ("native speedup", lambda r: "-" if r["native_speedup"] is None else f"{r['native_speedup']:.1f}x"),
    ("scorer", lambda r: _ms(r["p50_ms_scorer"])),
    ("cache B/item", lambda r: f"{r['item_cache_bytes_per_item']:,}"),
    ("FLOPs/cand", lambda r: f"{r['flops_per_candidate']:,.0f}"),
)


def table_rows(records: list[dict]) -> list[list[str]]:
    """The records as table cells, one row each, in :data:`COLUMNS` order."""
    return [[cell(r) for _, cell in COLUMNS] for r in records]


def markdown(records: list[dict]) -> str:
    """The records as a Markdown table, with the machine and what each column measures."""
    m = records[0]["machine"] if records else {}
    head = [c[0] for c in COLUMNS]
    requests = sorted({r["requests"] for r in records})
    lines = [
        "# prerank serving benchmark",
        "",
        f"Machine: {m.get('cpu')} ({m.get('cpu_count')} logical CPUs), torch {m.get('torch')}, onnxruntime "
        f"{m.get('onnxruntime')}, native kernels {m.get('native')}. {', '.join(map(str, requests))} timed requests "
        "per cell.",
        "",
        "p50 wall ms per request (one user, N candidates; p99 in bench.json). full = model(batch) of N rows in "
        "PyTorch eager; eager / torch / onnx / native = the served request (user graph, item-cache gather, score "
        "graph) on PyTorch eager, the torch.export programs, onnxruntime, or the C kernels (IntTower and RankTower "
        "only; - where a model has none); best standard = the fastest of eager, torch and onnx; native speedup = "
        f"best standard / native; scorer = Scorer.score from Python lists on the {DEFAULT_RUNTIME} runtime "
        "(validation included). Every runtime's logits equal eager's within "
        f"rtol {RTOL:g} / atol {ATOL:g}, checked on one request of each cell.",
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


# ----------------------------------------------------------------------------------- one served model


def served_latency(
    name: str,
    model: torch.nn.Module,
    data_dir: str | Path,
    artifact: str | Path,
    *,
    candidates: int = 1000,
    threads: int = 1,
    requests: int = 50,
    warmup: int = 5,
    runtime: str = "onnx",
    seed: int = 0,
    rate: float | None = None,
) -> dict[str, Any]:
    """Export a trained ``model`` (registered as ``name``) to ``artifact`` with ONNX graphs only and time the served
    request on it: :meth:`Scorer.logits` (user graph, item-cache gather, score graph) for one user and ``candidates``
    items drawn from the catalogue, on ``runtime`` with ``threads`` threads, ``requests`` timed requests after
    ``warmup`` untimed ones (request parsing and validation excluded, as the ``onnx`` column of ``prerank bench``).
    Returns p50 / p99 ms and the item cache's bytes per item. Restores torch's thread count.

    ``rate`` (requests per second) also sends ``requests`` requests on a fixed schedule (request ``i`` at
    ``t0 + i / rate``, in this thread, so at most one in flight) and reports the process CPU time per request
    (``cpu_ms_per_request``, :func:`time.process_time` around each call): the cost of serving at that rate,
    which unlike latency does not fall when more threads share the work."""
    before = torch.get_num_threads()
    try:
        export_model(name, model, data_dir, artifact, formats=("onnx",), source={"latency": str(data_dir)})  # type: ignore[arg-type]
        scorer = Scorer.load(artifact, runtime=runtime, threads=threads, max_candidates=max(candidates, 1))
        schema, cache = scorer.schema, scorer.cache
        _, _, cached = cached_catalogue(data_dir, cache, schema, name)
        samples = sample_requests(request_rows(data_dir, 1024, schema), schema, cached, 8, candidates, seed=seed)
        prepared = [
            (scorer.user_batch(s.user), cache.rows(torch.tensor(s.candidates)), scorer.pair_batch(s.cross, candidates))
            for s in samples
        ]
        times = time_calls(lambda x: scorer.logits(*x), prepared, requests, warmup)
        paced = _paced_cpu(lambda x: scorer.logits(*x), prepared, requests, rate) if rate else {}
    finally:
        torch.set_num_threads(before)
    return paced | {
        "latency_p50_ms": float(np.percentile(times, 50)),
        "latency_p99_ms": float(np.percentile(times, 99)),
        "latency_candidates": candidates,
        "latency_threads": threads,
        "latency_runtime": runtime,
        "latency_requests": requests,
        "item_cache_bytes_per_item": float(state_bytes_per_row(cache.states)),
        "artifact": str(artifact),
    }


def _paced_cpu(fn: Callable[[Any], object], inputs: list[Any], requests: int, rate: float) -> dict[str, float]:
    """Call ``fn`` ``requests`` times at ``rate`` per second; process CPU ms per call and the rate achieved."""
    cpu = np.empty(requests)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(requests):
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            c0 = time.process_time()
            fn(inputs[i % len(inputs)])
            cpu[i] = time.process_time() - c0
    elapsed = time.perf_counter() - t0
    return {
        "cpu_ms_per_request": float(cpu.mean() * 1e3),
        "cpu_rate": rate,
        "cpu_rate_achieved": requests / elapsed if elapsed > 0 else float("nan"),
    }
