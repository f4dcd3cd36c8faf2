"""Latency of every registered model (untrained, on a dataset's schema): the serving table of the README.

A thin wrapper over `prerank bench`: it benches all registry models (or ``--models``) at 100, 1,000 and
5,000 candidates on 1 and 2 threads and writes OUT/bench.json and OUT/bench.md.

    python benchmarks/latency.py --data /tmp/prerank-data/ml1m-paper --out benchmarks/results/latency
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prerank.bench.efficiency import BenchConfig, markdown, run_bench, target_from_model, write_report
from prerank.models.registry import MODELS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="Dataset directory (schema, catalogue, rows).")
    p.add_argument("--out", type=Path, required=True, help="Folder for bench.json and bench.md.")
    p.add_argument("--models", default=",".join(MODELS), help="Comma list of registry names (default: all).")
    p.add_argument("--candidates", default="100,1000,5000")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--requests", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    config = BenchConfig(
        candidates=tuple(int(c) for c in args.candidates.split(",")),
        threads=tuple(int(t) for t in args.threads.split(",")),
        requests=args.requests,
    )
    records = []
    for name in args.models.split(","):
        records += run_bench([target_from_model(name.strip(), args.data)], args.data, config)
        write_report(records, args.out)  # after each model, so a long run leaves partial results
        print(f"{name}: done", flush=True)
    print(markdown(records))


if __name__ == "__main__":
    main()
