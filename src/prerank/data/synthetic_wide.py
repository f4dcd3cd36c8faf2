"""A wide synthetic dataset with a known per-field ground truth, for feature-selection experiments (FSCD).

Every feature is categorical with ``vocab`` ids (1..vocab-1 used). Field ``j`` has a hidden effect table
``t_j[v]`` (standardised over its ids: mean 0, standard deviation 1) and a strength ``beta_j``; the true
click logit of a row is ``base + sum_j beta_j t_j[x_j]`` and ``label ~ Bernoulli(sigmoid(logit))``.
So a field's value is known: ``beta_j`` is the standard deviation it adds to the logit.

Fields, with their FSCD Table 1 cost types (see :data:`prerank.schema.COST_O`):

* ``u_cheap_*`` (user, type I) and ``i_cheap_*`` (item, type II): informative cheap fields, ``effect``;
* ``u_costly_*`` (user, type III) and ``x_costly_*`` (cross, type IV): informative costly fields, the
  same ``effect`` as the cheap ones (fields of similar value, different cost);
* ``x_star`` (cross, type IV): one very informative costly field, ``star_effect``;
* ``u_noise_*`` (user, III) and ``x_noise_*`` (cross, IV): costly noise, ``beta = 0``.

User fields are fixed per user, item fields per item, cross fields drawn per row (a user-item pair
feature). A request is one user with ``request_size`` random items; splits are by request (first
80% train, then valid, then test). ``meta.json`` holds each field's ``role`` and ``effect``.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prerank.data.parquet import read_meta, write_dataset
from prerank.schema import FeatureSpec, Schema

GENERATOR = "prerank.synthetic_wide"
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class WideConfig:
    """Sizes, numbers of fields per role and their strengths (logit standard deviations)."""

    n_users: int = 2000
    n_items: int = 1000
    vocab: int = 9
    n_cheap_user: int = 3
    n_cheap_item: int = 2
    n_costly_user: int = 2
    n_costly_cross: int = 2
    n_noise_user: int = 1
    n_noise_cross: int = 3
    effect: float = 0.6
    star_effect: float = 2.0
    base: float = -1.0
    request_size: int = 10
    valid_share: float = 0.1
    test_share: float = 0.1

    def __post_init__(self) -> None:
        if self.vocab < 3:
            raise ValueError(f"vocab must be >= 3, got {self.vocab}")
        if min(self.n_users, self.n_items, self.request_size) < 1:
            raise ValueError("n_users, n_items and request_size must be >= 1")
        if self.n_cheap_user + self.n_costly_user + self.n_noise_user < 1 or self.n_cheap_item < 1:
            raise ValueError("the wide schema needs at least one user field and one item field")
        if not (self.valid_share > 0 and self.test_share > 0 and self.valid_share + self.test_share < 1):
            raise ValueError("valid_share and test_share must be > 0 and sum to < 1")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> WideConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown synthetic-wide options {sorted(unknown)} (known: {sorted(known)})")
        return cls(**options)


def wide_fields(config: WideConfig = WideConfig()) -> list[tuple[FeatureSpec, str, float]]:
    """``(spec, role, effect)`` per field, in schema order."""
    v = config.vocab
    out: list[tuple[FeatureSpec, str, float]] = []

    def add(prefix: str, n: int, tower: str, cost: str, role: str, effect: float) -> None:
        for i in range(n):
            name = f"{prefix}_{i}"
            out.append((FeatureSpec(name, tower, "categorical", vocab_size=v, cost_type=cost), role, effect))  # type: ignore[arg-type]

    add("u_cheap", config.n_cheap_user, "user", "I", "cheap", config.effect)
    add("u_costly", config.n_costly_user, "user", "III", "costly", config.effect)
    add("u_noise", config.n_noise_user, "user", "III", "noise", 0.0)
    add("i_cheap", config.n_cheap_item, "item", "II", "cheap", config.effect)
    add("x_costly", config.n_costly_cross, "cross", "IV", "costly", config.effect)
    out.append(
        (FeatureSpec("x_star", "cross", "categorical", vocab_size=v, cost_type="IV"), "star", config.star_effect)
    )
    add("x_noise", config.n_noise_cross, "cross", "IV", "noise", 0.0)
    return out


def wide_schema(config: WideConfig = WideConfig()) -> Schema:
    return Schema(name="synthetic_wide", features=tuple(spec for spec, _, _ in wide_fields(config)))


def generate_wide(out: str | Path, rows: int = 50_000, seed: int = 0, **options: Any) -> Path:
    """Write the wide synthetic dataset (about ``rows`` rows, whole requests) to ``out`` and return it.

    ``out`` must be new, empty or an earlier wide synthetic dataset (which is replaced).
    """
    config = WideConfig.from_options(options)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive integer, got {rows!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if read_meta(out).get("generator") != GENERATOR:
            raise FileExistsError(f"{out} is not empty and holds no wide synthetic dataset")
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
    rng = np.random.default_rng(seed)
    fields = wide_fields(config)
    v = config.vocab
    n_requests = max(3, -(-rows // config.request_size))
    users = rng.integers(0, config.n_users, n_requests).repeat(config.request_size)
    items = rng.integers(0, config.n_items, len(users))
    n = len(users)
    logit = np.full(n, config.base)
    cols: dict[str, np.ndarray] = {}
    truth: dict[str, dict[str, Any]] = {}
    item_cols: dict[str, np.ndarray] = {}
    for spec, role, effect in fields:
        table = rng.standard_normal(v)
        table[1:] = (table[1:] - table[1:].mean()) / table[1:].std()
        table[0] = 0.0
        if spec.tower == "user":
            values = rng.integers(1, v, config.n_users)[users]
        elif spec.tower == "item":
            per_item = rng.integers(1, v, config.n_items)
            values = per_item[items]
            item_cols[spec.name] = per_item
        else:
            values = rng.integers(1, v, n)
        cols[spec.name] = values
        logit += effect * table[values]
        truth[spec.name] = {"role": role, "effect": effect, "cost_type": spec.cost_type}
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    request_id = np.arange(n_requests).repeat(config.request_size)
    n_valid = max(1, int(n_requests * config.valid_share))
    n_test = max(1, int(n_requests * config.test_share))
    n_train = n_requests - n_valid - n_test
    bounds = np.array([0, n_train, n_train + n_valid, n_requests]) * config.request_size
    splits = {}
    for i, split in enumerate(SPLITS):
        sl = slice(bounds[i], bounds[i + 1])
        data = {"request_id": pa.array(request_id[sl], pa.int64()), "label": pa.array(label[sl])}
        data |= {name: pa.array(col[sl], pa.int64()) for name, col in cols.items()}
        splits[split] = pa.table(data)
    items_table = pa.table({name: pa.array(col, pa.int64()) for name, col in item_cols.items()})
    meta = {
        "generator": GENERATOR,
        "seed": seed,
        "options": asdict(config),
        "ground_truth": {
            "fields": truth,
            "logit": "base + sum_j effect_j * t_j[x_j], t_j standardised over ids",
            "label_rate": float(label.mean()),
        },
    }
    write_dataset(out, wide_schema(config), splits, items=items_table, meta=meta)
    return out
