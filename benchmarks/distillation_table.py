"""Issue 21, part 4: does the teacher teach? One distillation table for a prepared dataset, in one command.

    python benchmarks/distillation_table.py --data data/ml1m-temporal --work /tmp/d4-ml1m \\
        --teacher-data data/ml1m-temporal-wide --out docs/distillation/ml1m-temporal.md

Every step is a ``prerank`` command (listed in ``WORK/commands.txt`` as it runs) and is skipped when its output
exists, so a run stopped at any point resumes where it stopped (``compare --resume`` keeps finished seeds):

1. teacher: ``prerank teacher fit`` on ``--teacher-data`` (the same log with ranker-only fields, e.g. ``prepare
   --features wide``) or on DATA, with ``--teacher-arg`` options (e.g. ``--teacher-arg=--ensemble=3``);
2. honest teacher logits: DATA is copied to ``WORK/oof`` and ``prerank teacher score --out-of-fold K`` writes the
   teacher's logits into the copy: each train row scored by a fold teacher that never trained on it, valid and test
   by the teacher (``--fold-arg`` passes options to the fold teachers, e.g. ``--fold-arg=--patience=1``);
3. students (``prerank compare``, ``--seeds`` seeds, the teacher's own row beside them, ``--compare-arg`` for all):

   * ``default``: hard labels, BCE, the default row batches, on DATA (the students' usual training);
   * ``hard``: ``distill:soft_hard`` with ``hard_weight`` 1, hard labels only, on whole requests as below;
   * ``teacher``: ``hard_weight`` 0, the teacher's labels only (weighted logloss, per-list mean);
   * ``both``: ``hard_weight`` chosen on valid (first seed) from ``--weights``;

4. one Markdown table: each student x training, test AUC / GAUC / logloss and RelaImpr against the teacher, mean +-
   std over seeds, its best valid AUC, and for ``both`` the weight chosen and every weight's valid AUC.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _process import Runner, flags  # benchmarks/ is on sys.path when a script runs

from prerank.evaluate.report import mean_std
from prerank.io import atomic_write_text

STUDENTS = ("two_tower", "dat", "cold", "int_tower", "fit", "rank_tower")
#: (folder, label, training options) of each way to train the students.
SOFT_HARD = ["--loss", "distill:soft_hard"]
TRAININGS = (
    ("default", "hard labels, BCE, row batches (default training)", []),
    ("hard", "hard labels only (hard_weight 1)", [*SOFT_HARD, "--loss-option", "hard_weight=1"]),
    ("teacher", "teacher labels only (hard_weight 0)", [*SOFT_HARD, "--loss-option", "hard_weight=0"]),
    ("both", "both", SOFT_HARD),
)


def _cell(values: list[float], digits: int = 4) -> str:
    m, s, n = mean_std(values)
    if n == 0:
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def assemble(work: Path, students: list[str]) -> str:
    """The table of every finished run in ``work`` (a student or training not run yet says so)."""
    records = {}
    for folder, _, _ in TRAININGS:
        path = work / folder / "results.json"
        records[folder] = json.loads(path.read_text()) if path.exists() else []
    head = "| student | trained on | seeds | test AUC | test GAUC | test logloss | RelaImpr % vs teacher | best valid |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for student in students:
        for folder, label, _ in TRAININGS:
            mine = [r for r in records[folder] if r["model"] == student and not r.get("is_teacher")]
            if folder == "both" and mine:
                tuning = json.loads((work / folder / "tuning.json").read_text())[student]
                points = tuning["points"]
                tried = ", ".join(f"{p['options']['loss.hard_weight']:g}: {p['best_valid']:.4f}" for p in points)
                label = f"both, {tuning['chosen']} (valid: {tried})"
            if not mine:
                lines.append(f"| {student} | {label} | 0 | not run | | | | |")
                continue
            cells = [_cell([r[k] for r in mine]) for k in ("auc", "gauc", "logloss")]
            relaimpr = _cell([r["relaimpr_teacher"] for r in mine if r.get("relaimpr_teacher") is not None], 2)
            lines.append(
                f"| {student} | {label} | {len(mine)} | {' | '.join(cells)} | {relaimpr} | "
                f"{_cell([r['best_valid'] for r in mine])} ({mine[0]['valid_metric']}) |"
            )
    teacher = next((r for rs in records.values() for r in rs if r.get("is_teacher")), None)
    if teacher:
        cells = " | ".join(f"{teacher[k]:.4f}" for k in ("auc", "gauc", "logloss"))
        lines.append(f"| {teacher['model']} | - | 1 | {cells} | 0 | - |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="The students' prepared dataset.")
    p.add_argument("--teacher-data", type=Path, help="The teacher's feature set of the same log (default: DATA).")
    p.add_argument("--work", type=Path, required=True, help="Teacher, out-of-fold copy and runs go here.")
    p.add_argument("--out", type=Path, help="Markdown file of the table (default: WORK/table.md).")
    p.add_argument("--students", default=",".join(STUDENTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--folds", type=int, default=5, help="K of the out-of-fold teacher logits.")
    p.add_argument("--weights", default="0.1,0.25,0.5,0.75", help="hard_weight values tried on valid for `both`.")
    p.add_argument("--teacher-arg", action="append", default=[], help="`teacher fit` option, e.g. --ensemble=3")
    p.add_argument("--fold-arg", action="append", default=[], help="`teacher score` option: --fold-arg=--patience=1")
    p.add_argument("--compare-arg", action="append", default=[], help="`compare` option: --compare-arg=--epochs=10")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    for path in (args.data, args.teacher_data):
        if path is not None and not (path / "schema.json").exists():
            p.error(f"{path} is not a prepared dataset (no schema.json); run `prerank data prepare` first")
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    run = Runner(work, args.dry_run)
    common = ["--threads", str(args.threads), "--no-progress"]
    teacher_data = ["--features-from", str(args.teacher_data)] if args.teacher_data else []

    teacher, oof = work / "teacher.pt", work / "oof"
    if not teacher.exists():
        fit_data = str(args.teacher_data or args.data)
        run("teacher", "fit", "--data", fit_data, "--out", str(teacher), *flags(args.teacher_arg), *common)
    if not (oof / "schema.json").exists():
        partial = work / "oof.partial"  # scored in a copy, renamed when done: a stopped run starts it again
        if not args.dry_run:
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(args.data, partial)
        score = ["--teacher", str(teacher), "--data", str(partial), "--out-of-fold", str(args.folds)]
        run("teacher", "score", *score, *teacher_data, *flags(args.fold_arg), *common)
        if not args.dry_run:
            partial.rename(oof)

    students = args.students.split(",")
    compare = ["--models", ",".join(students), "--seeds", str(args.seeds), "--teacher", str(teacher)]
    compare += ["--teacher-data", str(args.teacher_data)] if args.teacher_data else []
    compare += ["--latency-candidates", "0", "--resume", *flags(args.compare_arg), *common]
    for folder, _, options in TRAININGS:
        data = args.data if folder == "default" else oof
        grid = ["--grid", f"loss.hard_weight={args.weights}"] if folder == "both" else []
        run("compare", "--data", str(data), "--out", str(work / folder), *options, *grid, *compare)
    if args.dry_run:
        return
    text = assemble(work, students)
    atomic_write_text(args.out or work / "table.md", text)
    print(text)


if __name__ == "__main__":
    main()
