"""Out-of-core preparation at scale: wall time and peak RSS of ``prerank data prepare taobao-user-behavior`` on a
synthetic UserBehavior log, with ``--engine duckdb`` (out of core) and ``--engine memory`` (for contrast).

The log is written block by block (1M events at a time, never whole in memory) in the raw Tianchi format
(``user,item,category,behavior,timestamp``, no header) with Taobao-like proportions: about 100 events per
user and 25 per item, items drawn with a skew (popular items get most events), one category per item out of
5,000, behaviours pv/fav/cart/buy at 89.5/3/5.5/2%, times uniform over the 9 days plus 0.1% outside them.
Every preparation runs in a fresh subprocess that reports its own peak RSS (``ru_maxrss``, DuckDB's memory
included: it runs in the process). The prepared dataset and the logs are deleted after measuring unless
``--keep``; writes ``OUT/results.json``.

    OMP_NUM_THREADS=1 python benchmarks/prepare_scale.py --out /tmp/prep --sizes 2e6,50e6 --memory-sizes 2e6,5e6 \\
        --memory-limit 1GB --threads 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from _process import peak_rss_mb, run_child  # benchmarks/ is on sys.path when a script runs

BLOCK = 1_000_000


def generate_log(path: Path, events: int, seed: int) -> dict:
    """A synthetic UserBehavior CSV of ``events`` rows, written ``BLOCK`` rows at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from prerank.data.recipes.taobao import BEHAVIOURS, DAY, DAY0, N_DAYS

    users, items, categories = max(events // 100, 1), max(events // 25, 1), 5_000
    rng = np.random.default_rng(seed)
    item_category = rng.integers(1, categories + 1, items)
    t0 = time.perf_counter()
    tmp = path.with_suffix(".partial")
    options = pacsv.WriteOptions(include_header=False)
    schema = pa.schema([(c, pa.int64()) for c in ("user", "item", "category")])
    schema = schema.append(pa.field("behavior", pa.string())).append(pa.field("ts", pa.int64()))
    with pacsv.CSVWriter(tmp, schema, write_options=options) as writer:
        for start in range(0, events, BLOCK):
            n = min(BLOCK, events - start)
            item = (items * rng.random(n) ** 2).astype(np.int64)  # skewed popularity
            ts = DAY0 + rng.integers(0, N_DAYS * DAY, n)
            outside = rng.random(n) < 0.001
            ts[outside] += rng.choice([-1, 1], int(outside.sum())) * N_DAYS * DAY
            behaviour = rng.choice(len(BEHAVIOURS), n, p=[0.895, 0.03, 0.055, 0.02])
            block = {
                "user": rng.integers(1, users + 1, n),
                "item": item + 1,
                "category": item_category[item],
                "behavior": np.array(BEHAVIOURS)[behaviour],
                "ts": ts,
            }
            writer.write_table(pa.table(block, schema=schema))
    tmp.replace(path)
    seconds = time.perf_counter() - t0
    return {"events": events, "seconds": seconds, "bytes": path.stat().st_size, "peak_rss_mb": peak_rss_mb()}


def prepare_once(raw: Path, out: Path, engine: str, memory_limit: str, threads: int, bucket_rows: int) -> dict:
    from prerank.data.recipes import OutOfCore, prepare

    ooc = OutOfCore(memory_limit=memory_limit, threads=threads, bucket_rows=bucket_rows) if engine == "duckdb" else None
    t0 = time.perf_counter()
    prepare("taobao-user-behavior", raw, out, engine=engine, out_of_core=ooc)
    seconds = time.perf_counter() - t0
    meta = json.loads((out / "meta.json").read_text())
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rows": meta["rows"], "counts": meta["counts"]} | {
        "out_bytes": size
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/prerank-prepare"))
    parser.add_argument("--sizes", default="2e6,50e6", help="Events of the logs prepared with --engine duckdb.")
    parser.add_argument("--memory-sizes", default="2e6", help="Events of the logs prepared with --engine memory.")
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB's memory limit.")
    parser.add_argument("--threads", type=int, default=1, help="DuckDB's threads.")
    parser.add_argument("--bucket-rows", type=int, default=1_000_000, help="Rows of a range of users (OutOfCore).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="Keep the logs and the prepared datasets.")
    a = parser.parse_args()
    parse = lambda text: sorted(int(float(s)) for s in text.split(",") if s)  # noqa: E731
    duck, memory = parse(a.sizes), parse(a.memory_sizes)
    a.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for size in sorted(set(duck) | set(memory)):
        log = a.out / f"UserBehavior_{size}.csv"
        gen = run_child(__file__, ["_generate", str(log), str(size), str(a.seed)])
        print(
            f"log: {size:,} events, {gen['bytes'] / 1e9:.2f} GB in {gen['seconds']:.0f} s, "
            f"peak RSS {gen['peak_rss_mb']:,.0f} MB",
            flush=True,
        )
        for engine in ("memory", "duckdb"):
            if size not in (memory if engine == "memory" else duck):
                continue
            out = a.out / f"{engine}-{size}"
            args = ["_prepare", str(log), str(out), engine, a.memory_limit, str(a.threads), str(a.bucket_rows)]
            r = run_child(__file__, args)
            runs.append({"events": size, "engine": engine, "generate": gen, **r})
            rows = sum(r["rows"].values())
            print(
                f"{engine:>6} {size:>12,} events -> {rows:,} rows: {r['seconds']:>7,.0f} s "
                f"({size / r['seconds']:,.0f} events/s), peak RSS {r['peak_rss_mb']:>6,.0f} MB, "
                f"dataset {r['out_bytes'] / 1e9:.2f} GB",
                flush=True,
            )
            if not a.keep:
                shutil.rmtree(out)
        same = [r for r in runs if r["events"] == size]
        if len(same) == 2:
            agree = same[0]["rows"] == same[1]["rows"] and same[0]["counts"] == same[1]["counts"]
            print(f"memory and duckdb give the same split sizes and counts at {size:,} events: {agree}", flush=True)
        if not a.keep:
            log.unlink()
    report = {"runs": runs, "memory_limit": a.memory_limit, "threads": a.threads, "bucket_rows": a.bucket_rows}
    report["seed"] = a.seed
    (a.out / "results.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_generate":
        print(json.dumps(generate_log(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_prepare":
        _, _, raw, out, engine, limit, threads, bucket_rows = sys.argv
        print(json.dumps(prepare_once(Path(raw), Path(out), engine, limit, int(threads), int(bucket_rows))))
    else:
        main()
