"""Assemble RankTower-style tables (Recall@K, NDCG@K, cascade recall) from several `prerank compare` outputs.

    .venv/bin/python benchmarks/cascade_tables.py [--baselines CASCADE_DIR] "label=DIR[:model]" ...

Each argument names a row: DIR is a `prerank compare --out` folder on a cascade dataset and MODEL
(optional) picks one model from it (default: every model, labelled "label / model").
``--baselines`` adds two rows first, scored on CASCADE_DIR's test split by scorers that learn nothing
(`prerank cascade baselines`): item popularity and the teacher itself, so a reader sees what the
simulated stages give away.
Prints one Markdown table, mean ± std over the seeds each run has.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prerank.evaluate.report import mean_std

COLUMNS = (
    "recall@10",
    "ndcg@10",
    "recall@50",
    "hard_recall@10",
    "hard_ndcg@10",
    "cascade_recall@5/10",
    "cascade_recall@5/50",
    "auc",
    "gauc",
    "exposure_auc",
)


def _cell(values: list[float]) -> str:
    m, s, n = mean_std(values)
    if n == 0:
        return "-"
    return f"{m:.4f} ± {s:.4f}" if n > 1 else f"{m:.4f}"


def main(args: list[str]) -> None:
    if not args:
        sys.exit(__doc__)
    print("| run | seeds | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    if args[0] == "--baselines":
        from prerank.evaluate.listwise import baseline_metrics

        for name, m in baseline_metrics(args[1]).items():
            print(f"| {name} (no model) | - | " + " | ".join(_cell([m.get(c)]) for c in COLUMNS) + " |")
        args = args[2:]
    for arg in args:
        label, _, rest = arg.partition("=")
        folder, _, only = rest.partition(":")
        path = Path(folder) / "results.json"
        if not path.exists():
            print(f"| {label} | 0 | " + " | ".join("not run" for _ in COLUMNS) + " |")
            continue
        records = json.loads(path.read_text())
        models = [only] if only else list(dict.fromkeys(r["model"] for r in records))
        for m in models:
            rows = [r for r in records if r["model"] == m]
            name = label if only else f"{label} / {m}"
            print(f"| {name} | {len(rows)} | " + " | ".join(_cell([r.get(c) for r in rows]) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
