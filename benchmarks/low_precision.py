"""Low-precision scoring on onnxruntime: test AUC/GAUC and per-request latency of float32, int8 and a bf16 item cache.

    .venv/bin/python benchmarks/low_precision.py --data DIR --checkpoint RUN/best.pt [--checkpoint ...]
        [--candidates 1000] [--requests 200] [--threads 1] [--work DIR] [--out FILE]

For every checkpoint it exports an ONNX artifact (float32 item cache) and adds the int8 user and score graphs to it
(:func:`prerank.serve.quantize.add_int8`), and exports a second artifact whose item cache is stored as bfloat16.
It then measures three ways of serving the same weights:

- ``float32``: the ``onnx`` runtime on the float32 cache (the reference);
- ``int8``: the ``onnx-int8`` runtime (int8 weight matrices in the user and score graphs) on the float32 cache;
- ``bf16 cache``: the ``onnx`` runtime on the bfloat16 cache (states rounded to bfloat16, read back as float32).

Accuracy: every row of the split is scored as the server scores it: the user graph once per request (rows grouped
by request id and user features), the candidates' cached item states, the score graph; AUC and GAUC
(:func:`prerank.train.trainer.evaluate_predictions`). Latency: requests of N catalogue candidates (user and cross
features of random rows of the split, candidates drawn from the catalogue), timed as the serving bench times its
``cached`` path (:meth:`prerank.serve.scorer.Scorer.logits` on validated tensors, ``threads`` intra-op threads).
The three variants are timed in interleaved rounds so that a shared machine's drift hits them alike; the table
reports the wall-clock p50 and the process-CPU p50 (less disturbed by other processes).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prerank.data.batch import Batch
from prerank.data.parquet import make_loader
from prerank.models.base import gather_rows
from prerank.serve.export import Artifact, export_model, load_artifact
from prerank.serve.quantize import add_int8
from prerank.serve.scorer import Scorer
from prerank.train.checkpoint import load_model
from prerank.train.trainer import evaluate_predictions

VARIANTS = (("float32", "f32", "onnx"), ("int8", "f32", "onnx-int8"), ("bf16 cache", "bf16", "onnx"))


def read_split(data: str, split: str, schema) -> Batch:
    return Batch.concat(list(make_loader(data, split, 65_536, schema=schema)))


def request_groups(batch: Batch, user_features: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Row order that makes every request contiguous, and the start of each request in it (plus the end). A request
    is a request id with one value of every user-side feature (split further where the features differ)."""
    cols = [batch.request_id.numpy().reshape(len(batch), -1)]
    for name in user_features:
        t = batch.features[name]
        t = t.view(torch.int32) if t.dtype == torch.float32 else t
        cols.append(t.reshape(len(batch), -1).numpy().astype(np.int64))
    _, code = np.unique(np.concatenate(cols, axis=1), axis=0, return_inverse=True)
    code = code.reshape(-1)
    order = np.argsort(code, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(code[order]) != 0])
    return order, np.r_[starts, len(order)]


def split_logits(art: Artifact, batch: Batch, order: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Logits of every row, each request scored as the server does (user graph once, cached items, score graph)."""
    rt, cache = art.runtime, art.cache
    sig = rt.signature
    rows = cache.rows(batch.features[cache.id_feature])
    out = np.empty(len(batch), dtype=np.float32)
    with torch.inference_mode():
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            idx = torch.from_numpy(order[a:b])
            user = rt.user([batch.features[n][idx[:1]] for n in sig.user_features])
            item = gather_rows(cache.states, rows[idx])
            cross = [batch.features[n][idx] for n in sig.cross_features]
            out[order[a:b]] = rt.score(user, [item[k] for k in sig.item_state], cross).numpy()
    return out


def sample_requests(batch: Batch, scorer: Scorer, n: int, count: int, seed: int = 0) -> list[tuple]:
    """``count`` requests (user batch of one row, candidate item ids ``[n]``, cross features ``[n]``)."""
    rng = np.random.default_rng(seed)
    ids = scorer.cache.ids().numpy()
    user_side = [f.name for f in scorer.schema.tower("user", "context")]
    cross = [f.name for f in scorer.schema.tower("cross")]
    out = []
    for _ in range(count):
        r = int(rng.integers(len(batch)))
        user = Batch(features={k: batch.features[k][r : r + 1].clone() for k in user_side})
        cand = torch.from_numpy(rng.choice(ids, n, replace=n > len(ids)))
        pick = torch.from_numpy(rng.integers(len(batch), size=n))
        pair = Batch(features={k: batch.features[k][pick].clone() for k in cross}) if cross else None
        out.append((user, cand, pair))
    return out


def time_interleaved(
    scorers: dict[str, Scorer], requests: list[tuple], total: int, warmup: int = 20, rounds: int = 10
) -> dict[str, tuple[float, float]]:
    """p50 wall and process-CPU ms per request of each scorer, timed in ``rounds`` interleaved rounds."""
    wall: dict[str, list[float]] = {k: [] for k in scorers}
    cpu: dict[str, list[float]] = {k: [] for k in scorers}
    prepared = {k: [(u, s.cache.rows(c), p) for u, c, p in requests] for k, s in scorers.items()}
    with torch.inference_mode():
        for k, s in scorers.items():
            for i in range(warmup):
                s.logits(*prepared[k][i % len(requests)])
        per_round = max(total // rounds, 1)
        for r in range(rounds):
            for k, s in scorers.items():
                for i in range(per_round):
                    x = prepared[k][(r * per_round + i) % len(requests)]
                    c0, t0 = time.process_time(), time.perf_counter()
                    s.logits(*x)
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
    return {k: (float(np.median(wall[k])) * 1e3, float(np.median(cpu[k])) * 1e3) for k in scorers}


def graph_bytes(art_dir: Path, runtime: str) -> int:
    names = ("user.int8.onnx", "score.int8.onnx") if runtime == "onnx-int8" else ("user.onnx", "score.onnx")
    return sum((art_dir / "graphs" / n).stat().st_size for n in names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint", action="append", required=True, help="a trained checkpoint (repeatable)")
    p.add_argument("--split", default="test")
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--requests", type=int, default=200, help="timed requests per variant")
    p.add_argument("--distinct", type=int, default=8, help="distinct requests cycled through")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="where the artifacts go (default: a temporary directory)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="low-precision-"))
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    lines = [
        f"| model | precision | test AUC | ΔAUC vs float32 | test GAUC | p50 ms (N={args.candidates}, "
        f"{args.threads} thread) | speed-up vs float32 | CPU p50 ms | user+score graph KiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for ckpt in args.checkpoint:
        name, model, _ = load_model(ckpt)
        model.eval()
        arts = {"f32": work / f"{name}-f32", "bf16": work / f"{name}-bf16"}
        export_model(name, model, args.data, arts["f32"], formats=("onnx",))
        report = add_int8(arts["f32"])
        export_model(name, model, args.data, arts["bf16"], formats=("onnx",), cache_dtype="bfloat16")
        notes.append(
            f"{name}: int8 weight matrices quantized: user graph {report['user'].quantized}, score graph "
            f"{report['score'].quantized}" + (" (no weights: copied as is)" if report["score"].quantized == 0 else "")
        )
        batch = read_split(args.data, args.split, model.schema)
        scorers, metrics, logits_of = {}, {}, {}
        for label, which, runtime in VARIANTS:
            art = load_artifact(arts[which], runtime=runtime, threads=args.threads)
            order, bounds = request_groups(batch, art.runtime.signature.user_features)
            logits = logits_of[label] = split_logits(art, batch, order, bounds)
            pred = {"logits": logits, "label": batch.label.numpy(), "request_id": batch.request_id.numpy()}
            metrics[label] = evaluate_predictions(pred)
            scorers[label] = Scorer(
                art.runtime, art.cache, art.schema, threads=args.threads, max_candidates=args.candidates
            )
        for label in ("int8", "bf16 cache"):
            diff = np.abs(logits_of[label] - logits_of["float32"])
            notes.append(
                f"{name} {label}: |logit - float32 logit| max {diff.max():.2e}, mean {diff.mean():.2e} "
                f"(float32 logits span {np.ptp(logits_of['float32']):.2f})"
            )
        test_json = Path(ckpt).parent / "test.json"
        if test_json.exists():
            t = json.loads(test_json.read_text()).get("test", {})
            notes.append(
                f"{name}: `prerank train`'s test AUC (eager full forward, raw item features) "
                f"{t.get('auc', float('nan')):.4f}, GAUC {t.get('gauc', float('nan')):.4f}"
            )
        requests = sample_requests(batch, scorers["float32"], args.candidates, args.distinct)
        times = time_interleaved(scorers, requests, args.requests)
        base_auc, base_ms = metrics["float32"]["auc"], times["float32"][0]
        for label, which, runtime in VARIANTS:
            m, (ms, cpu_ms) = metrics[label], times[label]
            kib = graph_bytes(arts[which], runtime) / 1024
            lines.append(
                f"| {name} | {label} | {m['auc']:.4f} | {m['auc'] - base_auc:+.5f} | {m['gauc']:.4f} | {ms:.3f} | "
                f"{base_ms / ms:.2f}x | {cpu_ms:.3f} | {kib:,.0f} |"
            )
        print("\n".join(lines[-3:]), flush=True)
    load_after = os.getloadavg()[0]
    notes.append(
        f"{os.cpu_count()} CPUs, 1-minute load average {load_before:.2f} at the start and {load_after:.2f} at the end "
        f"(other processes may share the machine); {time.perf_counter() - t_start:.0f} s in all; "
        f"{len(batch):,} {args.split} rows; onnxruntime {__import__('onnxruntime').__version__}"
    )
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print()
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
