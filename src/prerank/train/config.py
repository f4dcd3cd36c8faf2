"""Training configuration: typed, validated, from a YAML file and/or flags."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from prerank.models.base import ConfigError

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "adagrad", "sgd")
#: Validation metrics for early stopping. The listwise ones (cascade data: a ``stage`` column) are
#: computed over each request's full list, as in :func:`prerank.evaluate.listwise.listwise_metrics`.
POINTWISE_METRICS: tuple[str, ...] = ("auc", "gauc", "logloss")
METRICS: tuple[str, ...] = (*POINTWISE_METRICS, "recall@10", "ndcg@10", "hard_recall@10", "hard_ndcg@10")


@dataclass(frozen=True)
class TrainConfig:
    """Everything the trainer owns. Validated on construction.

    ``epochs`` and ``batch_size`` left at None are chosen from the number of training rows by
    :func:`auto_schedule` when training starts (the trainer logs and records what it chose).
    ``metric`` picks the validation metric for early stopping and the best checkpoint
    (``logloss`` is minimised, the others maximised); an epoch counts as an improvement only when it
    beats the best by more than ``min_delta``, and training stops after ``patience`` epochs without one.
    ``batching="requests"`` trains on whole requests (listwise losses on cascade data);
    ``requests_per_batch`` and ``max_list_len`` size them; a list over the cap keeps the share of each
    tier (clicked / unclicked impressions, rank and pre-rank candidates, random items) that ``stage_mix``
    sets (tier weights, or a :data:`~prerank.data.requests.STAGE_MIXES` name), or its own mix when None
    (:func:`prerank.data.requests.list_quotas`). ``shuffle_buffer_rows`` bounds the
    rows held for shuffling (training memory grows with it, not with the split). Under ``torchrun`` the batch sizes
    and the buffer are global, split evenly over the ranks (:mod:`prerank.train.distributed`).
    """

    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int = 16384
    shuffle_buffer_rows: int = 262_144
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "adagrad", "sgd"] = "adam"
    grad_clip: float | None = None
    threads: int = 2
    seed: int = 0
    patience: int = 3
    min_delta: float = 0.0
    metric: Literal["auc", "gauc", "logloss", "recall@10", "ndcg@10", "hard_recall@10", "hard_ndcg@10"] = "auc"
    num_workers: int = 0
    max_steps: int | None = None
    batching: Literal["rows", "requests"] = "rows"
    requests_per_batch: int = 64
    max_list_len: int | None = None
    stages: tuple[str, ...] | None = None
    stage_mix: dict[str, float] | str | None = None
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "eval_batch_size", "shuffle_buffer_rows", "threads", "requests_per_batch")
        for name in positive:
            if name in ("epochs", "batch_size") and getattr(self, name) is None:
                continue  # chosen by auto_schedule
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"train option {name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ConfigError(f"train option lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError("train option weight_decay must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train option optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.metric not in METRICS:
            raise ConfigError(f"train option metric must be one of {METRICS}, got {self.metric!r}")
        if self.patience < 1:
            raise ConfigError("train option patience must be >= 1 (epochs without improvement before stopping)")
        if not self.min_delta >= 0:
            raise ConfigError("train option min_delta must be >= 0")
        if self.num_workers < 0:
            raise ConfigError("train option num_workers must be >= 0")
        if self.batching not in ("rows", "requests"):
            raise ConfigError(f"train option batching must be 'rows' or 'requests', got {self.batching!r}")
        if self.max_list_len is not None and self.max_list_len < 1:
            raise ConfigError("train option max_list_len must be >= 1")
        if self.stage_mix is not None:
            from prerank.data.requests import resolve_stage_mix

            try:
                resolve_stage_mix(self.stage_mix)
            except ValueError as e:
                raise ConfigError(f"train option {e}") from None
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("train option max_steps must be >= 1")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError("train option grad_clip must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: :func:`auto_schedule`'s rule: batch = rows // ROWS_PER_BATCH_STEP clamped to [MIN_BATCH, MAX_BATCH] and rounded
#: down to a power of two; epochs = enough for TARGET_STEPS optimizer steps, clamped to [MIN_EPOCHS, MAX_EPOCHS].
ROWS_PER_BATCH_STEP, MIN_BATCH, MAX_BATCH = 200, 64, 2048
TARGET_STEPS, MIN_EPOCHS, MAX_EPOCHS = 2000, 5, 30


def auto_schedule(n_train_rows: int) -> tuple[int, int]:
    """``(batch_size, epochs)`` for a training split of ``n_train_rows`` rows, so that small data gets enough steps.

    The batch is ``rows // 200`` clamped to [64, 2048] and rounded down to a power of two (about 200 steps an
    epoch on mid-sized data, 2048 rows a step on large data); the epochs are as many as it takes to reach about
    2,000 optimizer steps, at least 5 (the old default, so large data trains as before) and at most 30. Early
    stopping on the valid split (``patience``) ends most runs well before the cap. E.g. 12,000 rows -> (64, 11);
    200,000 rows -> (512, 6); 1,000,000 rows -> (2048, 5).
    """
    if n_train_rows < 1:
        raise ConfigError(f"the training split is empty ({n_train_rows} rows)")
    raw = min(max(n_train_rows // ROWS_PER_BATCH_STEP, MIN_BATCH), MAX_BATCH)
    batch = 1 << (raw.bit_length() - 1)
    steps_per_epoch = math.ceil(n_train_rows / batch)
    epochs = min(max(math.ceil(TARGET_STEPS / steps_per_epoch), MIN_EPOCHS), MAX_EPOCHS)
    return batch, epochs


@dataclass(frozen=True)
class RunConfig:
    """A YAML run file: which model (with config overrides), how to train it, which loss.

    ```yaml
    model: two_tower
    model_config: {embedding_dim: 16, similarity: cosine}
    loss: bce                  # or e.g. "hybrid", see prerank.losses
    loss_options: {}
    train: {epochs: 5, lr: 0.001, batch_size: 2048}
    ```
    """

    model: str | None = None
    model_config: dict | None = None
    loss: str = "bce"
    loss_options: dict | None = None
    train: TrainConfig = TrainConfig()


def train_config(values: dict[str, Any] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default config) with ``values`` applied; unknown keys and bad types are errors."""
    base = base or TrainConfig()
    values = {k: v for k, v in (values or {}).items() if v is not None}
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown train options {sorted(unknown)} (known: {sorted(known)})")
    if isinstance(values.get("stages"), list):
        values["stages"] = tuple(values["stages"])
    for key in ("lr", "weight_decay", "grad_clip", "min_delta"):
        if key in values and isinstance(values[key], int | str):
            try:
                values[key] = float(values[key])
            except ValueError as e:
                raise ConfigError(f"train option {key} must be a number, got {values[key]!r}") from e
    return replace(base, **values)


def load_run_config(path: str | Path) -> RunConfig:
    """Parse a YAML run file into a :class:`RunConfig` (clear errors for unknown keys)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    known = {f.name for f in fields(RunConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    for key in ("model_config", "loss_options", "train"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{path}: '{key}' must be a mapping")
    return RunConfig(
        model=raw.get("model"),
        model_config=raw.get("model_config"),
        loss=str(raw.get("loss", "bce")),
        loss_options=raw.get("loss_options"),
        train=train_config(raw.get("train")),
    )
