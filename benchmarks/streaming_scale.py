"""Streaming at scale: peak memory of one training epoch must not grow with the rows of the log.

Generates one synthetic log on disk (``prerank.data.synthetic.generate`` writes it block by block, never
holding it in memory) with the largest size's training rows plus fixed valid and test splits
(``--eval-rows`` each, so evaluation costs the same at every size), then, for each size, trains one epoch
of Two-Tower on the first ``size`` training rows (a view of the log's first Parquet parts, linked, not
copied) and scores valid and test. Every step runs in a fresh subprocess that reports its own peak RSS
(``ru_maxrss``), so each size's figure is its own. Prints rows/s and peak RSS per size and whether the
peak stays within ``--tolerance`` (20%) of the smallest size's; writes ``OUT/results.json``.

    OMP_NUM_THREADS=1 python benchmarks/streaming_scale.py --out /tmp/scale --sizes 5e6,20e6,50e6 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from _process import peak_rss_mb, run_child  # benchmarks/ is on sys.path when a script runs

ROWS_PER_FILE = 500_000


def generate_log(out: Path, train_rows: int, eval_rows: int, seed: int) -> dict:
    from prerank.data.parquet import read_meta
    from prerank.data.synthetic import generate

    total = train_rows + 2 * eval_rows
    meta = read_meta(out)
    if meta.get("complete") and sum(meta["rows"].values()) == total and meta.get("seed") == seed:
        return {"rows": total, "seconds": 0.0, "reused": True, "peak_rss_mb": peak_rss_mb()}
    share = eval_rows / total
    t0 = time.perf_counter()
    options = {"valid_share": share, "test_share": share}
    generate(out, rows=total, seed=seed, progress=False, rows_per_file=ROWS_PER_FILE, **options)
    seconds = time.perf_counter() - t0
    return {"rows": total, "seconds": seconds, "rows_per_s": total / seconds, "peak_rss_mb": peak_rss_mb()}


def view(log: Path, rows: int, out: Path) -> Path:
    """A dataset of the log's first ``ceil(rows / 500k)`` training parts and its valid/test splits (symlinks)."""
    parts = sorted((log / "train").glob("part-*.parquet"))[: math.ceil(rows / ROWS_PER_FILE)]
    (out / "train").mkdir(parents=True, exist_ok=True)
    for old in (out / "train").glob("*.parquet"):
        old.unlink()
    for p in parts:
        (out / "train" / p.name).symlink_to(p)
    for name in ("valid", "test", "items.parquet", "schema.json"):
        if not (out / name).exists():
            (out / name).symlink_to(log / name)
    return out


def train_epoch(data: Path, out: Path, batch_size: int, threads: int) -> dict:
    from prerank.data.parquet import ParquetSplit
    from prerank.train.config import TrainConfig
    from prerank.train.trainer import evaluate_split, train_model

    config = TrainConfig(epochs=1, batch_size=batch_size, threads=threads, progress=False, patience=1)
    result = train_model("two_tower", data, out, config=config, log=lambda _: None)
    test = evaluate_split(result.model, data, "test", config.eval_batch_size)
    return {
        "train_rows": ParquetSplit(data, "train").num_rows,
        "train_seconds": result.train_seconds,
        "rows_per_s": result.samples_per_second,
        "valid_auc": result.best_metric,
        "test_auc": test["auc"],
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/prerank-scale"))
    parser.add_argument("--sizes", default="5e6,20e6,50e6", help="Training rows per run, comma-separated.")
    parser.add_argument("--eval-rows", type=int, default=100_000, help="Rows of the valid and of the test split.")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.2, help="Allowed growth of peak RSS over the sizes.")
    a = parser.parse_args()
    sizes = sorted(int(float(s)) for s in a.sizes.split(","))
    log = a.out / "log"
    gen = run_child(__file__, ["_generate", str(log), str(sizes[-1]), str(a.eval_rows), str(a.seed)])
    print(f"log: {gen['rows']:,} rows in {log}, peak RSS {gen['peak_rss_mb']:,.0f} MB", flush=True)
    runs = []
    for size in sizes:
        data = view(log, size, a.out / f"rows{size}")
        r = run_child(__file__, ["_train", str(data), str(a.out / f"run{size}"), str(a.batch_size), str(a.threads)])
        runs.append({"size": size, **r})
        print(
            f"{r['train_rows']:>12,} rows: {r['rows_per_s']:>9,.0f} rows/s, {r['train_seconds']:>7,.0f} s,"
            f" peak RSS {r['peak_rss_mb']:>6,.0f} MB, valid AUC {r['valid_auc']:.4f}, test AUC {r['test_auc']:.4f}",
            flush=True,
        )
    peaks = [r["peak_rss_mb"] for r in runs]
    growth = max(peaks) / min(peaks) - 1
    flat = growth <= a.tolerance
    print(f"peak RSS grows {growth:+.1%} from {sizes[0]:,} to {sizes[-1]:,} rows: {'flat' if flat else 'NOT flat'}")
    report = {"generate": gen, "runs": runs, "growth": growth, "flat": flat, "threads": a.threads}
    report["batch_size"] = a.batch_size
    (a.out / "results.json").write_text(json.dumps(report, indent=2))
    if not flat:
        raise SystemExit(1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_generate":
        out, train_rows, eval_rows, seed = sys.argv[2:6]
        print(json.dumps(generate_log(Path(out), int(train_rows), int(eval_rows), int(seed))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_train":
        data, out, batch, threads = sys.argv[2:6]
        print(json.dumps(train_epoch(Path(data), Path(out), int(batch), int(threads))))
    else:
        main()
