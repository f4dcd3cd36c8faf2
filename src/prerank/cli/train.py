"""``prerank train``, ``evaluate``, ``compare`` and ``demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from prerank.cli import app
from prerank.cli.common import (
    BatchingOpt,
    BatchOpt,
    ConfigOpt,
    EpochsOpt,
    LossOpt,
    LossOptOpt,
    LrOpt,
    MaxListOpt,
    MaxStepsOpt,
    MetricOpt,
    ModelOptOpt,
    PatienceOpt,
    ProgressOpt,
    RequestsOpt,
    SeedOpt,
    StageMixOpt,
    StagesOpt,
    ThreadsOpt,
    WorkersOpt,
    console,
    friendly_errors,
    print_json,
    run_config,
    train_flags,
)
from prerank.io import atomic_write_text
from prerank.models.base import ConfigError


@app.command()
@friendly_errors
def train(
    model: str = typer.Option(None, "--model", "-m", help="Registered model name (see `prerank models`)."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory (schema.json + train/valid/test)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: best.pt, last.pt, metrics.jsonl, test.json."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt."),
    config: Path = ConfigOpt,
    model_option: list[str] = ModelOptOpt,
    loss: str = LossOpt,
    loss_option: list[str] = LossOptOpt,
    epochs: int = EpochsOpt,
    batch_size: int = BatchOpt,
    lr: float = LrOpt,
    threads: int = ThreadsOpt,
    seed: int = SeedOpt,
    patience: int = PatienceOpt,
    metric: str = MetricOpt,
    max_steps: int = MaxStepsOpt,
    num_workers: int = WorkersOpt,
    batching: str = BatchingOpt,
    stages: str = StagesOpt,
    max_list_len: int = MaxListOpt,
    stage_mix: str = StageMixOpt,
    requests_per_batch: int = RequestsOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Train one model; early-stop on the valid split; report valid and test metrics.

    Under ``torchrun --nproc-per-node N -m prerank train ...`` the N processes train it data-parallel
    (``--batch-size`` is the global batch); rank 0 writes the run directory."""
    from prerank.train import distributed
    from prerank.train.compare import resolve_loss
    from prerank.train.trainer import evaluate_split, train_model

    run, cfg = run_config(
        config,
        model=model,
        model_options=model_option,
        loss=loss,
        loss_options=loss_option,
        **train_flags(locals()),
    )
    if not run.model:
        raise typer.BadParameter("give --model or 'model:' in the --config file")
    result = train_model(
        run.model,
        data,
        out,
        run.model_config,
        cfg,
        resolve_loss(run.loss, run.loss_options),
        resume=resume,
        log=console.print,
    )
    ctx = distributed.current()
    test = evaluate_split(result.model, data, "test", cfg.eval_batch_size, ctx=ctx)
    if not ctx.main:
        return
    summary = {
        "model": run.model,
        "checkpoint": str(result.checkpoint),
        "epochs": result.epochs,
        "max_epochs": result.config.epochs if result.config else cfg.epochs,
        "batch_size": result.config.batch_size if result.config else cfg.batch_size,
        "auto_schedule": list(result.auto),
        "best_valid": result.best_metric,
        "train_seconds": result.train_seconds,
        "train_samples_per_second": result.samples_per_second,
        "test": test,
    }
    atomic_write_text(out / "test.json", json.dumps(summary, indent=2))
    print_json(summary)


@app.command()
@friendly_errors
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A checkpoint written by train (best.pt)."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory."),
    split: str = typer.Option("test", "--split", help="Split to evaluate: train, valid or test."),
    batch_size: int = typer.Option(16384, "--batch-size", help="Rows per scoring batch."),
    threads: int = typer.Option(2, "--threads", help="torch intra-op threads."),
) -> None:
    """Evaluate a checkpoint on a split: AUC, logloss, GAUC (with skipped requests)."""
    import torch

    from prerank.schema import Schema
    from prerank.train.checkpoint import load_model
    from prerank.train.trainer import evaluate_split

    torch.set_num_threads(threads)
    name, model, _ = load_model(checkpoint)
    if Schema.load(data).features != model.schema.features:  # columns such as teacher_logit or stage may differ
        raise ValueError(f"{checkpoint} was trained on other features than {data}/schema.json's")
    print_json({"model": name, "split": split, **evaluate_split(model, data, split, batch_size)})


@app.command()
@friendly_errors
def compare(
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory."),
    models: str = typer.Option("lr,two_tower", "--models", help="Comma-separated registered model names."),
    seeds: int = typer.Option(3, "--seeds", help="Number of seeds per model (seed, seed+1, ...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: results.json, results.md, runs/."),
    resume: bool = typer.Option(False, "--resume", help="Skip runs already in OUT/results.json; resume unfinished."),
    teacher: Path = typer.Option(
        None, "--teacher", help="Teacher checkpoint (`prerank teacher fit`): its row and RelaImpr vs the teacher."
    ),
    teacher_data: Path = typer.Option(
        None,
        "--teacher-data",
        help="Dataset the teacher reads, if not DATA: another feature set of the same log (e.g. `prepare --features "
        "wide`); its test rows must be DATA's (checked).",
    ),
    config: Path = ConfigOpt,
    model_option: list[str] = typer.Option(
        None, "--model-option", help="Per-model override MODEL.key=value, or key=value for all models (repeatable)."
    ),
    train_option: list[str] = typer.Option(
        None, "--train-option", help="Per-model training override MODEL.key=value, e.g. lr.lr=0.02 (repeatable)."
    ),
    grid: list[str] = typer.Option(
        None,
        "--grid",
        help="Tune every model on the same grid first (valid split, first seed), e.g. --grid lr=1e-3,3e-3"
        " --grid weight_decay=0,1e-5 (repeatable; training options, or loss options as loss.NAME, e.g."
        " --grid loss.distillation_weight=0.5,1,2); the table prints each model's choice.",
    ),
    then_grid: list[str] = typer.Option(
        None,
        "--then-grid",
        help="A second tuning stage, tried on top of --grid's best point (same syntax), e.g. --then-grid"
        " loss.distillation_weight=0.5,2: |grid| + |then-grid| runs instead of their product; the best of all wins.",
    ),
    loss: str = LossOpt,
    loss_option: list[str] = LossOptOpt,
    epochs: int = EpochsOpt,
    batch_size: int = BatchOpt,
    lr: float = LrOpt,
    threads: int = ThreadsOpt,
    seed: int = SeedOpt,
    patience: int = PatienceOpt,
    metric: str = MetricOpt,
    max_steps: int = MaxStepsOpt,
    num_workers: int = WorkersOpt,
    batching: str = BatchingOpt,
    stages: str = StagesOpt,
    max_list_len: int = MaxListOpt,
    stage_mix: str = StageMixOpt,
    requests_per_batch: int = RequestsOpt,
    progress: bool = ProgressOpt,
    popularity: bool = typer.Option(
        False,
        "--popularity",
        help="Add the row of a scorer that learns nothing: each test row scored by its item's smoothed click rate"
        " on the train split (the bar every model should clear).",
    ),
    latency_candidates: int = typer.Option(
        1000,
        "--latency-candidates",
        help="Time each model's served request (onnx, 1 thread) with this many candidates on its first seed's"
        " checkpoint, and plot AUC against it in OUT/auc_vs_latency.png; 0 skips it.",
    ),
) -> None:
    """Train each model for each seed and write results.json, results.md (mean ± std per model) and
    auc_vs_latency.png. Under ``torchrun`` every run trains data-parallel; rank 0 evaluates and writes."""
    from prerank.train import distributed
    from prerank.train.compare import run_compare

    run, cfg = run_config(
        config,
        loss=loss,
        loss_options=loss_option,
        **train_flags(locals()),
    )
    names = [m.strip() for m in models.split(",") if m.strip()]
    overrides = _per_model_overrides(names, model_option, run.model_config or {})
    train_overrides = _per_model_overrides(names, train_option, {}, shared_allowed=False)
    run_compare(
        data,
        names,
        seeds,
        out,
        config=cfg,
        model_overrides=overrides,
        train_overrides=train_overrides,
        loss=run.loss,
        loss_options=run.loss_options,
        resume=resume,
        teacher=teacher,
        teacher_data=teacher_data,
        log=console.print,
        latency_candidates=latency_candidates or None,
        grid=_grid(grid),
        then_grid=_grid(then_grid),
        popularity=popularity,
    )
    if distributed.current().main:
        typer.echo((out / "results.md").read_text())


def _grid(pairs: list[str] | None) -> dict[str, list[Any]] | None:
    """``["lr=1e-3,3e-3", "weight_decay=0,1e-5"]`` -> ``{"lr": [0.001, 0.003], "weight_decay": [0, 1e-05]}``."""
    out: dict[str, list[Any]] = {}
    for pair in pairs or []:
        key, sep, values = pair.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid must look like option=value1,value2, got {pair!r}")
        out[key.strip()] = [_number(v.strip()) for v in values.split(",")]
    return out or None


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _per_model_overrides(
    names: list[str], pairs: list[str] | None, shared: dict[str, Any], *, shared_allowed: bool = True
) -> dict[str, dict]:
    """``MODEL.key=value`` pairs (and, where allowed, plain ``key=value`` for every model) per model."""
    from prerank.cli.common import parse_options

    out: dict[str, dict] = {n: dict(shared) for n in names}
    for key, value in parse_options(pairs, "option").items():
        if "." in key:
            model, field = key.split(".", 1)
            if model not in out:
                raise ValueError(f"option {key}: {model!r} is not among --models")
            out[model][field] = value
        elif not shared_allowed:
            raise ValueError(f"option {key}: write MODEL.{key}=... (use the plain flag for every model)")
        else:
            for n in names:
                out[n][key] = value
    return {n: o for n, o in out.items() if o}


#: The demo's models: baselines, and one model of each paper (DESIGN.md).
DEMO_MODELS = "lr,two_tower,cold,int_tower,fit,rank_tower,fscd_preranker,distilled_dssm"


@app.command()
@friendly_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Where the synthetic data and results go."),
    rows: int = typer.Option(100_000, "--rows", help="Synthetic rows to generate."),
    models: str = typer.Option(DEMO_MODELS, "--models", help="Models to compare."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per model."),
    epochs: int = typer.Option(None, "--epochs", help="Maximum epochs (default: chosen from the rows)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Rows per training batch (default: from the rows)."),
    max_steps: int = MaxStepsOpt,
    threads: int = typer.Option(2, "--threads", help="torch intra-op threads for training."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data generator and the first training seed."),
    candidates: int = typer.Option(1000, "--candidates", help="Candidates per timed request."),
    progress: bool = ProgressOpt,
) -> None:
    """Generate the built-in synthetic cascade data, train a representative set of models on it, and print one
    table: test AUC, GAUC, served latency per request (onnx, 1 thread) and item-cache bytes per item; the plot of
    AUC against latency goes to OUT/auc_vs_latency.png."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from prerank.data.synthetic import generate
    from prerank.evaluate.report import DEMO_COLUMNS, auc_latency_plot, results_table
    from prerank.train.compare import run_compare
    from prerank.train.config import TrainConfig

    names = [m.strip() for m in models.split(",") if m.strip()]
    data = out / "data"
    console.print(f"generating {rows:,} synthetic rows into {data}")
    generate(data, rows=rows, seed=seed, progress=False)
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, max_steps=max_steps, threads=threads, seed=seed, progress=False
    )
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("demo", total=len(names) * (seeds + 1))
        started = [False]

        def step(description: str) -> None:
            bar.update(task, advance=1 if started[0] else 0, description=description)
            started[0] = True

        records = run_compare(
            data, names, seeds, out, config=cfg, log=bar.console.print, latency_candidates=candidates, on_step=step
        )
        bar.update(task, completed=len(names) * (seeds + 1), description="demo")
    table = results_table(records, DEMO_COLUMNS)
    atomic_write_text(out / "demo.md", table)
    plot = auc_latency_plot(records, out / "auc_vs_latency.png", title="prerank demo: synthetic data")
    typer.echo(table)
    typer.echo(
        f"latency: p50 of 50 served requests of {candidates:,} candidates (onnx runtime, 1 thread) on this machine;"
        f" full records in {out / 'results.json'}; plot in {plot}"
    )


@app.command("models")
def list_models() -> None:
    """List the registered models with their default configs."""
    from prerank.models.registry import MODELS, describe

    for name in MODELS:
        d = describe(name)
        typer.echo(f"{name:16s} {d['class']:14s} {json.dumps(d['config'])}")
