"""``prerank data``: prepare public datasets, download MovieLens, generate synthetic data, inspect a dataset."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from prerank.cli import app
from prerank.cli.common import ProgressOpt, console, friendly_errors, parse_options
from prerank.data.recipes import RECIPES, OutOfCore, prepare
from prerank.data.recipes.common import Progress as ProgressFn
from prerank.data.recipes.common import no_progress
from prerank.data.recipes.download import ARCHIVES, download

data_app = typer.Typer(
    help="Datasets: prepare public raw data (MovieLens, Taobao), download MovieLens, generate synthetic data.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")

RECIPE_NAMES = ", ".join(RECIPES)


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prerank"


@contextmanager
def _bar(enabled: bool, *, transfer: bool = False) -> Iterator[ProgressFn]:
    """A rich progress bar as a recipe ``progress(message, done, total)`` callback."""
    if not enabled:
        yield no_progress
        return
    counter = (DownloadColumn(), TransferSpeedColumn()) if transfer else (MofNCompleteColumn(),)
    with Progress(TextColumn("{task.description}"), BarColumn(), *counter, TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("starting", total=None)

        def update(message: str, done: int, total: int) -> None:
            bar.update(task, description=message, completed=done, total=total or None)

        yield update


@data_app.command("prepare")
@friendly_errors
def prepare_cmd(
    name: str = typer.Argument(..., help=f"Recipe: {RECIPE_NAMES}, or 'table' for your own CSV/Parquet log."),
    raw: Path = typer.Option(
        None,
        "--raw",
        help="Raw files: a folder (e.g. ../shared/data/ml-1m) or an archive (ml-1m.zip, UserBehavior.csv[.gz]).",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Dataset folder to write (must be new, empty, or an earlier prerank dataset)."
    ),
    protocol: str = typer.Option(
        None,
        "--protocol",
        help="Evaluation protocol. MovieLens: 'paper' (default; random 80/20 rows, 10% of train as valid) or "
        "'temporal' (per-user time split, behaviour history). Taobao: 'temporal' (by day; the only one).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of random splits and out-of-fold assignment."),
    features: str = typer.Option(
        "default",
        "--features",
        help="Feature set of a recipe: 'default', or 'wide' (40+ fields of all four FSCD cost types, for "
        "`prerank select` and the teacher; MovieLens 'paper': 42 fields, no past-only ones, out-of-fold "
        "behaviour sequences).",
    ),
    engine: str = typer.Option(
        "memory",
        "--engine",
        help="'memory' (the whole log in memory), or 'duckdb': out of core for logs larger than memory "
        "(taobao-user-behavior, default features; the same dataset).",
    ),
    memory_limit: str = typer.Option(
        None, "--memory-limit", help="--engine duckdb: DuckDB's memory limit, e.g. 2GB (default 1GB); spills past it."
    ),
    temp_dir: Path = typer.Option(
        None, "--temp-dir", help="--engine duckdb: folder for staging and spill files (default: beside --out)."
    ),
    progress: bool = ProgressOpt,
    interactions: Path = typer.Option(None, "--interactions", help="table: interaction log (.csv/.tsv/.parquet)."),
    users: Path = typer.Option(None, "--users", help="table: one row per user; its columns become user features."),
    items: Path = typer.Option(None, "--items", help="table: one row per item; its columns become item features."),
    user_col: str = typer.Option(None, "--user-col", help="table: user id column (feature user_id)."),
    item_col: str = typer.Option(None, "--item-col", help="table: item id column (feature item_id)."),
    label_col: str = typer.Option(None, "--label-col", help="table: 0/1 label column (or --implicit)."),
    implicit: bool = typer.Option(False, "--implicit", help="table: every logged row is a positive; sample negatives."),
    time_col: str = typer.Option(None, "--time-col", help="table: time column (time splits, behaviour history)."),
    split: str = typer.Option(
        None,
        "--split",
        help="table: leave-last-out (default with --time-col --implicit), global-time (default with --time-col"
        " --label-col), or random (default without --time-col).",
    ),
    negatives: int = typer.Option(None, "--negatives", help="table --implicit: negatives per positive (default 4)."),
    negative_sampling: str = typer.Option(
        "uniform", "--negative-sampling", help="table --implicit: uniform or popularity (training counts)."
    ),
    max_hist: int = typer.Option(20, "--max-hist", help="table: length of the hist_item_id behaviour sequence."),
    item_stats: bool = typer.Option(
        True,
        "--item-stats/--no-item-stats",
        help="table: add item_mean_label (smoothed training positive rate, out of fold for training rows) and "
        "item_count as item features.",
    ),
) -> None:
    """Turn public raw files, or your own interaction table, into a prerank dataset.

    Writes schema.json, meta.json, train/valid/test and items.parquet. Vocabularies and statistics are
    fitted on the training split only (out-of-fold for training rows); see `prerank data info OUT` for the
    features and their FSCD cost types. `prerank data prepare table --interactions log.csv --user-col U
    --item-col I --label-col L --out D` infers features from column types and also writes report.json.
    """
    if name == "table":
        if features != "default":
            raise ValueError("--features applies to the recipes, not to 'prepare table'")
        if engine != "memory":
            raise ValueError("--engine applies to the recipes (duckdb: taobao-user-behavior), not to 'prepare table'")
        _prepare_table(
            out, seed, progress, interactions=interactions, users=users, items=items, user_col=user_col,
            item_col=item_col, label_col=label_col, implicit=implicit, time_col=time_col, split=split,
            negatives=negatives, negative_sampling=negative_sampling, max_hist=max_hist, item_stats=item_stats,
        )  # fmt: skip
        return
    if raw is None:
        raise ValueError(f"recipe {name!r} needs --raw (the folder or archive of its raw files)")
    ooc = None
    if memory_limit is not None or temp_dir is not None:
        ooc = OutOfCore(memory_limit=memory_limit or OutOfCore.memory_limit, temp_dir=temp_dir)
    with _bar(progress) as bar:
        path = prepare(name, raw, out, protocol, seed, features=features, engine=engine, out_of_core=ooc, progress=bar)
    meta = json.loads((path / "meta.json").read_text())
    rows = ", ".join(f"{k} {v:,}" for k, v in meta["rows"].items())
    console.print(f"[green]wrote[/] {path}: {rows} rows in {meta['prepare_seconds']} s")


def _prepare_table(out: Path, seed: int, progress: bool, **opts: object) -> None:
    """``prepare table``: run :func:`prerank.data.recipes.table.prepare_table` and print what it inferred."""
    from prerank.data.recipes.table import TableConfig, TableError, prepare_table

    for flag, key in (("--interactions", "interactions"), ("--user-col", "user_col"), ("--item-col", "item_col")):
        if opts[key] is None:
            raise TableError(f"prepare table needs {flag}")
    interactions, users, items = opts.pop("interactions"), opts.pop("users"), opts.pop("items")
    config = TableConfig(seed=seed, **opts)  # type: ignore[arg-type]
    with _bar(progress) as bar:
        path = prepare_table(interactions, out, config, users=users, items=items, progress=bar)  # type: ignore[arg-type]
    report = json.loads((path / "report.json").read_text())
    table = Table(title=f"{path}: inferred features (split {report['split']})")
    for col in ("column", "from", "feature", "tower", "kind", "vocab", "len"):
        table.add_column(col)
    for c in report["columns"]:
        vocab = str(c["vocab_size"]) if c["vocab_size"] else ""
        table.add_row(c["column"], c["source"], c["feature"], c["tower"], c["kind"], vocab, str(c["max_len"] or ""))
    if report["history"]:
        table.add_row("", "(derived)", "hist_item_id", "user", "sequence", "(item_id)", str(config.max_hist))
    if report["item_statistics"]:
        for name in ("item_mean_label", "item_count"):
            table.add_row("", "(derived)", name, "item", "dense", "", "")
    out_console = Console()  # stdout: this is the command's result
    out_console.print(table)
    for d in report["dropped"]:
        out_console.print(f"[yellow]dropped[/] {d['column']} ({d['source']}): {d['reason']}")
    for w in report["warnings"]:
        out_console.print(f"[yellow]warning:[/] {w}")
    rows = ", ".join(f"{k} {v:,}" for k, v in report["rows"].items())
    out_console.print(f"label: {report['label']}; request_id: {report['request_id']}")
    console.print(f"[green]wrote[/] {path}: {rows} rows in {report['prepare_seconds']} s (details in report.json)")


@data_app.command("download")
@friendly_errors
def download_cmd(
    name: str = typer.Argument(..., help=f"Dataset: {', '.join(ARCHIVES)}."),
    cache: Path = typer.Option(None, "--cache", help="Folder for the zip (default $XDG_CACHE_HOME/prerank)."),
    url: str = typer.Option(None, "--url", help="Mirror URL of the same official zip (the checksum still applies)."),
    progress: bool = ProgressOpt,
) -> None:
    """Download the official GroupLens zip and verify its SHA-256; prints the zip's path.

    Pass the zip to `prerank data prepare NAME --raw PATH`. A file with a wrong checksum is deleted.
    """
    with _bar(progress, transfer=True) as bar:
        path = download(name, cache or default_cache(), url=url, progress=bar)
    typer.echo(str(path))


@data_app.command("synth")
@friendly_errors
def synth_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write (new, empty or earlier synthetic)."),
    rows: int = typer.Option(200_000, "--rows", help="Number of impressions."),
    seed: int = typer.Option(0, "--seed", help="Seed of the hidden world and of the sampling."),
    users: int = typer.Option(None, "--users", help="Number of users (default 5000)."),
    items: int = typer.Option(None, "--items", help="Number of items (default 2000)."),
    option: list[str] = typer.Option(
        None,
        "--option",
        help="Any other generator option key=value (repeatable), e.g. n_categories=20, days=14, hist_len=20, "
        "max_request_size=50, interaction_scale=2.0 (see prerank.data.synthetic.SyntheticConfig).",
    ),
    progress: bool = ProgressOpt,
) -> None:
    """Generate a synthetic cascade log with a known ground truth (the package's built-in dataset)."""
    from prerank.data.synthetic import generate

    options = parse_options(option, "--option")
    options |= {k: v for k, v in (("n_users", users), ("n_items", items)) if v is not None}
    path = generate(out, rows, seed, progress=progress, **options)
    console.print(f"[green]wrote[/] {path}")


@data_app.command("synth-wide")
@friendly_errors
def synth_wide_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write (new, empty or earlier synth-wide)."),
    rows: int = typer.Option(50_000, "--rows", help="Number of rows (whole requests)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the hidden effects and of the sampling."),
    option: list[str] = typer.Option(
        None,
        "--option",
        help="Generator option key=value (repeatable), e.g. n_noise_cross=5, effect=0.5, star_effect=2.0 "
        "(see prerank.data.synthetic_wide.WideConfig).",
    ),
) -> None:
    """Generate a wide synthetic dataset with a known value per field and FSCD cost types (feature selection).

    Cheap informative fields (types I, II), costly informative fields of the same value (III, IV), one very
    informative costly field (x_star, IV) and costly noise (III, IV); meta.json holds each field's role.
    """
    from prerank.data.synthetic_wide import generate_wide

    path = generate_wide(out, rows, seed, **parse_options(option, "--option"))
    console.print(f"[green]wrote[/] {path}")


@data_app.command("info")
@friendly_errors
def info_cmd(
    root: Path = typer.Argument(..., help="Dataset folder."),
) -> None:
    """Show a dataset's features (tower, kind, vocabulary, FSCD cost type) and its meta.json counts."""
    from prerank.data.parquet import read_meta
    from prerank.schema import Schema

    schema = Schema.load(root)
    table = Table(title=f"{root} ({schema.name})")
    for col in ("feature", "tower", "kind", "vocab", "len", "cost", "description"):
        table.add_column(col)
    for f in schema.features:
        vocab = "" if f.kind == "dense" else str(schema.vocab(f.name)) + (f" ({f.shares})" if f.shares else "")
        length = str(f.max_len) if f.kind == "sequence" else ""
        table.add_row(f.name, f.tower, f.kind, vocab, length, f.cost_type, f.description)
    out = Console()  # stdout: this is the command's result
    out.print(table)
    meta = read_meta(root)
    for key in ("recipe", "protocol", "seed", "rows", "label_rate", "counts"):
        if key in meta:
            out.print(f"[bold]{key}[/]: {json.dumps(meta[key])}")
