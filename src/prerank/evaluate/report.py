"""Result tables (mean +- std over seeds, per model, as Markdown) and the AUC-against-latency plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
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
    ("latency_p50_ms", "p50 ms/request", ".3f"),
    ("meta_mean_cosine", "FIT meta cosine", ".3f"),
    ("meta_user_spread", "FIT user spread", ".4f"),
    ("tuned", "tuned on valid", "s"),
)

#: The short table of ``prerank demo``: quality, served latency and item-cache size per model.
DEMO_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("auc", "test AUC", ".4f"),
    ("gauc", "test GAUC", ".4f"),
    ("latency_p50_ms", "p50 ms/request", ".3f"),
    ("item_cache_bytes_per_item", "cache B/item", ",.0f"),
)


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean and sample standard deviation of the finite values (nan, nan, 0 when there are none)."""
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def _cell(values: list[Any], fmt: str) -> str:
    if fmt == "s":  # a setting: the distinct values of the rows
        return "; ".join(dict.fromkeys(str(v) for v in values if v is not None)) or "-"
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


def latency_points(records: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """``(model, mean AUC over its seeds, p50 ms)`` for every model whose records carry a latency."""
    points = []
    for m in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == m]
        latency = next((r["latency_p50_ms"] for r in rows if r.get("latency_p50_ms") is not None), None)
        auc, _, n = mean_std([r.get("auc") for r in rows])
        if latency is not None and n:
            points.append((m, auc, float(latency)))
    return points


def _label_offsets(points: list[tuple[str, float, float]]) -> list[tuple[int, int, str]]:
    """Label offsets (points) and alignment per point, moved below or to the left of the point where the label
    above-right would land on another point's label (positions compared on the plot's log-x / linear-y scale)."""
    xs = np.log10([p[2] for p in points])
    ys = np.array([p[1] for p in points])
    xn = (xs - xs.min()) / max(np.ptp(xs), 1e-9)
    yn = (ys - ys.min()) / max(np.ptp(ys), 1e-9)
    choices = ((6, 4, "left", 0.0, 0.04), (6, -12, "left", 0.0, -0.06), (-6, 4, "right", -0.15, 0.04))
    placed: list[tuple[float, float]] = []
    out = []
    for i in range(len(points)):
        anchors = [(xn[i] + c[3], yn[i] + c[4]) for c in choices]
        free = [all(abs(x - a) > 0.15 or abs(y - b) > 0.06 for a, b in placed) for x, y in anchors]
        pick = free.index(True) if any(free) else 0
        placed.append(anchors[pick])
        out.append(choices[pick][:3])
    return out


def auc_latency_plot(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """A PNG of test AUC (mean over seeds) against served p50 latency per request, one labelled point per model.

    The latency axis is logarithmic (models differ by orders of magnitude). Returns the path, or None when no record
    carries a latency. Uses matplotlib's Agg backend (no display needed)."""
    points = latency_points(records)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(r for r in records if r.get("latency_p50_ms") is not None)
    n, threads, runtime = (first.get(k) for k in ("latency_candidates", "latency_threads", "latency_runtime"))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for _, auc, ms in points:
        ax.scatter(ms, auc, s=40, zorder=3)
    for (model, auc, ms), (dx, dy, ha) in zip(points, _label_offsets(points), strict=True):
        ax.annotate(model, (ms, auc), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=9)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"p50 latency per request, ms (log scale; {n:,} candidates, {threads} thread, {runtime})")
    ax.set_ylabel("test AUC (mean over seeds)")
    ax.set_title(title or "AUC against serving latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.15, y=0.12)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
