"""FSCD's Tables 2 and 3 on a wide dataset (issue 22): feature ranks per cost type, and AUC / latency / CPU per K.

Steps (each skipped when its output exists, so an interrupted run resumes):

1. ``prerank select`` with FSCD, Dropout-FR and DFS, one run per method and seed (``--seeds``), at most
   ``--jobs`` at a time, 1 thread each;
2. Table 2 analog: per method and FSCD cost type, the minimum, median and maximum rank of the type's
   fields (1 = most important), mean over the seeds;
3. ``prerank select-finetune`` of the FSCD pre-ranker on each method's top K, for every K of ``--ks``
   (``all``: every field; the same fields for every method, so it is trained once, from FSCD's selection
   weights); fine-tune seed s starts from selection seed s. ``--finetune-seeds 0,1,2`` repeats it per seed,
   at the K of ``--seed-ks`` and for the methods of ``--seed-methods`` only (the other K: first seed only).
   ``--scratch``, ``--weight-decay``, ``--dropout`` and ``--patience`` pass on to ``select finetune``;
4. per fine-tuned pre-ranker, alone (no training running): the served request's latency at ``--candidates``
   candidates on 1 thread (ONNX runtime; :func:`prerank.bench.efficiency.served_latency`, as `prerank compare`),
   and the process CPU time per request under a fixed request rate (``--rate``);
5. Table 3 analog (AUC on test, latency, CPU per request; FSCD's difference to Dropout-FR in the paper's format:
   AUC difference, relative latency and CPU change) and a PNG of AUC against latency, one line per method.

    python benchmarks/fscd_tables.py --data /tmp/fscd/ml1m-wide --out benchmarks/results/fscd-ml1m \\
        --plot docs/img/fscd_ml1m_auc_latency.png

Writes OUT/tables.md and OUT/results.json (every number in the tables), OUT/commands.txt (every command run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prerank.io import atomic_write_text
from prerank.schema import Schema

METHODS = ("fscd", "dropout_fr", "dfs")
LABELS = {"fscd": "FSCD", "dropout_fr": "Dropout-FR", "dfs": "DFS", "all": "all fields"}
COST_TYPES = ("I", "II", "III", "IV")
PRERANKER = "fscd_preranker"


def run(cmd: list[str], log: Path, commands: list[str]) -> None:
    """Run a ``prerank`` command with 1 thread; its output goes to ``log``; fail loudly."""
    commands.append(" ".join(cmd))
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}); see {log}")
    print(f"{time.perf_counter() - t0:7.0f} s  {cmd[3]} -> {log}", flush=True)


def prerank() -> list[str]:
    return [sys.executable, "-c", "from prerank.cli import main; main()"]


def select_cmd(args: argparse.Namespace, method: str, seed: int, out: Path) -> list[str]:
    cmd = prerank() + ["select", "--method", method, "--data", str(args.data), "--out", str(out), "--k", "10"]
    cmd += ["--epochs", str(args.select_epochs), "--batch-size", str(args.select_batch_size)]
    cmd += ["--lr", str(args.select_lr), "--seed", str(seed), "--threads", "1", "--no-progress"]
    if method == "fscd":
        cmd += ["--prior-scale", str(args.prior_scale)]
    elif method == "dropout_fr":
        cmd += ["--reg", str(args.reg)]
    return cmd


def finetune_cmd(args: argparse.Namespace, selection: Path, k: int, out: Path, seed: int) -> list[str]:
    cmd = prerank() + ["select-finetune", "--selection", str(selection), "--k", str(k), "--data", str(args.data)]
    cmd += ["--out", str(out), "--epochs", str(args.finetune_epochs), "--threads", "1", "--seed", str(seed)]
    for flag in ("weight_decay", "dropout", "patience"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return cmd + (["--scratch"] if args.scratch else []) + ["--no-progress"]


def table2(selections: dict[str, list[dict]]) -> tuple[str, dict]:
    """Min / median / max rank per cost type and method, mean (and std) over seeds."""
    stats: dict = {}
    for method, reports in selections.items():
        for ct in COST_TYPES:
            per_seed = []
            for rep in reports:
                ranks = sorted(f["rank"] for f in rep["fields"] if f["cost_type"] == ct)
                if ranks:
                    per_seed.append((ranks[0], statistics.median(ranks), ranks[-1]))
            if per_seed:
                stats.setdefault(ct, {})[method] = {
                    "n": sum(f["cost_type"] == ct for f in reports[0]["fields"]),
                    "min": [s[0] for s in per_seed],
                    "median": [s[1] for s in per_seed],
                    "max": [s[2] for s in per_seed],
                }
    methods = [m for m in METHODS if m in selections]
    head = " / ".join(LABELS[m] for m in methods)
    lines = [
        f"| type | fields | minimum ({head}) | median | maximum |",
        "|---|---:|---|---|---|",
    ]

    def fmt(values: list[float]) -> str:
        mean = statistics.fmean(values)
        return f"{mean:.1f}" + (f"±{statistics.stdev(values):.1f}" if len(values) > 1 else "")

    for ct in COST_TYPES:
        if ct not in stats:
            continue
        row = stats[ct]
        cells = [" / ".join(fmt(row[m][q]) for m in methods) for q in ("min", "median", "max")]
        lines.append(f"| {ct} | {row[methods[0]]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines), stats


def measure(args: argparse.Namespace, run_dir: Path, n: int = 0) -> dict:
    """Latency and paced CPU time of a fine-tuned pre-ranker, pass ``n`` (cached in run_dir/latency[-n].json)."""
    from prerank.bench.efficiency import served_latency
    from prerank.train.checkpoint import load_model

    cached = run_dir / ("latency.json" if n == 0 else f"latency-{n}.json")
    if cached.exists():
        return json.loads(cached.read_text())
    summary = json.loads((run_dir / "test.json").read_text())
    _, model, _ = load_model(summary["checkpoint"])
    got = served_latency(
        PRERANKER, model, args.data, run_dir / "artifact", candidates=args.candidates, threads=1,
        requests=args.requests, warmup=10, rate=args.rate,
    )  # fmt: skip
    atomic_write_text(cached, json.dumps(got, indent=2))
    return got


def _relative(value: float, base: float) -> str:
    """The paper's format: ``2.41(-44.2%)``."""
    return f"{value:.2f}({100 * (value / base - 1):+.1f}%)"


MEASURES = ("auc", "latency_p50_ms", "cpu_ms_per_request", "n_cross")


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std over fine-tune seeds per (method, K), in first-seen order."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["k"]), []).append(r)
    out = []
    for (method, k), rs in groups.items():
        agg = {"method": method, "k": k, "k_label": rs[0]["k_label"], "seeds": len(rs)}
        for key in MEASURES:
            values = [float(r[key]) for r in rs if key in r]
            agg[key] = statistics.fmean(values)
            agg[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            agg[f"{key}_n"] = len(values)
        out.append(agg)
    return out


def table3(agg: list[dict]) -> str:
    lines = [
        "| K | method | seeds | cross fields | test AUC | latency p50 (ms) | CPU per request (ms) "
        "| FSCD vs Dropout-FR |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    by_k: dict[str, dict[str, dict]] = {}
    for r in agg:
        by_k.setdefault(r["k_label"], {})[r["method"]] = r
    pm = lambda r, key, f: f"{r[key]:{f}}" + (f" ± {r[key + '_std']:{f}}" if r[key + "_n"] > 1 else "")  # noqa: E731
    for k, methods in by_k.items():
        base = methods.get("dropout_fr")
        for m, r in methods.items():
            diff = ""
            if m == "fscd" and base:
                diff = f"{r['auc']:.4f}({r['auc'] - base['auc']:+.4f}) " + " ".join(
                    _relative(r[key], base[key]) for key in ("latency_p50_ms", "cpu_ms_per_request")
                )
            cells = " | ".join(
                [pm(r, "n_cross", ".1f"), pm(r, "auc", ".4f"), pm(r, "latency_p50_ms", ".2f")]
                + [pm(r, "cpu_ms_per_request", ".2f")]
            )
            lines.append(f"| {k} | {LABELS.get(m, m)} | {r['seeds']} | {cells} | {diff} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """AUC against served latency (left) and against CPU time per request at the fixed rate (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    every = [r for r in rows if r["method"] == "all"]
    for ax, key, label in (
        (axes[0], "latency_p50_ms", "latency p50, ms"),
        (axes[1], "cpu_ms_per_request", "CPU per request at a fixed rate, ms"),
    ):
        for m in METHODS:
            pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["k"]) + every
            if len(pts) > len(every):
                ax.plot([r[key] for r in pts], [r["auc"] for r in pts], "o-", label=LABELS[m])
                for r in pts:
                    ax.annotate(r["k_label"], (r[key], r["auc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{label} (1,000 candidates, 1 thread, ONNX)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test AUC")
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="A wide dataset (prepare ... --features wide).")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2", help="Selection seeds (Table 2 is averaged over them).")
    p.add_argument("--ks", default="10,20,30,40,all")
    p.add_argument("--select-epochs", type=int, default=1)
    p.add_argument("--select-batch-size", type=int, default=512, help="Small batches: more steps for the gates.")
    p.add_argument("--select-lr", type=float, default=2e-3)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument(
        "--finetune-seeds", default="0", help="Fine-tune seed s starts from selection seed s (each in --seeds)."
    )
    p.add_argument(
        "--seed-ks", default=None, help="K values (subset of --ks) fine-tuned with every --finetune-seeds; others with"
        " the first only (default: every K)."
    )  # fmt: skip
    p.add_argument(
        "--seed-methods", default=",".join(METHODS), help="Methods fine-tuned with every --finetune-seeds at --seed-ks"
        " (K = all always is)."
    )  # fmt: skip
    p.add_argument(
        "--cost-first-seed", action="store_true", help="Time (latency, CPU) only the first fine-tune seed's runs."
    )
    p.add_argument("--scratch", action="store_true", help="Fine-tune from scratch, not from the selection weights.")
    p.add_argument("--weight-decay", type=float, default=None, help="Fine-tuning weight decay (select finetune's).")
    p.add_argument("--dropout", type=float, default=None, help="Fine-tuning dropout (select finetune's).")
    p.add_argument("--patience", type=int, default=None, help="Fine-tuning early-stopping patience (on valid AUC).")
    p.add_argument("--prior-scale", type=float, default=1e-2, help="FSCD's prior weight per step (see selection.fscd).")
    p.add_argument("--reg", type=float, default=1e-2, help="Dropout-FR's lambda (the same weight, uniform prior).")
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=20.0, help="Requests per second for the CPU-time measurement.")
    p.add_argument("--passes", type=int, default=2, help="Latency passes (alternating order); the fastest counts.")
    p.add_argument(
        "--first-pass", type=int, default=0, help="Ignore the cached timings of the passes before this one (e.g. taken"
        " on a loaded machine): passes first-pass .. passes-1 count."
    )  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="Training runs at a time (1 thread each).")
    p.add_argument("--plot", type=Path, default=None, help="PNG of AUC against latency (default OUT/auc_latency.png).")
    args = p.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    schema = Schema.load(args.data)
    n_fields = len(schema.names)
    ks = [n_fields if k == "all" else int(k) for k in args.ks.split(",")]
    commands: list[str] = []

    jobs = []
    for method in METHODS:
        for seed in seeds:
            d = out / "select" / f"{method}-s{seed}"
            if not (d / "selection.json").exists():
                d.mkdir(parents=True, exist_ok=True)
                jobs.append((select_cmd(args, method, seed, d), d / "log.txt"))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda j: run(*j, commands), jobs))
    selections = {
        m: [json.loads((out / "select" / f"{m}-s{s}" / "selection.json").read_text()) for s in seeds] for m in METHODS
    }
    t2, t2_stats = table2(selections)

    ft_seeds = [int(s) for s in args.finetune_seeds.split(",")]
    if not set(ft_seeds) <= set(seeds):
        p.error(f"--finetune-seeds {ft_seeds} must be among --seeds {seeds}")
    seed_ks = ks if args.seed_ks is None else [n_fields if k == "all" else int(k) for k in args.seed_ks.split(",")]
    if not set(seed_ks) <= set(ks):
        p.error(f"--seed-ks {seed_ks} must be among --ks {ks}")
    seed_methods = ("all", *args.seed_methods.split(","))
    jobs, runs = [], []
    for seed in ft_seeds:
        for k in ks if seed == ft_seeds[0] else seed_ks:
            for method in METHODS if k < n_fields else ("all",):
                if seed != ft_seeds[0] and method not in seed_methods:
                    continue
                sel = out / "select" / f"{'fscd' if method == 'all' else method}-s{seed}"
                d = out / "finetune" / (f"{method}-k{k}" + (f"-s{seed}" if seed else ""))
                runs.append((method, k, d, seed))
                if not (d / "test.json").exists():
                    d.mkdir(parents=True, exist_ok=True)
                    jobs.append((finetune_cmd(args, sel, k, d, seed), d.parent / f"{d.name}.log"))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda j: run(*j, commands), jobs))

    # latency passes alternate the order of the runs; each run keeps its fastest pass (a shared machine's load
    # only ever slows a pass down). --cost-first-seed: only the first fine-tune seed's runs are timed.
    timed = [r for r in runs if not args.cost_first_seed or r[3] == ft_seeds[0]]
    if not 0 <= args.first_pass < args.passes:
        p.error(f"--first-pass {args.first_pass} must lie in [0, --passes {args.passes})")
    numbers = range(args.first_pass, args.passes)
    passes = [[measure(args, d, n) for _, _, d, _ in timed[:: 1 if n % 2 == 0 else -1]] for n in numbers]
    cost = {
        d: [p[i] if n % 2 == 0 else p[-1 - i] for n, p in zip(numbers, passes, strict=True)]
        for i, (*_, d, _) in enumerate(timed)
    }
    rows = []
    for method, k, d, seed in runs:
        summary = json.loads((d / "test.json").read_text())
        lat: dict = {}
        if d in cost:
            got = cost[d]
            lat = {key: min(g[key] for g in got) for key in ("latency_p50_ms", "latency_p99_ms", "cpu_ms_per_request")}
            lat["latency_p50_ms_passes"] = [g["latency_p50_ms"] for g in got]
            lat["cpu_rate_achieved"] = min(g["cpu_rate_achieved"] for g in got)
        rows.append(
            {
                "method": method,
                "k": k,
                "k_label": "all" if k == n_fields else str(k),
                "seed": seed,
                "features": summary["features"],
                "n_cross": sum(schema[f].tower == "cross" for f in summary["features"]),
                "auc": summary["test"]["auc"],
                "gauc": summary["test"].get("gauc"),
                "epochs": summary["epochs"],
                **lat,
            }
        )
        print(f"{method} K={k} seed {seed}: AUC {rows[-1]['auc']:.4f}", flush=True)
    agg = aggregate(rows)
    t3 = table3(agg)
    png = args.plot or out / "auc_latency.png"
    plot(agg, png, f"{Schema.load(args.data).name}: pre-ranker on the top K fields of each selector")
    atomic_write_text(out / "tables.md", f"### Table 2 analog\n\n{t2}\n\n### Table 3 analog\n\n{t3}\n")
    atomic_write_text(
        out / "results.json",
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "table2": t2_stats, "table3": agg, "runs": rows},
            indent=2,
        ),
    )
    with (out / "commands.txt").open("a") as fh:
        fh.writelines(c + "\n" for c in commands)
    print(t2, "\n", t3, sep="\n")


if __name__ == "__main__":
    main()
