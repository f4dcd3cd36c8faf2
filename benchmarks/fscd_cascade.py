"""FSCD's Table 4 analog (issue 22): recall of the ranker's top 5 among each pre-ranker's top N, and offline AUC.

FSCD (Ma et al., SIGIR 2021) Sec. 3.3 / Table 4: the ranking model's top-5 items of a request are the target; a
pre-ranker's "recall rate" is the share of them it keeps in its own output (:func:`prerank.evaluate.metrics.
cascade_recall`); AUC is on the logged labels. Compared there: the vector-product model, COLD and FSCD.

**Reading (the analog on the logged lists).** A request's candidates are its *logged* rows of the test split (on
ML-1M ``temporal`` a request is a user's test-period ratings), not the output of a retrieval stage: the cascade
simulator (:mod:`prerank.data.cascade`) adds unlogged candidates, but it cannot compute a wide set's cross fields
for them (they are recipe functions of the (user, item) pair at the row's time; padding them would let a model
read the stage off a zero, so the builder drops them), and cross fields are what FSCD's complexity prior is
about. On logged rows every field exists, leak-free, as in Tables 2 and 3. The ranker is the FSCD paper's ranking
model, ``fscd_ranker`` (Sec. 3.1: an MLP 1024-512-256 over every field), trained on the same training split. A
request counts for recall@(5, N) only when it has more than N rows (with N or fewer the pre-ranker passes
everything on); the expected recall of a random order over the same requests, mean(N / L), is the floor.

**On the cascade simulator** (``--cascade C``): C is a cascade dataset built from ``--data`` with the ranker as
teacher and ``--cross compute`` (``prerank cascade build``: every cross field of a simulated candidate computed from
its anchor impression's past-only / out-of-fold sources, :mod:`prerank.data.recipes.movielens_pairs`). Recall is
then measured over each test request's whole simulated list (impressions, retrieved items, random items), and
the top 5 are the ranker's over that list; AUC stays on the logged test rows of ``--data``. The models are the
same checkpoints, trained on the logged training rows only.

Runs (each skipped when its test.json exists): ``prerank train`` of ``fscd_ranker`` (``--ranker-seed``) and of
``two_tower`` and ``cold`` (``--seeds``), all with the same epoch budget (``--epochs``); the FSCD pre-rankers are
the fine-tuned runs of ``benchmarks/fscd_tables.py`` (``--tables``: its OUT; every ``finetune/*/test.json``,
grouped by method and K, seeds averaged).

    python benchmarks/fscd_cascade.py --data /tmp/fscd/ml1m-wide --tables /tmp/fscd/bench-ml1m \\
        --out /tmp/fscd/cascade-ml1m

    prerank cascade build --data /tmp/fscd/ml1m-wide --teacher RANKER.pt --out /tmp/fscd/ml1m-wide-cascade \
        --cross compute --raw ../shared/data/ml-1m --rank-cut teacher_top --unknown-items skip \
        --retrieve 100 --rank-candidates 50 --prerank-candidates 50 --random 50
    python benchmarks/fscd_cascade.py --data /tmp/fscd/ml1m-wide --tables /tmp/fscd/bench-ml1m \
        --out /tmp/fscd/cascade-sim-ml1m --cascade /tmp/fscd/ml1m-wide-cascade --ns 10,20,50

Writes OUT/table4.md, OUT/results.json (every number) and OUT/commands.txt (every command run). A rerun into the
same OUT (same ``--cascade``, ``--ns`` and ranker) reuses the rows of OUT/results.json and scores only new runs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fscd_tables import LABELS, prerank, run

from prerank.evaluate import metrics
from prerank.io import atomic_write_text
from prerank.schema import STAGES, Schema

BASELINES = {"two_tower": "Two-Tower (vector product)", "cold": "COLD"}
RANKER = "fscd_ranker"


def train_cmd(args: argparse.Namespace, model: str, seed: int, out: Path) -> list[str]:
    cmd = prerank() + ["train", "--model", model, "--data", str(args.data), "--out", str(out)]
    cmd += ["--epochs", str(args.epochs), "--seed", str(seed), "--threads", "1", "--no-progress"]
    if args.patience is not None:
        cmd += ["--patience", str(args.patience)]
    if args.weight_decay:  # `prerank train` takes it from a run file
        config = args.out / "train" / f"weight-decay-{args.weight_decay:g}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config, f"train: {{weight_decay: {args.weight_decay!r}}}\n")
        cmd += ["--config", str(config)]
    return cmd


def scores(run_dir: Path, data: Path) -> dict[str, np.ndarray]:
    """Test-split logits of a run's best checkpoint, with the rows' labels and request ids."""
    from prerank.train.checkpoint import load_model
    from prerank.train.trainer import predict

    checkpoint = json.loads((run_dir / "test.json").read_text())["checkpoint"]
    _, model, _ = load_model(checkpoint)
    return predict(model, data, "test")


def random_floor(groups: np.ndarray, n: int) -> float:
    """Expected recall@(k, n) of a random order: n / L averaged over the requests longer than n."""
    _, sizes = np.unique(groups, return_counts=True)
    return float(np.mean(n / sizes[sizes > n]))


def composition(ref: dict[str, np.ndarray]) -> dict:
    """Sizes of the simulated lists and the stages of the ranker's top 5 (share of those slots per stage)."""
    groups, stage = ref["request_id"], ref["stage"]
    _, sizes = np.unique(groups, return_counts=True)
    order = np.lexsort((-ref["logits"], groups))
    first = np.r_[0, np.flatnonzero(np.diff(groups[order])) + 1]
    pos = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    top = stage[order][pos < 5]
    return {
        "requests": len(sizes),
        "list_size": {"median": float(np.median(sizes)), "min": int(sizes.min()), "max": int(sizes.max())},
        "rows_per_stage": {s: int((stage == i).sum()) for i, s in enumerate(STAGES)},
        "ranker_top5_stage_share": {s: round(float((top == i).mean()), 4) for i, s in enumerate(STAGES)},
    }


def finetuned_runs(tables: Path) -> list[tuple[str, int, int, Path]]:
    """``(method, K, seed, run dir)`` of every fine-tuned pre-ranker under ``tables/finetune``."""
    found = []
    for test in sorted((tables / "finetune").glob("*/test.json")):
        m = re.fullmatch(r"(\w+?)-k(\d+)(?:-s(\d+))?", test.parent.name)
        if m is None:
            raise ValueError(f"unexpected fine-tune run name {test.parent}")
        found.append((m[1], int(m[2]), int(m[3] or 0), test.parent))
    if not found:
        raise FileNotFoundError(f"no fine-tuned runs under {tables / 'finetune'}; run benchmarks/fscd_tables.py")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="The wide dataset fscd_tables.py ran on.")
    p.add_argument("--tables", type=Path, required=True, help="fscd_tables.py's OUT (its fine-tuned pre-rankers).")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2", help="Seeds of two_tower and cold.")
    p.add_argument("--ranker-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3, help="Epochs of the ranker and the baselines.")
    p.add_argument("--patience", type=int, help="Early stopping patience of those runs (default: prerank train's).")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Weight decay of those runs (Taobao: 1e-3).")
    p.add_argument("--ns", default="10,20", help="Pre-ranker output sizes N of recall@(5, N).")
    p.add_argument("--jobs", type=int, default=2, help="Training runs at a time (1 thread each).")
    p.add_argument("--cascade", type=Path, help="A cascade dataset of --data (ranker as teacher, --cross compute): "
                   "recall over its test requests' simulated lists instead of the logged ones.")  # fmt: skip
    p.add_argument("--methods", default="fscd,dropout_fr,dfs,all", help="Fine-tuned pre-rankers to include.")
    args = p.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    ns = [int(n) for n in args.ns.split(",")]
    n_fields = len(Schema.load(args.data).names)
    commands: list[str] = []

    ranker_dir = out / "train" / f"{RANKER}-s{args.ranker_seed}"
    runs = [(m, 0, s, out / "train" / f"{m}-s{s}") for m in BASELINES for s in map(int, args.seeds.split(","))]
    jobs = [
        (train_cmd(args, model, seed, d), d.parent / f"{d.name}.log")
        for model, _, seed, d in [(RANKER, 0, args.ranker_seed, ranker_dir), *runs]
        if not (d / "test.json").exists()
    ]
    for _, log in jobs:
        log.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda j: run(*j, commands), jobs))
    wanted = set(args.methods.split(","))
    runs += [r for r in finetuned_runs(args.tables) if r[0] in wanted]

    logged_ref = scores(ranker_dir, args.data)
    ranker_auc = metrics.auc(logged_ref["label"], logged_ref["logits"])
    ref = scores(ranker_dir, args.cascade) if args.cascade else logged_ref
    groups = ref["request_id"]
    extra = {}
    if args.cascade:
        # the cascade's teacher must be this ranker: its stored logits are the ones recall is measured against
        gap = float(np.max(np.abs(ref["teacher_logit"] - ref["logits"])))
        if gap > 1e-3:
            raise RuntimeError(f"{args.cascade} was built with another teacher than {ranker_dir} (logit gap {gap})")
        extra = composition(ref)
        print(f"lists: {extra}", flush=True)
    # rows of an earlier run into the same OUT (same lists, same N) are reused, so adding seeds scores only them
    done = {}
    previous = out / "results.json"
    if previous.exists():
        prev = json.loads(previous.read_text())
        same = prev.get("cascade") == (str(args.cascade) if args.cascade else None) and prev["args"]["ns"] == args.ns
        same &= prev["ranker"]["run"] == str(ranker_dir)
        done = {(r["method"], r["k"], r["seed"]): r for r in prev["runs"]} if same else {}
    rows = []
    for method, k, seed, d in runs:
        if (method, k, seed) in done:
            rows.append(done[(method, k, seed)])
            continue
        logged = scores(d, args.data)
        pred = scores(d, args.cascade) if args.cascade else logged
        if not (np.array_equal(pred["request_id"], groups) and np.array_equal(pred["label"], ref["label"])):
            raise RuntimeError(f"{d}: test rows come in another order than the ranker's")
        auc = metrics.auc(logged["label"], logged["logits"])
        row = {"method": method, "k": k, "seed": seed, "run": str(d), "auc": auc}
        for n in ns:
            got = metrics.cascade_recall(ref["logits"], pred["logits"], groups, k=5, n=n)
            row[f"recall@{n}"] = got.value
            row[f"requests@{n}"] = got.n_groups_used
        rows.append(row)
        recalls = " ".join(f"R@{n} {row[f'recall@{n}']:.4f}" for n in ns)
        print(f"{method} K={k} s{seed}: AUC {row['auc']:.4f} {recalls}", flush=True)

    groups_of: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups_of.setdefault((r["method"], r["k"]), []).append(r)
    keys = ["auc"] + [f"recall@{n}" for n in ns]
    agg = []
    for (method, k), rs in groups_of.items():
        a = {"method": method, "k": k, "seeds": len(rs)}
        for key in keys:
            values = [r[key] for r in rs]
            a[key], a[f"{key}_std"] = statistics.fmean(values), statistics.stdev(values) if len(rs) > 1 else 0.0
        agg.append(a)

    def cell(a: dict, key: str) -> str:
        return f"{a[key]:.4f}" + (f" ± {a[key + '_std']:.4f}" if a["seeds"] > 1 else "")

    requests = {n: rows[0][f"requests@{n}"] for n in ns}
    head = " | ".join(f"recall@(5, {n}) [{requests[n]} requests]" for n in ns)
    lines = [f"| pre-ranker | fields | seeds | test AUC | {head} |", "|---|---|---:|---:|" + "---:|" * len(ns)]
    floor = {n: random_floor(groups, n) for n in ns}
    lines.append("| random order | - | - | 0.5 | " + " | ".join(f"{floor[n]:.4f}" for n in ns) + " |")
    for a in agg:
        name = BASELINES.get(a["method"]) or "FSCD pre-ranker, " + (
            "all fields" if a["method"] == "all" else f"{LABELS[a['method']]} top K"
        )
        fields = "all" if a["method"] in BASELINES or a["k"] == n_fields else str(a["k"])
        lines.append(
            f"| {name} | {fields} | {a['seeds']} | {cell(a, 'auc')} | " + " | ".join(cell(a, f"recall@{n}") for n in ns)
            + " |"
        )  # fmt: skip
    ones = " | ".join("1" for _ in ns)
    lines.append(f"| ranker ({RANKER}, the target) | all | 1 | {ranker_auc:.4f} | {ones} |")
    table = "\n".join(lines)
    where = f"simulated lists of {args.cascade}" if args.cascade else "logged lists"
    atomic_write_text(out / "table4.md", f"### Table 4 analog ({where})\n\n{table}\n")
    atomic_write_text(
        out / "results.json",
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "ranker": {"run": str(ranker_dir), "auc": ranker_auc},
                "random_floor": floor,
                "cascade": str(args.cascade) if args.cascade else None,
                "lists": extra,
                "table4": agg,
                "runs": rows,
            },
            indent=2,
        ),
    )
    with (out / "commands.txt").open("a") as fh:
        fh.writelines(c + "\n" for c in commands)
    print(table)


if __name__ == "__main__":
    main()
