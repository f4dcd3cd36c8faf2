"""How much trained models agree with each other on a cascade's simulated lists (issue 22, Table 4 analogs).

For every ordered pair (A, B) of runs: recall@(5, N) of B's top N for A's top 5 over the test requests of
``--cascade`` (:func:`prerank.evaluate.metrics.cascade_recall`, as ``benchmarks/fscd_cascade.py`` measures a
pre-ranker against the ranker). Seeds of one model that agree with each other no better than with the ranker mean
that a recall table against a single ranker seed measures chance agreement.

    python benchmarks/fscd_agreement.py --cascade /tmp/fscdtb/taobao-wide-cascade \\
        --runs /tmp/fscdtb/cascade-taobao/train/{fscd_ranker-s0,cold-s0,cold-s1,cold-s2} --out agreement.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fscd_cascade import scores

from prerank.evaluate import metrics
from prerank.io import atomic_write_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cascade", type=Path, required=True, help="A cascade dataset (prerank cascade build).")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="Run directories (each with test.json).")
    p.add_argument("--n", type=int, default=10, help="Top N of B that A's top 5 is looked for in.")
    p.add_argument("--out", type=Path, required=True, help="JSON file: {'A|B': recall}.")
    args = p.parse_args()
    if len({d.name for d in args.runs}) != len(args.runs):
        p.error("--runs must have distinct folder names (they name the rows)")
    logits = {d.name: scores(d, args.cascade) for d in args.runs}
    names = list(logits)
    groups = logits[names[0]]["request_id"]
    out = {
        f"{a}|{b}": metrics.cascade_recall(logits[a]["logits"], logits[b]["logits"], groups, k=5, n=args.n).value
        for a in names
        for b in names
        if a != b
    }
    atomic_write_text(args.out, json.dumps(out, indent=1))
    print(f"rows: A's top 5; columns: B's top {args.n}\n| A \\ B | " + " | ".join(names) + " |")
    for a in names:
        print(f"| {a} | " + " | ".join("-" if a == b else f"{out[f'{a}|{b}']:.3f}" for b in names) + " |")


if __name__ == "__main__":
    main()
