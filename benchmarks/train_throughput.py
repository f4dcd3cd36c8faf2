"""Training throughput of Two-Tower on ML-1M (protocol `paper`): samples/s with the thread count.

    .venv/bin/python benchmarks/train_throughput.py [--data DIR] [--threads 2] [--epochs 1]

Without --data it prepares ML-1M `paper` from ../shared/data/ml-1m into a temporary folder.
It prints the reader alone (rows/s of the streaming Parquet path, no model) and the full training
loop (reader + forward + backward + Adam) in the same run, so their ratio is meaningful.
For orientation (ANCHORS.md): the public IntTower code's DSSM trains at ~24-28k samples/s on this
kind of machine with 2 threads.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from prerank.data.parquet import make_loader
from prerank.train.config import TrainConfig
from prerank.train.trainer import train_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-1m"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="prepared ML-1M `paper` dataset (default: prepare it now)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--model", default="two_tower")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="prerank-bench-"))
    data = args.data
    if data is None:
        if not SHARED.exists():
            sys.exit(f"no --data given and {SHARED} is absent: nothing to benchmark")
        from prerank.data.recipes import prepare

        data = tmp / "ml1m-paper"
        t0 = time.perf_counter()
        prepare("ml-1m", SHARED, data, protocol="paper", seed=0)
        print(f"prepared ML-1M paper in {time.perf_counter() - t0:.1f} s")
    torch.set_num_threads(args.threads)

    t0, rows = time.perf_counter(), 0
    for batch in make_loader(data, "train", args.batch_size, shuffle=True, seed=0):
        rows += len(batch)
    read_rate = rows / (time.perf_counter() - t0)

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, threads=args.threads, progress=False, patience=9)
    result = train_model(args.model, data, tmp / "run", config=cfg, log=lambda _: None)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    print(f"train rows: {rows:,}  batch size: {args.batch_size}")
    print(f"reader only: {read_rate:,.0f} rows/s")
    print(f"{args.model} training: {result.samples_per_second:,.0f} samples/s over {result.epochs} epoch(s)")
    print(f"valid AUC after training: {result.best_metric:.4f}")


if __name__ == "__main__":
    main()
