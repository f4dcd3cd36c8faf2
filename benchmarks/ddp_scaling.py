"""Training samples/s of one process against ``torchrun`` data-parallel ranks, on the same global batch.

Runs ``prerank train`` (Two-Tower, one epoch cut at ``--max-steps``) as: 1 process x T threads for each T in
``--threads``, and ``torchrun --nproc-per-node N`` x 1 thread for each N in ``--ranks``; each configuration
``--repeats`` times, interleaved, and prints the median samples/s (training time only, every rank's rows) and
samples per CPU-second (every rank's process, all threads) with the machine's load average: on a loaded machine
wall-clock rates follow the scheduler's share (more processes get more of it), CPU cost does not. On a 2-core
machine the honest comparison is 2 ranks x 1 thread against 1 process x 2 threads (the same cores).

    python benchmarks/ddp_scaling.py --data DIR --out /tmp/ddp-scaling --threads 1,2 --ranks 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def run(data: Path, out: Path, ranks: int, threads: int, args: argparse.Namespace) -> tuple[float, float]:
    """Samples/s and samples per CPU-second (every rank's threads) of the run's training epoch."""
    train = ["-m", "prerank", "train", "--model", "two_tower", "--data", str(data), "--out", str(out)]
    train += ["--epochs", "1", "--batch-size", str(args.batch_size), "--max-steps", str(args.max_steps)]
    train += ["--threads", str(threads), "--no-progress"]
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", "29517"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(launcher + train, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-4000:])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    rows = record["samples_per_second"] * record["train_seconds"]
    return record["samples_per_second"], rows / record["train_cpu_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("/tmp/prerank-ddp-scaling"))
    p.add_argument("--threads", default="1,2", help="Threads of the single-process runs.")
    p.add_argument("--ranks", default="2", help="Rank counts of the torchrun runs (1 thread each).")
    p.add_argument("--batch-size", type=int, default=2048, help="Global batch.")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    configs = [(1, int(t)) for t in a.threads.split(",")] + [(int(n), 1) for n in a.ranks.split(",")]
    rates: dict[tuple[int, int], list[tuple[float, float]]] = {c: [] for c in configs}
    loads: list[float] = []
    for rep in range(a.repeats):
        for ranks, threads in configs:
            rates[(ranks, threads)].append(run(a.data, a.out / f"r{ranks}t{threads}_{rep}", ranks, threads, a))
            loads.append(os.getloadavg()[0])
    base = statistics.median(x for x, _ in rates[configs[0]])
    print(f"Two-Tower, global batch {a.batch_size}, {a.max_steps} steps, median of {a.repeats}")
    print("| processes x threads | samples/s (median) | runs | vs 1 x 1 | samples per CPU-second (median) |")
    print("|---|---|---|---|---|")
    for (ranks, threads), r in rates.items():
        m = statistics.median(x for x, _ in r)
        runs = ", ".join(f"{x:,.0f}" for x, _ in r)
        per_cpu = statistics.median(c for _, c in r)
        print(f"| {ranks} x {threads} | {m:,.0f} | {runs} | {m / base:.2f}x | {per_cpu:,.0f} |")
    print(f"1-minute load average during the runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
