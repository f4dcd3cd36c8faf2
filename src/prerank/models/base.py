"""The one contract every prerank model keeps (DESIGN.md "The one contract").

``encode_user(batch) -> State``   once per request, online (user and context features)
``encode_item(batch) -> State``   offline, cached per item (item features only)
``score(user, item, pair) -> [B]`` per candidate, online; ``pair`` carries cross features

``forward(batch) == score(encode_user(batch), encode_item(batch), batch)``.

A ``State`` is a dict of tensors whose leading dimension is the row: the item cache stores each key
as ``[num_items, ...]`` and gathers rows by id, so every model is cacheable the same way.
``score`` broadcasts a user state with leading dimension 1 over N candidates.
Models return logits; sigmoid/softmax live in losses and metrics.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.schema import Schema

State = dict[str, Tensor]


class ConfigError(ValueError):
    """A model or training configuration is invalid."""


@dataclass(frozen=True)
class FeatureSelection:
    """Which schema features a model uses; ``None`` means all of that side."""

    user: tuple[str, ...]
    item: tuple[str, ...]
    cross: tuple[str, ...]

    @classmethod
    def resolve(
        cls, schema: Schema, features: tuple[str, ...] | None = None, *, use_cross: bool = True
    ) -> FeatureSelection:
        """User side = ``user`` + ``context`` towers; item side = ``item``; pair side = ``cross``."""
        keep = set(features) if features is not None else set(schema.names)
        unknown = keep - set(schema.names)
        if unknown:
            raise ConfigError(f"features {sorted(unknown)} are not in the schema")
        pick = lambda *towers: tuple(f.name for f in schema.tower(*towers) if f.name in keep)  # noqa: E731
        sel = cls(user=pick("user", "context"), item=pick("item"), cross=pick("cross") if use_cross else ())
        if not sel.user or not sel.item:
            raise ConfigError("a pre-ranker needs at least one user-side and one item-side feature")
        return sel


class PreRanker(nn.Module):
    """Base of every model: holds the schema and derives ``forward`` from the contract.

    Subclasses implement :meth:`encode_user`, :meth:`encode_item` and :meth:`score`; they may
    implement :meth:`auxiliary_loss` for regularisers that are part of their paper's objective
    (DAT's mimic loss, IntTower's CIR loss), which the trainer adds to the main loss.
    """

    def __init__(self, schema: Schema):
        super().__init__()
        self.schema = schema

    def encode_user(self, batch: Batch) -> State:
        raise NotImplementedError

    def encode_item(self, batch: Batch) -> State:
        raise NotImplementedError

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: Batch) -> Tensor:
        return self.score(self.encode_user(batch), self.encode_item(batch), batch)

    def auxiliary_loss(self, batch: Batch, user: State, item: State) -> Tensor | None:
        """Extra training loss of the model's paper (None if it has none)."""
        return None


def gather_rows(cache: State, rows: Tensor) -> State:
    """The states of item-cache ``rows`` ``[N]``, every key ``[N, ...]``. A bfloat16 state (a cache exported with
    ``--cache-dtype bfloat16``) comes back as float32, the dtype the models compute in."""
    out = {k: v.index_select(0, rows) for k, v in cache.items()}
    return {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in out.items()}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def config_from_dict(cls: type, values: dict) -> object:
    """Build a config dataclass from a plain dict, rejecting unknown keys and coercing lists to tuples."""
    names = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no options {sorted(unknown)} (known: {sorted(names)})")
    coerced = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    hints = typing.get_type_hints(cls)
    for key, value in coerced.items():
        if not _fits(value, hints[key]):
            raise ConfigError(f"{cls.__name__} option {key} must be {_describe(hints[key])}, got {value!r}")
    return cls(**coerced)


def _fits(value: object, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (the kinds config dataclasses use: scalars, Literal,
    ``X | None`` and homogeneous tuples); ints are accepted for floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    return "null" if hint is type(None) else str(getattr(hint, "__name__", hint))


def broadcast_rows(a: Tensor, n: int) -> Tensor:
    """Expand a user-side tensor with leading dim 1 to ``n`` rows (no copy)."""
    return a.expand(n, *a.shape[1:]) if a.shape[0] == 1 else a


def cross_fields(emb: nn.Module, pair: Batch | None, names: tuple[str, ...], n: int, dim: int) -> Tensor:
    """Cross-feature fields ``[N, F_c, D]`` from ``pair``; an error if the model needs them and they are absent."""
    if not names:
        return torch.zeros(n, 0, dim)
    if pair is None or any(c not in pair.features for c in names):
        raise ValueError(f"this model needs the cross features {list(names)} per candidate")
    return emb.fields(pair, names)
