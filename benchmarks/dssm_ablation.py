"""The distilled DSSM's ablation (issue 23, Taobao report "Offline experiments"): test GAUC per row, in per mille
against the plain DSSM, mean ± std over seeds. Every row is one `prerank` command (printed with the table).

    PYTHONPATH=src .venv/bin/python benchmarks/dssm_ablation.py --data DIR --out DIR [--teacher CKPT]
        [--seeds 3] [--jobs 2] [--threads 1] [--epochs 20] [--patience 3] [--rows plain,mlp,...]

DATA needs a ``teacher_logit`` column for the two-stage rows (`prerank teacher fit`, then
`prerank teacher score --out-of-fold 5`); TEACHER (the `teacher fit` checkpoint) warm-starts the teacher of
the synchronous rows, whose variant "teacher attention frozen" needs a trained teacher. Rows are cumulative
as in the report: plain DSSM, + MLP head, + FM cross, + distillation (stage 1, stages 1+2), + NOVA, + SENET,
+ bilinear (= everything); plus the full network on hard labels only and the synchronous variants.
On a dataset without a behaviour sequence (ML-1M ``paper``) the FM cross, NOVA and the teacher's user attention
have no input: their rows are "not applicable" and every other row runs with ``use_fm=false`` and
``use_nova=false`` (the distillation rows then distil ``dssm_mlp``).
Finished runs (their ``test.json``) are reused, so the script resumes. Writes OUT/results.json and
OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prerank.evaluate.report import mean_std
from prerank.models.base import ConfigError
from prerank.models.distilled_dssm import DistilledDSSM, DistilledDSSMConfig
from prerank.schema import Schema

#: What every run shares: early stopping on valid GAUC (the table's metric), at most --epochs epochs (each stage
#: of a two-stage run), patience --patience; listwise-batched runs (two-stage) take 16 requests a batch.
COMMON = ["--metric", "gauc", "--no-progress"]
#: Without a behaviour sequence: the options that switch off the parts needing one, per flag of the student
NO_HISTORY = ("use_fm=false", "use_nova=false")
TWO_STAGE = ["distill", "two-stage", "--requests-per-batch", "16"]
SYNC = ["distill", "sync", "--student", "distilled_dssm"]

#: row -> (label, run name, command after `prerank`, key path of the test metrics in the run's test.json)
ROWS: dict[str, tuple[str, str, list[str], tuple[str, ...]]] = {
    "plain": ("plain DSSM (dot product)", "plain", ["train", "--model", "dssm_plain"], ("test",)),
    "mlp": ("+ MLP head", "mlp", ["train", "--model", "dssm_mlp"], ("test",)),
    "fm": ("+ FM cross", "fm", ["train", "--model", "dssm_mlp_fm"], ("test",)),
    "stage1": (
        "+ distillation, stage 1 (soft labels; FM off)",
        "two_stage_fm",
        [*TWO_STAGE, "--model", "dssm_mlp_fm"],
        ("stage1", "test"),
    ),
    "stage2": (
        "+ distillation, stages 1+2 (soft + hard; FM on in stage 2)",
        "two_stage_fm",
        [*TWO_STAGE, "--model", "dssm_mlp_fm"],
        ("stage2", "test"),
    ),
    "nova": (
        "+ NOVA (user tower)",
        "two_stage_nova",
        [*TWO_STAGE, "--model", "distilled_dssm", "--model-option", "use_senet=false"]
        + ["--model-option", "use_bilinear=false"],
        ("stage2", "test"),
    ),
    "senet": (
        "+ SENET (item tower)",
        "two_stage_senet",
        [*TWO_STAGE, "--model", "distilled_dssm", "--model-option", "use_bilinear=false"],
        ("stage2", "test"),
    ),
    "all": (
        "+ bilinear = everything (distilled_dssm, two-stage)",
        "two_stage_all",
        [*TWO_STAGE, "--model", "distilled_dssm"],
        ("stage2", "test"),
    ),
    "all_hard": (
        "everything but distillation (distilled_dssm on hard labels)",
        "all_hard",
        ["train", "--model", "distilled_dssm"],
        ("test",),
    ),
    "sync": (
        "synchronous distillation (student -> embeddings on, teacher attention trains)",
        "sync",
        SYNC,
        ("test",),
    ),
    "sync_block": (
        "synchronous, student -> embeddings off",
        "sync_block",
        [*SYNC, "--no-student-updates-embeddings"],
        ("test",),
    ),
    "sync_frozen": (
        "synchronous, teacher attention frozen",
        "sync_frozen",
        [*SYNC, "--no-teacher-updates-attention"],
        ("test",),
    ),
    "sync_block_frozen": (
        "synchronous, student -> embeddings off, teacher attention frozen",
        "sync_block_frozen",
        [*SYNC, "--no-student-updates-embeddings", "--no-teacher-updates-attention"],
        ("test",),
    ),
}
BASE = "plain"
#: rows whose part needs the behaviour sequence (not applicable without one): the FM cross, NOVA, and the
#: teacher's user attention (the ranker's DIN over the sequence; without one freezing it changes nothing)
NEEDS_HISTORY = ("fm", "nova", "sync_frozen", "sync_block_frozen")


def has_history(data: Path) -> bool:
    """Whether DATA has the behaviour sequence the FM cross and NOVA read (ML-1M ``paper`` has none)."""
    config = DistilledDSSMConfig(use_nova=False, use_senet=False, use_bilinear=False)
    try:
        DistilledDSSM(Schema.load(data), config)
    except ConfigError:
        return False
    return True


def row_args(row: str, history: bool) -> tuple[str, list[str]] | None:
    """(run name, command after `prerank`) of ROW; None when it is not applicable."""
    _, run, args, _ = ROWS[row]
    if history:
        return run, args
    if row in NEEDS_HISTORY:
        return None
    if "dssm_mlp_fm" in args:  # the distillation rows: the same recipe on the MLP-head DSSM
        return run.replace("_fm", "_mlp"), [a if a != "dssm_mlp_fm" else "dssm_mlp" for a in args]
    if "distilled_dssm" in args:
        flag = "--student-option" if args[:2] == ["distill", "sync"] else "--model-option"
        return run, args + [x for option in NO_HISTORY for x in (flag, option)]
    return run, args


def command(
    row: str, data: Path, out: Path, seed: int | str, flags: argparse.Namespace, history: bool
) -> list[str] | None:
    found = row_args(row, history)
    if found is None:
        return None
    run, args = found
    cmd = ["prerank", *args, "--data", str(data), "--out", str(out / run / f"seed{seed}")]
    if args[:2] == ["distill", "sync"] and flags.teacher is not None:
        cmd += ["--teacher-init", str(flags.teacher)]
    budget = ["--epochs", str(flags.epochs), "--patience", str(flags.patience)]
    return cmd + [*budget, *COMMON, "--seed", str(seed), "--threads", str(flags.threads)]


def run_one(cmd: list[str], log: Path, prerank: str) -> None:
    if (Path(cmd[cmd.index("--out") + 1]) / "test.json").exists():
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with log.open("w") as fh:
        rc = subprocess.call([prerank, *cmd[1:]], stdout=fh, stderr=subprocess.STDOUT)
    print(f"{'ok' if rc == 0 else f'FAILED ({rc})'} in {time.time() - t0:.0f}s: {shlex.join(cmd)}", flush=True)


def metric(
    out: Path, row: str, seed: int, history: bool, key: str = "gauc", path: tuple[str, ...] | None = None
) -> float | None:
    """A test metric of a finished run (None if not run); ``path`` overrides the row's key path in test.json."""
    found = row_args(row, history)
    if found is None:
        return None
    file = out / found[0] / f"seed{seed}" / "test.json"
    if not file.exists():
        return None
    where = ROWS[row][3]
    value = json.loads(file.read_text())
    for k in path or where:
        if k not in value:
            return None
        value = value[k]
    return float(value[key])


def table(out: Path, rows: list[str], seeds: list[int], history: bool) -> tuple[str, list[dict]]:
    base = {s: metric(out, BASE, s, history) for s in seeds}
    lines = ["| row | seeds | test GAUC | Δ GAUC vs plain (‰) | test AUC | its teacher's test AUC |"]
    lines.append("|---|---|---|---|---|---|")
    records = []
    for row in rows:
        gauc = {s: metric(out, row, s, history) for s in seeds}
        done = [s for s in seeds if gauc[s] is not None]
        auc = [metric(out, row, s, history, "auc") for s in done]
        # the synchronous rows train their own teacher: its test AUC beside the student's
        teacher = [t for s in done if (t := metric(out, row, s, history, "auc", ("teacher_test",))) is not None]
        # per-seed differences: the same seed's plain DSSM is the baseline of each run
        delta = [1000 * (gauc[s] - base[s]) for s in done if base[s] is not None]
        g, gs, n = mean_std([gauc[s] for s in done])
        d, ds, nd = mean_std(delta)
        a, as_, _ = mean_std(auc)
        records.append({"row": row, "label": ROWS[row][0], "seeds": done, "gauc": [gauc[s] for s in done]})
        records[-1] |= {"auc": auc, "delta_permille": delta, "teacher_auc": teacher}
        if row_args(row, history) is None:
            lines.append(f"| {ROWS[row][0]} | | not applicable (no behaviour sequence) | | | |")
            continue
        if not n:
            lines.append(f"| {ROWS[row][0]} | 0 | not run | | | |")
            continue
        t, ts, nt = mean_std(teacher)
        cells = [
            f"{g:.4f} ± {gs:.4f}",
            f"{d:+.1f} ± {ds:.1f}" if nd else "",
            f"{a:.4f} ± {as_:.4f}",
            f"{t:.4f} ± {ts:.4f}" if nt else "",
        ]
        lines.append(f"| {ROWS[row][0]} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines), records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher", type=Path, default=None, help="teacher checkpoint warm-starting the sync rows")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--epochs", type=int, default=20, help="at most this many epochs per run (per stage)")
    p.add_argument("--patience", type=int, default=3, help="early stopping on valid GAUC")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--table-only", action="store_true", help="only assemble the table from finished runs")
    p.add_argument("--prerank", default=str(Path(sys.executable).with_name("prerank")), help="the prerank CLI")
    args = p.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    seeds = list(range(args.seeds))
    history = has_history(args.data)
    if not args.table_only:
        # one run per (run name, seed), seed by seed: stage1 and stage2 rows read the same two-stage run
        jobs: dict[tuple[str, int], list[str]] = {}
        for seed in seeds:
            for row in [BASE, *rows]:
                if (cmd := command(row, args.data, args.out, seed, args, history)) is not None:
                    jobs.setdefault((cmd[cmd.index("--out") + 1], seed), cmd)
        with ThreadPoolExecutor(args.jobs) as pool:
            for (run, seed), cmd in jobs.items():
                name = Path(run).parent.name
                pool.submit(run_one, cmd, args.out / "logs" / f"{name}-seed{seed}.log", args.prerank)
    text, records = table(args.out, rows, seeds, history)
    commands = "\n".join(
        shlex.join(cmd) for r in rows if (cmd := command(r, args.data, args.out, "S", args, history)) is not None
    )
    report = f"{text}\n\nCommands (S = 0..{args.seeds - 1}):\n\n```\n{commands}\n```\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(report)
    (args.out / "results.json").write_text(json.dumps(records, indent=2))
    print(report)


if __name__ == "__main__":
    main()
