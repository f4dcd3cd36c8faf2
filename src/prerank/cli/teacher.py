"""``prerank teacher fit`` and ``prerank teacher score``: the ranking teacher of the cascade.

``fit`` trains the ``ranker`` model (every feature, DIN, a large MLP) on a dataset's impressions
and keeps its best checkpoint; ``score`` writes that teacher's logit into a ``teacher_logit``
column of every row of every split, which the cascade builder and the distillation losses read
(DESIGN.md "The cascade"). With ``--features-from WIDE`` the teacher reads another feature set of the same log
(e.g. ``prepare --features wide``): it scores WIDE's rows and its logits go into DATA's aligned rows.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import typer

from prerank.cli import app
from prerank.cli.common import (
    BatchOpt,
    EpochsOpt,
    LrOpt,
    MaxStepsOpt,
    MetricOpt,
    ModelOptOpt,
    PatienceOpt,
    ProgressOpt,
    SeedOpt,
    ThreadsOpt,
    WeightDecayOpt,
    WorkersOpt,
    console,
    friendly_errors,
    parse_options,
    print_json,
    train_flags,
)
from prerank.data.align import check_aligned, dataset_splits, split_parts
from prerank.data.parquet import ParquetSplit, read_meta, read_row_group, table_to_batch
from prerank.io import atomic_path, atomic_write_text
from prerank.models.base import PreRanker
from prerank.schema import STAGES, Schema, SchemaError

TEACHER_MODEL = "ranker"

teacher_app = typer.Typer(help="Fit the ranking teacher and write its logits into a dataset.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("fit")
@friendly_errors
def fit(
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory (impressions; schema.json + splits)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the teacher checkpoint (.pt)."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Trainer run directory (default: OUT's name + '_run')."),
    model_option: list[str] = ModelOptOpt,
    epochs: int = EpochsOpt,
    batch_size: int = BatchOpt,
    lr: float = LrOpt,
    weight_decay: float = WeightDecayOpt,
    threads: int = ThreadsOpt,
    seed: int = SeedOpt,
    patience: int = PatienceOpt,
    metric: str = MetricOpt,
    max_steps: int = MaxStepsOpt,
    num_workers: int = WorkersOpt,
    progress: bool = ProgressOpt,
    ensemble: int = typer.Option(
        1,
        "--ensemble",
        help="K >= 2: train K rankers one by one (seeds SEED .. SEED+K-1, each early-stopped on valid) and write "
        "one checkpoint of model `ensemble`, whose logit is the mean of the K members' logits.",
    ),
) -> None:
    """Train the ranker on DATA, copy its best checkpoint to OUT, print valid and test AUC."""
    from prerank.train.checkpoint import save_checkpoint
    from prerank.train.config import train_config
    from prerank.train.ensemble import train_ensemble
    from prerank.train.trainer import evaluate_split, train_model

    schema = Schema.load(data)
    if has_candidate_rows(data, schema):
        raise SchemaError(
            f"{data} has rows that are not impressions (a 'stage' column, cascade data): fit the teacher on the "
            "impressions-only dataset the cascade was built from, since its non-impression rows were labelled with a "
            "teacher's help"
        )
    if ensemble < 1:
        raise ValueError(f"--ensemble must be >= 1 (members), got {ensemble}")
    cfg = train_config(train_flags(locals()))
    run_dir = run_dir or out.with_name(out.stem + "_run")
    overrides = parse_options(model_option, "--model-option")
    if ensemble == 1:
        result = train_model(TEACHER_MODEL, data, run_dir, overrides, cfg, log=console.print)
        name, model, epochs = TEACHER_MODEL, result.model, result.epochs
        with atomic_path(out) as tmp:
            shutil.copyfile(result.checkpoint, tmp)
    else:
        model, results = train_ensemble(TEACHER_MODEL, overrides, ensemble, data, run_dir, cfg, log=console.print)
        name, epochs = "ensemble", [r.epochs for r in results]
        save_checkpoint(out, name, model, {"members": [str(r.checkpoint) for r in results]})
    valid = evaluate_split(model, data, "valid", cfg.eval_batch_size)
    test = evaluate_split(model, data, "test", cfg.eval_batch_size)
    print_json(
        {
            "teacher": str(out),
            "model": name,
            "epochs": epochs,
            "valid_auc": valid["auc"],
            "test_auc": test["auc"],
            "valid": valid,
            "test": test,
        }
    )


@teacher_app.command("score")
@friendly_errors
def score(
    teacher: Path = typer.Option(..., "--teacher", "-t", help="Teacher checkpoint written by `teacher fit`."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory to add teacher_logit to (in place)."),
    batch_size: int = typer.Option(8192, "--batch-size", help="Rows scored at once (bounds memory)."),
    threads: int = typer.Option(2, "--threads", help="torch intra-op threads."),
    folds: int = typer.Option(
        0,
        "--out-of-fold",
        help="K >= 2: score the train split out of fold (K teachers, each trained without the fold it scores, "
        "with the teacher's model config and the training flags below); valid and test by TEACHER. 0: TEACHER "
        "scores every split (in-fold on train).",
    ),
    fold_seed: int = typer.Option(0, "--fold-seed", help="Seed of the row-to-fold assignment."),
    fold_by: str = typer.Option(
        "row",
        "--fold-by",
        help="With --out-of-fold: draw folds per `row`, or per `request` (all rows of a request_id in one fold, "
        "so one teacher scores a whole request; per-row folds can invert the order within requests when the "
        "teacher memorises users, per-request ones hide the request's day from it; see prerank.train.crossfit).",
    ),
    features_from: Path = typer.Option(
        None,
        "--features-from",
        help="Dataset of the same log with the teacher's features (e.g. `prepare --features wide`): the teacher "
        "(and with --out-of-fold its fold teachers) scores its rows, and the logits go into DATA's rows, after "
        "checking that every split has the same rows (request_id, label, label_level, ts, user_id, item_id).",
    ),
    epochs: int = EpochsOpt,
    train_batch_size: int = typer.Option(None, "--train-batch-size", help="Fold teachers: rows per batch."),
    lr: float = LrOpt,
    weight_decay: float = WeightDecayOpt,
    seed: int = SeedOpt,
    patience: int = PatienceOpt,
    metric: str = MetricOpt,
    max_steps: int = MaxStepsOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Add a float32 teacher_logit column to every row of every split of DATA, file by file, atomically."""
    from prerank.train.checkpoint import load_model
    from prerank.train.config import train_config
    from prerank.train.crossfit import FOLD_BY, out_of_fold_logits

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if folds == 1 or folds < 0:
        raise ValueError(f"--out-of-fold must be 0 (in-fold) or at least 2 folds, got {folds}")
    if fold_by not in FOLD_BY:
        raise ValueError(f"--fold-by must be one of {', '.join(FOLD_BY)}, got {fold_by!r}")
    torch.set_num_threads(threads)
    name, model, _ = load_model(teacher)
    source = data if features_from is None else features_from
    source_schema = Schema.load(source)
    check_teacher_schema(model.schema, source_schema, str(source))
    if features_from is not None:
        Schema.load(data)
        check_aligned(source, data)  # before any fold teacher is trained
    if folds and has_candidate_rows(source, source_schema):
        raise SchemaError(
            f"{source} is cascade data: its non-impression rows were labelled with a teacher's help, so fold "
            "teachers must be fitted on the impressions-only dataset it was built from; score that one out of fold"
        )
    given: dict[str, np.ndarray] = {}
    if folds:
        flags = train_flags(locals()) | {"batch_size": train_batch_size}
        cfg = train_config(flags)
        _, logits = out_of_fold_logits(
            name,
            asdict(model.config),
            source,
            Path(data) / ".crossfit",
            folds=folds,
            config=cfg,
            seed=fold_seed,
            by=fold_by,
            batch_size=batch_size,
            log=console.print,
        )
        given["train"] = np.concatenate(logits)
        console.print(f"out-of-fold teacher logits computed for {len(given['train']):,} rows of train")
    rows = add_teacher_logits(model, data, batch_size=batch_size, log=console.print, source=source, given=given)
    meta = read_meta(data)
    meta["teacher"] = {"checkpoint": str(teacher), "model": name, "train_logits": "out-of-fold" if folds else "in-fold"}
    if folds:
        meta["teacher"] |= {"folds": folds, "fold_seed": fold_seed, "fold_by": fold_by}
    if features_from is not None:
        meta["teacher"]["features_from"] = str(features_from)
    atomic_write_text(Path(data) / "meta.json", json.dumps(meta, indent=2, default=str))
    print_json({"teacher": str(teacher), "model": name, "rows": rows})


def has_candidate_rows(data_dir: str | Path, schema: Schema) -> bool:
    """Whether ``data_dir`` is cascade data: its schema has ``stage`` and some row is not an impression (``stage``
    > 0), or the column is missing. A ``stage`` column of impressions only (the synthetic default writes one) is not:
    every row there was shown and labelled by the user, as in an impressions-only log."""
    if not schema.has_stage:
        return False
    for split in dataset_splits(data_dir):
        for path in split_parts(data_dir, split):
            if "stage" not in pq.read_schema(path).names:
                return True
            stage = pq.read_table(path, columns=["stage"]).column("stage").to_numpy()
            if (stage != STAGES.index("impression")).any():
                return True
    return False


def add_teacher_logits(
    model: PreRanker,
    data_dir: str | Path,
    *,
    batch_size: int = 8192,
    log: Callable[[str], None] = print,
    source: str | Path | None = None,
    given: dict[str, np.ndarray] | None = None,
) -> dict[str, int]:
    """Write ``model``'s logits as ``teacher_logit`` into every split of ``data_dir``; returns rows per split.

    ``source`` (default ``data_dir``) is the dataset the model reads: another feature set of the same log, whose
    splits must be row-aligned with ``data_dir``'s (:func:`~prerank.data.align.check_aligned`; checked first).
    ``given`` holds a split's logits computed otherwise (e.g. out of fold), ``[rows]`` in the split's file order.

    Each Parquet part is rewritten row group by row group into a temporary file next to it; only when every part of
    every split is written do the temporary files replace the parts, so bad data anywhere (found while scoring)
    leaves every file as it was. Without ``source`` scoring streams (memory bounded by one row group); with it, a
    split's logits are computed first (4 bytes a row). An existing ``teacher_logit`` column is replaced.
    ``schema.json`` gets ``has_teacher_logit=True`` once every part is in place, so a run killed while the parts
    are being renamed leaves the schema unchanged; running the command again completes it.
    """
    data_dir = Path(data_dir)
    source = data_dir if source is None else Path(source)
    given = given or {}
    schema, source_schema = Schema.load(data_dir), Schema.load(source)
    check_teacher_schema(model.schema, source_schema, str(source))
    splits = dataset_splits(data_dir)
    if not splits:
        raise SchemaError(f"{data_dir} has no split folders with Parquet files")
    for split in splits:
        ParquetSplit(data_dir, split, schema)  # validate every split before rewriting any file
    expected = check_aligned(source, data_dir, splits) if source != data_dir else {}
    for split, logits in given.items():
        n = expected.get(split, sum(pq.ParquetFile(p).metadata.num_rows for p in split_parts(data_dir, split)))
        if len(logits) != n:
            raise ValueError(f"{len(logits):,} logits were given for split {split!r}, which has {n:,} rows")
    model.eval()
    rows: dict[str, int] = {}
    with contextlib.ExitStack() as commit:  # on a clean exit every temporary part replaces its part
        for split in splits:
            logits_of: Callable[[pa.Table, str], np.ndarray]
            if split in given:
                logits_of = _Cut(given[split])
            elif source != data_dir:
                logits_of = _Cut(_split_logits(model, source, split, source_schema, batch_size))
            else:
                logits_of = _Scorer(model, schema, batch_size)  # streams: one row group at a time
            parts = split_parts(data_dir, split)
            rows[split] = sum(_write_file(p, commit.enter_context(atomic_path(p)), logits_of) for p in parts)
            log(f"teacher_logit written for {rows[split]:,} rows of {split}")
    schema.with_reserved(has_teacher_logit=True).save(data_dir / "schema.json")
    return rows


def check_teacher_schema(teacher: Schema, data: Schema, where: str) -> None:
    """The teacher must have been trained on exactly the data's features (names, towers, vocabularies)."""
    if teacher.features == data.features:
        return
    theirs, ours = {f.name: f for f in teacher.features}, {f.name: f for f in data.features}
    missing = sorted(set(theirs) - set(ours))
    differ = sorted(n for n in set(theirs) & set(ours) if theirs[n] != ours[n])
    extra = sorted(set(ours) - set(theirs))
    raise SchemaError(
        f"the teacher's schema does not match {where}/schema.json: features missing from the data {missing}, "
        f"defined differently {differ}, unknown to the teacher {extra}"
    )


class _Scorer:
    """``(table, where) -> logits``: ``model``'s logits of a row group, ``batch_size`` rows at a time."""

    def __init__(self, model: PreRanker, schema: Schema, batch_size: int):
        self.model, self.schema, self.batch_size = model, schema, batch_size

    @torch.no_grad()
    def __call__(self, table: pa.Table, where: str) -> np.ndarray:
        batch = table_to_batch(table, self.schema, where=where)
        step = self.batch_size
        chunks = [self.model(batch.select(slice(s, s + step))) for s in range(0, table.num_rows, step)]
        return torch.cat(chunks).float().numpy() if chunks else np.zeros(0, np.float32)


class _Cut:
    """``(table, where) -> logits``: the next ``table.num_rows`` entries of precomputed ``[rows]`` logits."""

    def __init__(self, logits: np.ndarray):
        self.logits, self.at = logits, 0

    def __call__(self, table: pa.Table, where: str) -> np.ndarray:
        out = self.logits[self.at : self.at + table.num_rows]
        self.at += table.num_rows
        return out


def _split_logits(model: PreRanker, root: Path, split: str, schema: Schema, batch_size: int) -> np.ndarray:
    """``[rows]`` logits of ``root/split`` in file order, row group by row group."""
    score = _Scorer(model, schema, batch_size)
    out = [
        score(read_row_group(p, i), f"{p} (row group {i})")
        for p in split_parts(root, split)
        for i in range(pq.ParquetFile(p).num_row_groups)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _write_file(path: Path, tmp: Path, logits_of: Callable[[pa.Table, str], np.ndarray]) -> int:
    """Write ``path`` with ``logits_of(row group, where)`` as its ``teacher_logit`` column to ``tmp``; returns rows."""
    source = pq.ParquetFile(path)
    fields = [f for f in source.schema_arrow if f.name != "teacher_logit"]
    out_schema = pa.schema([*fields, pa.field("teacher_logit", pa.float32())])
    n = 0
    with pq.ParquetWriter(tmp, out_schema) as writer:
        for i in range(source.num_row_groups):
            table = read_row_group(path, i)
            logits = logits_of(table, f"{path} (row group {i})")
            if "teacher_logit" in table.column_names:
                table = table.drop_columns(["teacher_logit"])
            table = table.append_column(out_schema.field("teacher_logit"), pa.array(logits, pa.float32()))
            writer.write_table(table, row_group_size=max(table.num_rows, 1))
            n += table.num_rows
    return n
