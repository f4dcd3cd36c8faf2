"""Helpers shared by the CLI modules: error reporting and the common training options."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml
from rich.console import Console

from prerank.data.parquet import DataError
from prerank.io import CheckpointError
from prerank.models.base import ConfigError
from prerank.schema import SchemaError
from prerank.train.config import RunConfig, TrainConfig, load_run_config, train_config

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

#: Errors a user can cause; the CLI prints them as one clear line and exits with status 2. OSError covers paths
#: that cannot be read or written (a folder that is a file, no permission, a full disk, a port in use).
USER_ERRORS = (SchemaError, DataError, ConfigError, CheckpointError, OSError, ValueError, KeyError)


def friendly_errors(fn: F) -> F:
    """Print user errors as one line (set PRERANK_DEBUG=1 for the traceback) and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("PRERANK_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] {e}", soft_wrap=True)  # one line, whatever the width
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def parse_options(pairs: list[str] | None, what: str) -> dict[str, Any]:
    """``["a=1", "b=[64,32]"]`` -> ``{"a": 1, "b": [64, 32]}`` (values parsed as YAML scalars/lists)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"{what} must look like key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_config(
    config_file: Path | None,
    *,
    model: str | None = None,
    model_options: list[str] | None = None,
    loss: str | None = None,
    loss_options: list[str] | None = None,
    **flags: Any,
) -> tuple[RunConfig, TrainConfig]:
    """Merge a YAML run file (optional) with command-line flags; flags win."""
    base = load_run_config(config_file) if config_file else RunConfig()
    if isinstance(flags.get("stages"), str):
        from prerank.data.requests import resolve_stages

        flags["stages"] = resolve_stages(flags["stages"])
    if isinstance(flags.get("stage_mix"), str) and "=" in flags["stage_mix"]:  # else a named mix
        flags["stage_mix"] = {
            k: float(v) for k, v in parse_options(flags["stage_mix"].split(","), "--stage-mix").items()
        }
    train = train_config(flags, base.train)
    merged = RunConfig(
        model=model or base.model,
        model_config={**(base.model_config or {}), **parse_options(model_options, "--model-option")},
        loss=loss or base.loss,
        loss_options={**(base.loss_options or {}), **parse_options(loss_options, "--loss-option")},
        train=train,
    )
    return merged, train


def train_flags(values: dict[str, Any]) -> dict[str, Any]:
    """The command-line values (a command's ``locals()``) that are :class:`TrainConfig` options."""
    return {f.name: values[f.name] for f in fields(TrainConfig) if f.name in values}


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=float))


# Option declarations reused by train / compare / demo (typer reads them from default values).
EpochsOpt = typer.Option(
    None, "--epochs", help="Maximum epochs (default: enough for ~2,000 steps, 5 to 30; see auto_schedule)."
)
BatchOpt = typer.Option(
    None, "--batch-size", help="Rows per training batch (default: train rows // 200 in [64, 2048], a power of two)."
)
LrOpt = typer.Option(None, "--lr", help="Learning rate (default 1e-3).")
WeightDecayOpt = typer.Option(None, "--weight-decay", help="The optimizer's weight decay (default 0).")
ThreadsOpt = typer.Option(None, "--threads", help="torch intra-op threads (default 2).")
SeedOpt = typer.Option(None, "--seed", help="Random seed (default 0); compare uses seed..seed+N-1.")
PatienceOpt = typer.Option(None, "--patience", help="Early stopping: epochs without valid improvement (default 3).")
MetricOpt = typer.Option(
    None,
    "--metric",
    help="Validation metric for early stopping: auc | gauc | logloss, or on cascade data recall@10 | ndcg@10"
    " | hard_recall@10 | hard_ndcg@10 (over each request's full list).",
)
MaxStepsOpt = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (smoke tests).")
WorkersOpt = typer.Option(None, "--num-workers", help="DataLoader worker processes (default 0: main process).")
ConfigOpt = typer.Option(None, "--config", help="YAML run file (model, model_config, loss, loss_options, train).")
ModelOptOpt = typer.Option(None, "--model-option", help="Model config override key=value (repeatable).")
LossOpt = typer.Option(None, "--loss", help="Training loss: bce (default) or a name from prerank.losses.")
LossOptOpt = typer.Option(None, "--loss-option", help="Loss option key=value (repeatable).")
BatchingOpt = typer.Option(None, "--batching", help="rows (pointwise) or requests (listwise, cascade data).")
StagesOpt = typer.Option(
    None,
    "--stages",
    help="Cascade stages to train on (request batching): full, no_random, no_candidates, no_candidates_random,"
    " or stage names joined by commas (RankTower Table 2).",
)
MaxListOpt = typer.Option(
    None,
    "--max-list-len",
    help="Request batching: cap rows per request; a longer list keeps one row of each tier, then its mix"
    " (or --stage-mix).",
)
StageMixOpt = typer.Option(
    None,
    "--stage-mix",
    help="Request batching: share of the --max-list-len cap per tier, e.g. clicked=1,unclicked=1,random=2 (tiers:"
    " clicked, unclicked, rank_candidate, prerank_candidate, random; left out = dropped), or a named mix: own (each"
    " list's own mix, the default) or even (the same share for every tier).",
)
RequestsOpt = typer.Option(None, "--requests-per-batch", help="Request batching: requests per batch (default 64).")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
