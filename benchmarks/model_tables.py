"""Regenerate a dataset's main results table (docs/results.md) with one budget for every model, in one command.

    python benchmarks/model_tables.py --dataset ml-1m-temporal --work /tmp/mt-ml1mt --out docs/tables/ml1m-temporal.md
    python benchmarks/model_tables.py --dataset taobao --work /tmp/mt-taobao --teacher /tmp/teacher/final/tb_s0.pt

Every step is a ``prerank`` command (listed in ``WORK/commands.txt`` as it runs) and is skipped when its output
exists, so a run stopped at any point resumes where it stopped (``compare --resume`` keeps finished seeds and grid
points):

1. data: ``prerank data prepare`` from ``--raw`` (ML-1M ``paper`` or ``temporal``, Taobao UserBehavior), or
   ``prerank data synth --rows 200000`` (the synthetic set of docs/results.md's teacher and distillation sections;
   ``prerank demo`` uses 100,000 rows);
2. one ``prerank compare`` of every model (default: the pre-rankers, the distilled DSSM and FIT's four ablations of
   issue 24, part 5), each tuned on valid on the same grid (``--grid``, first seed: learning rate x weight decay),
   early stopping on valid AUC with patience ``--patience``, then seeds ``0 .. S-1`` on test; the popularity row
   (a scorer that learns nothing) and, with ``--teacher``, the ranking teacher's row beside them;
3. the Markdown table ``compare`` writes (each model's chosen setting in its last column, FIT's meta-vector
   cosine and user-state spread where FIT ran), copied to ``--out`` under the commands that made it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _process import Runner, flags  # benchmarks/ is on sys.path when a script runs

from prerank.io import atomic_write_text

RECIPES = {
    "ml-1m-paper": ["prepare", "ml-1m", "--raw", "../shared/data/ml-1m", "--protocol", "paper"],
    "ml-1m-temporal": ["prepare", "ml-1m", "--raw", "../shared/data/ml-1m", "--protocol", "temporal"],
    "taobao": ["prepare", "taobao-user-behavior", "--raw", "../shared/data/taobao-user-behavior"],
    "synthetic": ["synth", "--rows", "200000", "--seed", "0"],
}
MODELS = ("two_tower", "lr", "dat", "cold", "int_tower", "fit", "rank_tower", "distilled_dssm")
FIT_ABLATIONS = ("fit_no_mqm", "fit_no_lss", "fit_summax", "fit_fc")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(RECIPES), required=True)
    p.add_argument("--raw", type=Path, help="Raw files (default: the dataset's folder under ../shared/data).")
    p.add_argument("--work", type=Path, required=True, help="Data and runs go here.")
    p.add_argument("--out", type=Path, help="Markdown file of the table (default: WORK/table.md).")
    p.add_argument("--models", default=",".join((*MODELS, *FIT_ABLATIONS)))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--grid", action="append", default=None, help="Every model's grid (default lr x weight_decay).")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--teacher", type=Path, help="Ranking teacher checkpoint: its row beside the models.")
    p.add_argument("--teacher-data", type=Path, help="The teacher's feature set of the same log (e.g. `wide`).")
    p.add_argument("--compare-arg", action="append", default=[], help="`compare` option: --compare-arg=--epochs=10")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.teacher_data and not args.teacher:
        p.error("--teacher-data needs --teacher")
    for path in (args.teacher, args.raw):
        if path is not None and not path.exists():
            p.error(f"{path} does not exist")
    grid = args.grid or ["lr=1e-3,3e-3", "weight_decay=0,1e-5"]
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    run = Runner(work, args.dry_run)
    common = ["--threads", str(args.threads), "--no-progress"]

    data, runs = work / "data", work / "compare"
    if not (data / "schema.json").exists():
        recipe = list(RECIPES[args.dataset])
        if args.raw is not None and "--raw" in recipe:
            recipe[recipe.index("--raw") + 1] = str(args.raw)
        run("data", *recipe, "--out", str(data), "--no-progress")
    teacher = ["--teacher", str(args.teacher)] if args.teacher else []
    teacher += ["--teacher-data", str(args.teacher_data)] if args.teacher_data else []
    budget = [a for g in grid for a in ("--grid", g)] + ["--patience", str(args.patience), "--seeds", str(args.seeds)]
    run(
        "compare", "--data", str(data), "--models", args.models, "--out", str(runs), *budget, "--popularity",
        *teacher, "--latency-candidates", "0", "--resume", *flags(args.compare_arg), *common,
    )  # fmt: skip
    if args.dry_run:
        return
    commands = "".join(dict.fromkeys((work / "commands.txt").read_text().splitlines(keepends=True)))  # resumed: once
    text = f"```bash\n{commands}```\n\n{(runs / 'results.md').read_text()}"
    atomic_write_text(args.out or work / "table.md", text)
    print(text)


if __name__ == "__main__":
    main()
