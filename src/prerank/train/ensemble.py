"""Training an ensemble (:class:`~prerank.models.ensemble.Ensemble`) the way ensembles are meant to be trained:
each member on its own, with its own seed and its own early stopping, then their weights put side by side."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from prerank.models.base import ConfigError, PreRanker
from prerank.models.ensemble import Ensemble, EnsembleConfig
from prerank.models.registry import model_config
from prerank.schema import Schema
from prerank.train.config import TrainConfig
from prerank.train.trainer import TrainResult, train_model


def train_ensemble(
    member: str,
    member_overrides: dict | None,
    members: int,
    data_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    log: Callable[[str], None] = print,
) -> tuple[Ensemble, list[TrainResult]]:
    """Train ``members`` copies of registered model ``member`` on ``data_dir``, member k with seed
    ``config.seed + k`` in ``out_dir/member-k``, and return the ensemble of their best checkpoints (eval mode)
    with each member's training result."""
    if members < 1:
        raise ConfigError(f"an ensemble needs at least one member, got {members}")
    out_dir = Path(out_dir)
    results = []
    for k in range(members):
        log(f"ensemble member {k + 1}/{members} (seed {config.seed + k})")
        cfg = replace(config, seed=config.seed + k)
        results.append(train_model(member, data_dir, out_dir / f"member-{k}", member_overrides, cfg, log=log))
    full = asdict(model_config(member, member_overrides))  # type: ignore[arg-type]
    ensemble = Ensemble(Schema.load(data_dir), EnsembleConfig(model=member, members=members, model_config=full))
    for m, r in zip(ensemble.members, results, strict=True):
        m.load_state_dict(r.model.state_dict())
    return ensemble.eval(), results


def fit(
    name: str,
    overrides: dict | None,
    data_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    log: Callable[[str], None] = print,
) -> PreRanker:
    """The best model of registered ``name`` trained on ``data_dir``: :func:`train_model`, or for ``ensemble``
    (``overrides`` as :class:`EnsembleConfig`'s fields) :func:`train_ensemble`."""
    if name != "ensemble":
        return train_model(name, data_dir, out_dir, overrides, config, log=log).model
    cfg = model_config(name, overrides)
    return train_ensemble(cfg.model, cfg.model_config, cfg.members, data_dir, out_dir, config, log)[0]
