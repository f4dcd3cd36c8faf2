"""Checkpoints: a model's name, config, schema and weights, plus the trainer's resumable state.

Written atomically; read with ``weights_only=True`` so a checkpoint can never run code.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prerank.io import CheckpointError, atomic_torch_save, safe_torch_load
from prerank.models.base import ConfigError, PreRanker
from prerank.models.registry import MODELS, build_model
from prerank.schema import Schema

FORMAT = "prerank-checkpoint-v1"


def model_payload(name: str, model: PreRanker) -> dict[str, Any]:
    """Everything needed to rebuild ``model``: registry name, config, schema and weights."""
    return {
        "format": FORMAT,
        "model_name": name,
        "model_config": asdict(model.config),  # type: ignore[arg-type]
        "schema": model.schema.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_checkpoint(path: str | Path, name: str, model: PreRanker, trainer_state: dict | None = None) -> None:
    payload = model_payload(name, model)
    payload["trainer"] = trainer_state or {}
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint dict (safe loading; clear errors for foreign or damaged files)."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a prerank checkpoint (expected format {FORMAT!r})")
    if ckpt.get("model_name") not in MODELS:
        raise CheckpointError(f"{path}: model {ckpt.get('model_name')!r} is not in this version's registry")
    return ckpt


def model_from_payload(ckpt: dict[str, Any], source: str = "checkpoint") -> tuple[str, PreRanker]:
    schema = Schema.from_dict(ckpt["schema"])
    name = ckpt["model_name"]
    stored = ckpt["model_config"]
    legacy = getattr(type(MODELS[name][1]), "LEGACY", {})
    try:
        model = build_model(name, schema, {**{k: v for k, v in legacy.items() if k not in stored}, **stored})
    except ConfigError as e:
        raise CheckpointError(f"{source}: model {name!r} cannot be built from its stored config: {e}") from e
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{source}: weights do not match model {name!r}: {e}") from e
    model.eval()
    return name, model


def load_model(path: str | Path) -> tuple[str, PreRanker, dict[str, Any]]:
    """Rebuild the model of a checkpoint in eval mode; returns (registry name, model, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    name, model = model_from_payload(ckpt, str(path))
    return name, model, ckpt
