"""``prerank select``: rank feature fields (FSCD, Dropout-FR, DFS); ``prerank select finetune`` (also spelled
``prerank select-finetune``): train the pre-ranker on the top K (FSCD Algorithm 1, steps 3-4)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer

from prerank.cli import app
from prerank.cli.common import (
    BatchOpt,
    EpochsOpt,
    LrOpt,
    MaxStepsOpt,
    PatienceOpt,
    ProgressOpt,
    SeedOpt,
    ThreadsOpt,
    console,
    friendly_errors,
    print_json,
    run_config,
    train_flags,
)
from prerank.io import atomic_torch_save, atomic_write_text, safe_torch_load
from prerank.models.base import ConfigError

PRERANKER = "fscd_preranker"


def _hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ConfigError(f"--hidden must be comma-separated integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise ConfigError(f"--hidden must be positive widths, got {text!r}")
    return widths


#: ``prerank select [OPTIONS]`` runs a selection; ``prerank select finetune [OPTIONS]`` (the issue's spelling)
#: fine-tunes on its top K, as ``prerank select-finetune`` does.
select_app = typer.Typer(invoke_without_command=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(select_app, name="select")


@select_app.callback()
@friendly_errors
def select_cmd(
    ctx: typer.Context,
    method: str = typer.Option("fscd", "--method", help="fscd | dropout_fr | dfs."),
    data: Path = typer.Option(
        None, "--data", "-d", help="Dataset directory (schema.json with cost types + train). Required."
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for selection.json and selection.pt. Required."),
    k: int = typer.Option(10, "--k", help="How many fields to select (the top K by importance)."),
    epochs: int = typer.Option(1, "--epochs", help="Epochs of the selection run."),
    batch_size: int = typer.Option(2048, "--batch-size", help="Rows per batch."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    hidden: str = typer.Option("1024,256", "--hidden", help="Selection network widths (default: the pre-ranker's)."),
    embedding_dim: int = typer.Option(16, "--embedding-dim", help="Shared embedding width."),
    prior_scale: float = typer.Option(
        None, "--prior-scale", help="FSCD: weight of Eq. 3's prior terms per step (default 1/N, N = training rows)."
    ),
    n_source: str = typer.Option(
        None, "--n-source", help="FSCD: n_j from the schema's 'n_values' (default) or the vocabulary size ('vocab')."
    ),
    reg: float = typer.Option(None, "--reg", help="Dropout-FR / DFS: sparsity weight lambda (default 1e-2)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    threads: int = typer.Option(2, "--threads", help="torch intra-op threads."),
    max_steps: int = typer.Option(None, "--max-steps", help="Stop after this many steps (smoke tests)."),
    progress: bool = ProgressOpt,
) -> None:
    """Train the gated network over every field and write one entry per field to OUT/selection.json.

    `prerank select finetune ...` then trains the pre-ranker on the top K fields (see its --help)."""
    if ctx.invoked_subcommand is not None:
        return
    if data is None or out is None:
        raise ConfigError("prerank select needs --data and --out (or a subcommand: finetune)")
    from prerank.schema import Schema
    from prerank.selection import SELECTORS
    from prerank.selection.fscd import require_cost_types

    if method not in SELECTORS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(SELECTORS)}")
    schema = Schema.load(data)
    if not 1 <= k <= len(schema.names):
        raise ConfigError(f"--k {k} is not between 1 and the number of fields ({len(schema.names)})")
    if method == "fscd":
        require_cost_types(data)
    torch.set_num_threads(threads)
    options: dict = {}
    if method == "fscd" and prior_scale is not None:
        options["prior_scale"] = prior_scale
    if method == "fscd" and n_source is not None:
        options["n_source"] = n_source
    if method != "fscd" and reg is not None:
        options["reg"] = reg
    selector = SELECTORS[method](
        k,
        hidden=_hidden(hidden),
        embedding_dim=embedding_dim,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        max_steps=max_steps,
        progress=progress,
        **options,
    ).fit(data)
    out.mkdir(parents=True, exist_ok=True)
    scale = selector.field_scale() if hasattr(selector, "field_scale") else None
    atomic_torch_save(
        {"state_dict": selector.model_.state_dict(), "names": list(selector.feature_names_), "field_scale": scale},
        out / "selection.pt",
    )
    report = {
        "method": method,
        "data": str(data),
        "k": k,
        "selected": list(selector.selected_features_),
        "network": {"hidden": list(selector.hidden), "embedding_dim": embedding_dim},
        "options": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, **options},
        "steps": selector.steps_,
        "train_rows": selector.n_rows_,
        "fit_seconds": selector.fit_seconds_,
        "weights": "selection.pt",
        "fields": selector.field_report(),
    }
    atomic_write_text(out / "selection.json", json.dumps(report, indent=2))
    console.print(f"[green]wrote[/] {out / 'selection.json'}: top {k} = {', '.join(selector.selected_features_)}")


def read_selection(path: Path) -> dict:
    if path.is_dir():
        path = path / "selection.json"
    if not path.exists():
        raise FileNotFoundError(f"no selection file at {path}")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(report, dict) or not isinstance(report.get("fields"), list):
        raise ConfigError(f"{path} is not a selection.json written by `prerank select`")
    return report


def top_fields(report: dict, k: int, schema_names: list[str]) -> tuple[str, ...]:
    """The ``k`` best-ranked fields of a selection report, checked against the dataset's schema."""
    fields = report["fields"]
    names = [f["name"] for f in fields]
    unknown = sorted(set(names) - set(schema_names))
    if unknown:
        raise ConfigError(f"the selection names fields that the dataset's schema lacks: {unknown}")
    if not 1 <= k <= len(fields):
        raise ConfigError(f"--k {k} is not between 1 and the number of ranked fields ({len(fields)})")
    return tuple(f["name"] for f in sorted(fields, key=lambda f: f["rank"])[:k])


@select_app.command("finetune")
@app.command("select-finetune")
@friendly_errors
def select_finetune_cmd(
    selection: Path = typer.Option(..., "--selection", "-s", help="selection.json written by `prerank select`."),
    k: int = typer.Option(..., "--k", help="Train the pre-ranker on the top K fields."),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (best.pt, metrics.jsonl, test.json)."),
    hidden: str = typer.Option("1024,256", "--hidden", help="Pre-ranker widths (FSCD Sec. 3.1: 1024,256)."),
    scratch: bool = typer.Option(False, "--scratch", help="Do not start from the selection run's weights."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout on the pre-ranker's hidden layers, in [0, 1)."),
    epochs: int = EpochsOpt,
    batch_size: int = BatchOpt,
    lr: float = LrOpt,
    weight_decay: float = typer.Option(None, "--weight-decay", help="Optimizer weight decay (default 0)."),
    threads: int = ThreadsOpt,
    seed: int = SeedOpt,
    patience: int = PatienceOpt,
    max_steps: int = MaxStepsOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Fine-tune the FSCD pre-ranker on the top K fields (Eq. 6), starting from the selection run's weights."""
    from prerank.models.registry import build_model
    from prerank.schema import Schema
    from prerank.selection.fscd import finetune_state
    from prerank.train.trainer import evaluate_split, train_model

    report = read_selection(selection)
    schema = Schema.load(data)
    features = top_fields(report, k, schema.names)
    sel_file = selection if selection.is_dir() else selection.parent
    network = report.get("network", {})
    overrides = {"features": list(features), "hidden": list(_hidden(hidden)), "dropout": dropout}
    if "embedding_dim" in network:
        overrides["embedding_dim"] = network["embedding_dim"]
    _, cfg = run_config(None, **train_flags(locals()))
    init, copied = None, []
    weights = sel_file / report.get("weights", "selection.pt")
    if not scratch:
        if not weights.exists():
            raise FileNotFoundError(f"no selection weights at {weights}; pass --scratch to train from scratch")
        saved = safe_torch_load(weights)
        target = build_model(PRERANKER, schema, overrides)
        init, copied = finetune_state(saved["state_dict"], tuple(saved["names"]), target, saved.get("field_scale"))
        console.print(f"starting from {weights}: {len(copied)} of {len(init)} tensors inherited")
    result = train_model(PRERANKER, data, out, overrides, cfg, resume=False, log=console.print, init_weights=init)
    test = evaluate_split(result.model, data, "test", cfg.eval_batch_size)
    summary = {
        "model": PRERANKER,
        "method": report.get("method"),
        "k": k,
        "features": list(features),
        "inherited": copied,
        "dropout": dropout,
        "weight_decay": cfg.weight_decay,
        "checkpoint": str(result.checkpoint),
        "epochs": result.epochs,
        "best_valid": result.best_metric,
        "test": test,
    }
    atomic_write_text(out / "test.json", json.dumps(summary, indent=2))
    print_json(summary)
