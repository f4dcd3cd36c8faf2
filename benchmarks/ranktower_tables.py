"""Regenerate RankTower's Tables 1-4 (Sec. 4.2-4.3) on a simulated cascade, from a clean checkout, in one command.

    python benchmarks/ranktower_tables.py --dataset taobao --work /tmp/rt-taobao --out docs/ranktower/taobao.md
    python benchmarks/ranktower_tables.py --dataset ml-1m --work /tmp/rt-ml1m --out docs/ranktower/ml1m.md

Every step is a ``prerank`` command (listed in ``WORK/commands.txt`` as it runs) and is skipped when its output
exists, so a run stopped at any point resumes where it stopped (``compare --resume`` keeps finished seeds and grid
points):

1. data: ``prerank data prepare`` (Taobao UserBehavior, or ML-1M ``temporal``; ML-100K ``temporal`` checks the
   whole script in minutes) from ``--raw``;
2. teacher: ``prerank teacher fit`` with ``--teacher-option`` (model options) and ``--teacher-arg`` (command
   options), the ranking teacher of issue 21 (Taobao: ``--taobao-teacher`` sets the ensemble chosen there);
3. cascade: ``prerank cascade build`` with the revised defaults (rank cut below the impressions, popularity
   matched to impressions, cold items sampled like unknown impressions) and ``prerank cascade baselines``;
4. stage mix (where ``--stage-mix-grid`` has more than one mix): a list over ``--max-list-len`` keeps a share of
   each tier (clicked / unclicked impressions, rank and pre-rank candidates, random items), and the mix that sets
   the shares is chosen on valid once, in ``t0-stage_mix`` (RankTower + hybrid loss, the table's grid times the
   mixes, one seed); every list-trained row then trains on that mix, so all rows of a table see the same lists
   (default: ``own,even`` on ML-1M, whose cap drops 45% of the training rows; ``own`` on Taobao, where it drops
   3.7%);
5. tables, one ``prerank compare`` per group of rows, every row with the same budget: the same ``--grid`` tuned on
   valid (first seed), then a second stage on top of its best point for the loss's own settings (``compare
   --then-grid``: the hybrid loss's weight lambda and SoftSort temperature tau, ``--hybrid-grid``; a single
   loss's temperature, ``--temperature-grid``, where it has one), early stopping
   on the valid listwise metric ``--metric`` with patience ``--patience``, then seeds ``0 .. S-1`` on test:

   * Table 1: every pre-ranker with the pointwise loss (``bce`` over all cascade rows) and with the hybrid loss
     (Eq. 15) on full-stage request lists; ARF = Two-Tower with the ARF loss;
   * Table 2: RankTower + hybrid loss with the training stages of Sec. 4.3.1;
   * Table 3: RankTower with each ranking loss of Sec. 4.3.2;
   * Table 4: RankTower + hybrid loss with each distillation part of Sec. 4.3.3, and none;

6. assemble: one Markdown file, the scorers that learn nothing first (item popularity, the teacher itself), then
   every row with its seeds, its tuned setting and Recall / NDCG at 10, 50 and 100 (relevance: the hard label, our
   reading of the paper's), cascade recall, GAUC and exposure AUC, mean +- std over seeds.

``--tables 1`` or ``--models`` restrict what is run; ``--dry-run`` prints the commands only; ``--assemble-only``
writes the tables of the runs finished so far (a row not run yet says so) and runs nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _process import Runner, flags  # benchmarks/ is on sys.path when a script runs

from prerank.evaluate.report import mean_std
from prerank.io import atomic_write_text

RECIPES = {
    "taobao": ("taobao-user-behavior", "../shared/data/taobao-user-behavior", []),
    "ml-1m": ("ml-1m", "../shared/data/ml-1m", ["--protocol", "temporal"]),
    "ml-100k": ("ml-100k", "../shared/data/ml-100k", ["--protocol", "temporal"]),  # a check of the script in minutes
}
MODELS = ("lr", "two_tower", "dat", "cold", "int_tower", "fit", "rank_tower")
#: The Taobao teacher of issue 21 (docs/results.md, "Ranking teacher"): an ensemble of 5 rankers chosen on valid.
TAOBAO_TEACHER = [
    "--ensemble=5", "--patience=1", "--model-option=target_attention=false", "--model-option=hidden=[256,128,64]",
    "--model-option=wide=true", "--model-option=cross_layers=0",
]  # fmt: skip
#: Table 3's losses with a ``temperature`` option (the others' default settings are kept).
TEMPERATURE_LOSSES = ("ranking:softsort", "ranking:softmax", "ranking:approx_ndcg")
#: Where the stage mix of capped lists is chosen (step 4 of the module docstring).
STAGE_MIX_FOLDER = "t0-stage_mix"
STAGES = {"full-stage sampling": "full", "w/o random samples": "no_random", "w/o candidate samples": "no_candidates"}
STAGES["w/o candidate & random samples"] = "no_candidates_random"
LOSSES = {
    "hybrid loss": "hybrid",
    "sorting (SoftSort)": "ranking:softsort",
    "AM-Rankmax": "ranking:am_rankmax",
    "Rankmax": "ranking:rankmax",
    "softmax": "ranking:softmax",
    "ApproxNDCG": "ranking:approx_ndcg",
    "RankNet": "ranking:ranknet",
}
DISTILLATION = {
    "softmax (Eq. 9)": ["--loss-option", "distillation=softmax"],
    "weighted logloss": ["--loss-option", "distillation=logloss"],
    "pairwise logloss": ["--loss-option", "distillation=pairwise"],
    "no distillation": ["--loss-option", "distillation_weight=0"],
}
COLUMNS = (
    "hard_recall@10",
    "hard_recall@50",
    "hard_recall@100",
    "hard_ndcg@10",
    "hard_ndcg@50",
    "hard_ndcg@100",
    "cascade_recall@5/10",
    "gauc",
    "exposure_auc",
)


def _then(grid: list[str]) -> list[str]:
    return [a for g in grid for a in ("--then-grid", g)]


def _lists(args: argparse.Namespace) -> list[str]:
    """``compare`` options of training on whole request lists, capped at ``--max-list-len``."""
    lists = ["--batching", "requests", "--max-list-len", str(args.max_list_len)]
    return [*lists, "--requests-per-batch", str(args.requests_per_batch)]


def _stage_mix(work: Path) -> tuple[str, str] | None:
    """The stage mix chosen in ``t0-stage_mix`` and every mix's valid metric there; None before it has run."""
    path = work / STAGE_MIX_FOLDER / "tuning.json"
    tuning = json.loads(path.read_text()).get("rank_tower", {}) if path.exists() else {}
    if "chosen" not in tuning:
        return None
    chosen = next(p["options"]["stage_mix"] for p in tuning["points"] if p["point"] == tuning["chosen"])
    best: dict[str, float] = {}
    for point in tuning["points"]:
        mix = point["options"]["stage_mix"]
        best[mix] = max(best.get(mix, float("-inf")), point["best_valid"])
    tried = ", ".join(f"{mix} {value:.4f}" for mix, value in best.items())
    return chosen, f"{tuning['metric']} of its best grid point: {tried}"


def _rows(args: argparse.Namespace) -> list[tuple[str, str, str, list[str], list[str]]]:
    """(table, label, compare folder, models, extra compare arguments) of every row group."""
    lists = [*_lists(args), *(["--stage-mix", args.stage_mix] if args.stage_mix != "own" else [])]
    untuned_hybrid = [*lists, "--loss", "hybrid"]
    hybrid = [*untuned_hybrid, *_then(args.hybrid_grid)]
    temperature = _then([f"loss.temperature={args.temperature_grid}"])
    models = [m for m in MODELS if m in args.models]
    rows = [
        ("1", "bce", "t1-bce", models, ["--loss", "bce", "--batching", "rows"]),
        ("1", "hybrid", "t1-hybrid", models, hybrid),
        ("1", "ARF (two_tower + ARF loss)", "t1-arf", ["two_tower"], [*lists, "--loss", "arf", *temperature]),
    ]
    for label, stages in STAGES.items():
        folder = "t1-hybrid" if stages == "full" else f"t2-{stages}"
        rows.append(("2", label, folder, ["rank_tower"], [*hybrid, "--stages", stages]))
    for label, loss in LOSSES.items():
        folder = "t1-hybrid" if loss == "hybrid" else f"t3-{loss.split(':')[-1]}"
        single = [*lists, "--loss", loss, *(temperature if loss in TEMPERATURE_LOSSES else [])]
        rows.append(("3", label, folder, ["rank_tower"], hybrid if loss == "hybrid" else single))
    for label, options in DISTILLATION.items():
        folder = "t1-hybrid" if "softmax" in label else f"t4-{options[1].replace('=', '-')}"
        # without distillation only tau is left to tune (the grid's lambda would overwrite the weight 0)
        tau = [g for g in args.hybrid_grid if g.startswith("loss.sorting_temperature=")]
        tuned = [*untuned_hybrid, *_then(tau)] if "weight=0" in options[1] else hybrid
        rows.append(("4", label, folder, ["rank_tower"], [*tuned, *options]))
    tables = set(args.tables.split(","))
    return [r for r in rows if r[0] in tables and r[3]]


def _cell(values: list) -> str:
    m, s, n = mean_std([v for v in values if v is not None])
    if n == 0:
        return "-"
    return f"{m:.4f} ± {s:.4f}" if n > 1 else f"{m:.4f}"


def assemble(work: Path, rows: list, baselines: dict, max_list_len: int) -> str:
    chosen = _stage_mix(work)
    mix = f"`{chosen[0]}`, chosen on valid ({chosen[1]})" if chosen else "`own` (each list's own mix; not tuned)"
    note = f"Lists over {max_list_len} rows keep the stage mix {mix}.\n\n"
    head = "| row | seeds | tuned on valid | " + " | ".join(COLUMNS) + " |\n|---|---|---|" + "---|" * len(COLUMNS)
    out = []
    for table in sorted({r[0] for r in rows}):
        lines = [f"### Table {table}", "", head]
        for name, m in baselines.items():
            cells = " | ".join(_cell([m.get(c)]) for c in COLUMNS)
            lines.append(f"| {name} (learns nothing) | - | - | {cells} |")
        for t, label, folder, models, _ in rows:
            if t != table:
                continue
            path = work / folder / "results.json"
            records = json.loads(path.read_text()) if path.exists() else []
            for model in models:
                mine = [r for r in records if r["model"] == model and not r.get("is_teacher")]
                name = f"{label} / {model}" if len(models) > 1 else label
                tuned = ", ".join(sorted({r.get("tuned", "-") for r in mine})) or "not run"
                cells = " | ".join(_cell([r.get(c) for r in mine]) for c in COLUMNS)
                lines.append(f"| {name} | {len(mine)} | {tuned} | {cells} |")
        out.append("\n".join(lines))
    return note + "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(RECIPES), required=True)
    p.add_argument("--raw", help="Raw files (default: the dataset's folder under ../shared/data).")
    p.add_argument("--work", type=Path, required=True, help="Data, teacher, cascade and runs go here.")
    p.add_argument("--out", type=Path, help="Markdown file of the tables (default: WORK/tables.md).")
    p.add_argument("--tables", default="1,2,3,4")
    p.add_argument("--models", default=",".join(MODELS), help="Table 1's pre-rankers.")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--grid", action="append", default=None, help="Every row's grid (default lr x weight_decay).")
    p.add_argument(
        "--hybrid-grid", action="append", default=None, help="Hybrid-loss rows' second tuning stage (lambda, tau)."
    )
    p.add_argument("--temperature-grid", default="0.5,2", help="Second stage of single losses with a temperature.")
    p.add_argument("--metric", default="hard_ndcg@10", help="Valid metric for tuning and early stopping.")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20, help="Maximum epochs (early stopping ends most runs first).")
    p.add_argument("--max-list-len", type=int, default=100)
    p.add_argument("--requests-per-batch", type=int, default=64)
    p.add_argument("--stage-mix-grid", help="Stage mixes of capped lists tried on valid (default: see step 4).")
    p.add_argument("--teacher-option", action="append", default=[], help="`prerank teacher fit` options, KEY=VALUE.")
    p.add_argument("--teacher-arg", action="append", default=[], help="e.g. --teacher-arg=--ensemble=5")
    p.add_argument(
        "--taobao-teacher", action="store_true", help="Issue 21's Taobao teacher: " + " ".join(TAOBAO_TEACHER)
    )
    p.add_argument("--cascade-option", action="append", default=[], help="e.g. --cascade-option=--random=100")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--assemble-only", action="store_true", help="Tables of the finished runs; run nothing.")
    args = p.parse_args(argv)
    args.grid = args.grid or ["lr=1e-3,3e-3", "weight_decay=0,1e-5"]
    args.hybrid_grid = args.hybrid_grid or ["loss.distillation_weight=0.5,2", "loss.sorting_temperature=0.5,2"]
    args.models = set(args.models.split(","))
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    run = Runner(work, args.dry_run)
    recipe, raw, recipe_args = RECIPES[args.dataset]
    common = ["--threads", str(args.threads), "--no-progress"]

    data, teacher, cascade = work / "data", work / "teacher.pt", work / "cascade"
    baselines_path = work / "baselines.json"
    if args.assemble_only and not baselines_path.exists():
        p.error(f"nothing to assemble in {work}: no {baselines_path.name} yet")
    if not (data / "schema.json").exists():
        run("data", "prepare", recipe, "--raw", args.raw or raw, "--out", str(data), *recipe_args)
    if not teacher.exists():
        options = [a for o in args.teacher_option for a in ("--model-option", o)]
        extra = flags([*(TAOBAO_TEACHER if args.taobao_teacher else []), *args.teacher_arg])
        run("teacher", "fit", "--data", str(data), "--out", str(teacher), *options, *extra, *common)
    if not (cascade / "schema.json").exists():
        build = ["--data", str(data), "--teacher", str(teacher), "--out", str(cascade)]
        run("cascade", "build", *build, *flags(args.cascade_option), *common)
    if not baselines_path.exists():
        run("cascade", "baselines", "--data", str(cascade), stdout=baselines_path)

    grid = [a for g in args.grid for a in ("--grid", g)]
    stop = ["--metric", args.metric, "--patience", str(args.patience), "--epochs", str(args.epochs)]
    budget = [*stop, "--seeds", str(args.seeds), "--latency-candidates", "0", "--resume"]
    mixes = args.stage_mix_grid or ("own" if args.dataset == "taobao" else "own,even")
    args.stage_mix = mixes
    if "," in mixes:
        if not args.assemble_only and _stage_mix(work) is None:
            hybrid = [*_lists(args), "--loss", "hybrid", *grid, "--grid", f"stage_mix={mixes}"]
            one_seed = [*stop, "--seeds", "1", "--latency-candidates", "0", "--resume"]
            out = ["--models", "rank_tower", "--out", str(work / STAGE_MIX_FOLDER)]
            run("compare", "--data", str(cascade), *out, *hybrid, *one_seed, *common)
        chosen = _stage_mix(work)
        args.stage_mix = chosen[0] if chosen else "CHOSEN_IN_" + STAGE_MIX_FOLDER  # the placeholder: --dry-run
    rows = _rows(args)
    done: set[str] = set()
    for _, _, folder, _, extra in [] if args.assemble_only else rows:
        if folder in done:
            continue
        done.add(folder)
        every = [m for t, _, f, ms, _ in rows if f == folder for m in ms]
        run(
            "compare", "--data", str(cascade), "--models", ",".join(dict.fromkeys(every)), "--out", str(work / folder),
            *extra, *grid, *budget, *common,
        )  # fmt: skip
    if args.dry_run:
        return
    baselines = {k: v for k, v in json.loads(baselines_path.read_text()).items() if isinstance(v, dict)}
    text = assemble(work, rows, baselines, args.max_list_len)
    out = args.out or work / "tables.md"
    atomic_write_text(out, text)
    print(text)


if __name__ == "__main__":
    main()
