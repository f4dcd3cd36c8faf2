"""Latency of every registered model (untrained, on a dataset's schema): the serving table of the README.

A thin wrapper over `prerank bench`: it exports each registry model (or each of ``--models``) at random init to a
temporary directory and benches, side by side, the full forward and the cached request on PyTorch eager, the
torch.export graphs, onnxruntime and the C kernels (where a model has them), at 100, 1,000 and 10,000 candidates on
1 and 2 threads, writing OUT/bench.json and OUT/bench.md after each model (a long run leaves partial results).

    python benchmarks/latency.py --data /tmp/prerank-data/ml1m-paper --out benchmarks/results/latency
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from prerank.bench.efficiency import BenchConfig, markdown, run_bench, target_from_model, write_report
from prerank.models.registry import MODELS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="Dataset directory (schema, catalogue, rows).")
    p.add_argument("--out", type=Path, required=True, help="Folder for bench.json and bench.md.")
    p.add_argument("--models", default=",".join(MODELS), help="Comma list of registry names (default: all).")
    p.add_argument("--candidates", default="100,1000,10000")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--cache-dtype", default="float32", help="Item-cache storage: float32 or bfloat16.")
    args = p.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; registered: {', '.join(MODELS)}")
    config = BenchConfig(
        candidates=tuple(int(c) for c in args.candidates.split(",")),
        threads=tuple(int(t) for t in args.threads.split(",")),
        requests=args.requests,
        warmup=args.warmup,
    )
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="prerank-latency-") as workdir:
        for name in names:
            target = target_from_model(name, args.data, workdir, cache_dtype=args.cache_dtype)
            records += run_bench([target], args.data, config, progress=True)
            write_report(records, args.out)
            print(f"{name}: done", flush=True)
    print(markdown(records))


if __name__ == "__main__":
    main()
