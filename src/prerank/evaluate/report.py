"""Result tables: mean +- std over seeds, per model, as Markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: (record key, column title, format) of the comparison table.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("auc", "AUC", ".4f"),
    ("logloss", "logloss", ".4f"),
    ("gauc", "GAUC", ".4f"),
    ("relaimpr", "RelaImpr % vs two_tower", ".2f"),
    ("relaimpr_teacher", "RelaImpr % vs teacher", ".2f"),
    ("recall@10", "Recall@10", ".4f"),
    ("recall@50", "Recall@50", ".4f"),
    ("recall@100", "Recall@100", ".4f"),
    ("ndcg@10", "NDCG@10", ".4f"),
    ("ndcg@50", "NDCG@50", ".4f"),
    ("ndcg@100", "NDCG@100", ".4f"),
    ("hard_recall@10", "hard Recall@10", ".4f"),
    ("hard_ndcg@10", "hard NDCG@10", ".4f"),
    ("cascade_recall@5/10", "cascade R@5/10", ".4f"),
    ("cascade_recall@5/50", "cascade R@5/50", ".4f"),
    ("train_seconds", "train s", ".1f"),
    ("train_samples_per_second", "samples/s", ",.0f"),
    ("epochs", "epochs", ".1f"),
    ("params", "params", ",.0f"),
    ("score_flops_per_candidate", "FLOPs/candidate", ",.0f"),
    ("item_cache_bytes_per_item", "cache B/item", ",.0f"),
)


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean and sample standard deviation of the finite values (nan, nan, 0 when there are none)."""
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def _cell(values: list[Any], fmt: str) -> str:
    m, s, n = mean_std(values)
    if n == 0:
        return "-"
    return f"{m:{fmt}} ± {s:{fmt}}" if n > 1 and s > 0 else f"{m:{fmt}}"


def results_table(records: list[dict[str, Any]], columns: tuple[tuple[str, str, str], ...] = COLUMNS) -> str:
    """One row per model (in first-seen order), mean ± std over its seeds; n = number of seeds."""
    models = list(dict.fromkeys(r["model"] for r in records))
    cols = [c for c in columns if any(c[0] in r for r in records)]
    lines = [
        "| model | seeds | " + " | ".join(title for _, title, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for m in models:
        rows = [r for r in records if r["model"] == m]
        cells = [_cell([r.get(key) for r in rows], fmt) for key, _, fmt in cols]
        lines.append(f"| {m} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
