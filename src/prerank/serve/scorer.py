"""Online scoring of one request: one user against N candidate items, with the item cache.

Plain Python and torch, no web framework (:mod:`prerank.serve.app` wraps it in HTTP). Per request the
scorer validates the input, runs the user graph once on one row, gathers the candidates' cached item
states by item id and runs only the score graph (DESIGN.md "The one contract"), on the runtime it was
opened with (:mod:`prerank.serve.runtime`: onnxruntime, torch.export programs or PyTorch eager).

Request values are already encoded as the schema's ids (the dataset's encoding): a categorical feature
is an int id in ``[0, vocab)`` (0 = unknown), a sequence a list of such ids (most recent last; longer
lists keep their last ``max_len``), a dense feature a finite number. A feature the model does not read
may be left out (it is treated as unknown); every feature the model reads must be given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from prerank.data.batch import Batch
from prerank.models.base import PreRanker
from prerank.schema import FeatureSpec, Schema
from prerank.serve.export import ItemCache, load_artifact
from prerank.serve.graphs import signature, unknown_rows
from prerank.serve.runtime import DEFAULT_RUNTIME, EagerRuntime, Runtime

UnknownItems = Literal["fail", "skip"]
DEFAULT_MAX_CANDIDATES = 10_000


class ScoringError(ValueError):
    """A request is invalid; ``field`` names the offending part (``user.age``, ``candidates``, ``cross.x``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RequestTooLarge(ScoringError):
    """A request has more candidates than the scorer accepts."""


@dataclass(frozen=True)
class ScoreResult:
    """Scores (logits) of the scored candidates.

    Without ``k`` the candidates keep their request order; with ``k`` they are the top ``k`` by score,
    highest first (ties keep request order). ``skipped`` lists unknown item ids left out.
    """

    ids: list[int]
    scores: list[float]
    skipped: list[int] = field(default_factory=list)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _int_array(name: str, values: object, what: str) -> np.ndarray:
    """``values`` as a 1-d int64 array, or a :class:`ScoringError` naming ``name``."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as e:
        raise ScoringError(name, f"must be a list of integer {what}: {e}") from e
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ScoringError(name, f"must be a flat list of integer {what}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ScoringError(name, f"has {what} too large for int64")
    return arr.astype(np.int64, copy=False)


def _check_ids(name: str, ids: np.ndarray, vocab: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)]
        raise ScoringError(name, f"ids {bad[:5].tolist()} lie outside the vocabulary [0, {vocab})")


def _padded(ids: np.ndarray, max_len: int) -> np.ndarray:
    """Keep the last ``max_len`` ids, left-aligned and 0-padded (as the Parquet reader does)."""
    out = np.zeros(max_len, dtype=np.int64)
    tail = ids[-max_len:] if ids.size else ids
    out[: tail.size] = tail
    return out


class Scorer:
    """Scores one user against N cached candidate items.

    Args:
        runtime: runs the model's graphs (:mod:`prerank.serve.runtime`); its signature names the features it reads.
        cache: the item cache (:class:`~prerank.serve.export.ItemCache`) of the same model.
        schema: the schema the model was built on (feature kinds and vocabularies, to check requests).
        threads: intra-op threads (``torch.set_num_threads``, process-wide; onnxruntime's are set when its
            sessions are opened, see :meth:`load`).
        unknown_items: ``"fail"`` rejects a request naming an item id not in the cache;
            ``"skip"`` scores the others and lists the unknown ones in the result.
        max_candidates: requests with more candidates raise :class:`RequestTooLarge`.
        manifest: the artifact's manifest, for metadata.
    """

    def __init__(
        self,
        runtime: Runtime,
        cache: ItemCache,
        schema: Schema,
        *,
        threads: int = 1,
        unknown_items: UnknownItems = "fail",
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        manifest: dict[str, Any] | None = None,
    ):
        if unknown_items not in ("fail", "skip"):
            raise ValueError(f"unknown_items must be 'fail' or 'skip', got {unknown_items!r}")
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        if not isinstance(max_candidates, int) or max_candidates < 1:
            raise ValueError(f"max_candidates must be an integer >= 1, got {max_candidates!r}")
        self.runtime = runtime
        self.schema = schema
        self.cache = cache
        self.threads = threads
        self.unknown_items = unknown_items
        self.max_candidates = max_candidates
        self.manifest = manifest or {}
        sig = runtime.signature
        self.required_user, self.required_cross = sig.user_features, sig.cross_features
        torch.set_num_threads(threads)
        self.warm_up()

    @classmethod
    def from_model(cls, model: PreRanker, cache: ItemCache, **options: Any) -> Scorer:
        """A scorer of an in-memory model run eagerly (no export), e.g. a freshly trained one."""
        return cls(EagerRuntime(model.eval(), signature(model)), cache, model.schema, **options)

    def warm_up(self) -> None:
        """Score the unknown item (cache row 0) for an all-unknown user once, so that the first real request
        does not pay for first-use allocations."""
        user = Batch(features={f.name: unknown_rows(f, 1) for f in self.schema.tower("user", "context")})
        cross = self.schema.tower("cross")
        pair = Batch(features={f.name: unknown_rows(f, 1) for f in cross}) if cross else None
        self.logits(user, torch.zeros(1, dtype=torch.int64), pair)

    @classmethod
    def load(
        cls,
        artifact: str | Path,
        *,
        runtime: str = DEFAULT_RUNTIME,
        threads: int = 1,
        unknown_items: UnknownItems = "fail",
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
    ) -> Scorer:
        """Load a verified artifact (:func:`~prerank.serve.export.load_artifact`) on ``runtime`` and wrap it."""
        art = load_artifact(artifact, runtime=runtime, threads=threads)
        return cls(
            art.runtime,
            art.cache,
            art.schema,
            threads=threads,
            unknown_items=unknown_items,
            max_candidates=max_candidates,
            manifest=art.manifest,
        )

    # ------------------------------------------------------------------------------- requests

    def user_batch(self, user: Mapping[str, object]) -> Batch:
        """Validate one user's features and return them as a batch of one row."""
        if not isinstance(user, Mapping):
            raise ScoringError("user", "must be an object mapping feature names to values")
        side = {f.name: f for f in self.schema.tower("user", "context")}
        for name in user:
            if name not in side:
                where = (
                    f"it belongs to the {self.schema[name].tower} tower" if name in self.schema else "not in the schema"
                )
                raise ScoringError(f"user.{name}", f"is not a user or context feature ({where})")
        missing = [n for n in self.required_user if n not in user]
        if missing:
            raise ScoringError("user", f"missing features {missing} that the model reads")
        feats = {
            name: self._user_value(f, user[name]) if name in user else unknown_rows(f, 1) for name, f in side.items()
        }
        return Batch(features=feats)

    def _user_value(self, f: FeatureSpec, value: object) -> Tensor:
        """One user feature as ``[1]`` (categorical, dense) or ``[1, L]`` (sequence)."""
        name = f"user.{f.name}"
        if f.kind == "dense":
            if not _is_number(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
                raise ScoringError(name, f"must be a finite number, got {value!r}")
            return torch.tensor([float(value)], dtype=torch.float32)  # type: ignore[arg-type]
        vocab = self.schema.vocab(f.name)
        if f.kind == "categorical":
            if not _is_int(value):
                raise ScoringError(name, f"must be an integer id, got {value!r}")
            if not 0 <= value < vocab:  # type: ignore[operator]
                raise ScoringError(name, f"id {value} lies outside the vocabulary [0, {vocab})")
            return torch.tensor([int(value)], dtype=torch.int64)  # type: ignore[call-overload]
        if not isinstance(value, (list, tuple, np.ndarray)) or any(not _is_int(v) for v in value):
            raise ScoringError(name, "must be a list of integer ids")
        ids = _int_array(name, value, "ids")
        _check_ids(name, ids, vocab)
        return torch.from_numpy(_padded(ids, f.max_len)).unsqueeze(0)

    def candidate_ids(self, candidates: Sequence[int] | np.ndarray) -> Tensor:
        """Validate candidate item ids: ``[N]`` int64, 1 <= N <= ``max_candidates``, ids >= 0."""
        if isinstance(candidates, (str, bytes, Mapping)) or not hasattr(candidates, "__len__"):
            raise ScoringError("candidates", "must be a list of item ids")
        if len(candidates) == 0:
            raise ScoringError("candidates", "is empty; give at least one item id")
        if len(candidates) > self.max_candidates:
            raise RequestTooLarge(
                "candidates", f"has {len(candidates)} items, more than the limit of {self.max_candidates}"
            )
        ids = _int_array("candidates", candidates, "item ids")
        if ids.min() < 0:
            raise ScoringError("candidates", f"item ids must be >= 0, got {ids[ids < 0][:5].tolist()}")
        return torch.from_numpy(ids)

    def pair_batch(self, cross: Mapping[str, Sequence[object]] | None, n: int) -> Batch | None:
        """Validate per-candidate cross features (each a list of ``n`` values) as a batch of ``n`` rows.

        Features the model does not read are checked for length only and passed on as unknown.
        """
        cross = {} if cross is None else cross
        if not isinstance(cross, Mapping):
            raise ScoringError("cross", "must be an object mapping cross feature names to lists")
        specs = {f.name: f for f in self.schema.tower("cross")}
        for name in cross:
            if name not in specs:
                raise ScoringError(f"cross.{name}", "is not a cross feature of the schema")
        missing = [c for c in self.required_cross if c not in cross]
        if missing:
            raise ScoringError("cross", f"missing cross features {missing} that the model needs per candidate")
        if not specs:
            return None
        feats = {}
        for name, f in specs.items():
            given = cross.get(name)
            if name in self.required_cross:
                feats[name] = self._cross_column(f, given, n)
                continue
            # a cross feature the model does not read: check its length, skip converting N values for nothing
            if given is not None and (not isinstance(given, (list, tuple, np.ndarray)) or len(given) != n):
                raise ScoringError(f"cross.{name}", f"must be a list with one value per candidate ({n})")
            feats[name] = unknown_rows(f, n)
        return Batch(features=feats)

    def _cross_column(self, f: FeatureSpec, values: object, n: int) -> Tensor:
        """One cross feature for ``n`` candidates: ``[n]`` or ``[n, L]``."""
        name = f"cross.{f.name}"
        if not isinstance(values, (list, tuple, np.ndarray)) or len(values) != n:
            got = len(values) if isinstance(values, (list, tuple, np.ndarray)) else type(values).__name__
            raise ScoringError(name, f"must be a list with one value per candidate ({n}), got {got}")
        if f.kind == "dense":
            try:
                arr = np.asarray(values)
            except (ValueError, TypeError) as e:
                raise ScoringError(name, f"must be a list of numbers: {e}") from e
            if arr.ndim != 1 or arr.dtype.kind not in "iuf" or not np.isfinite(arr).all():
                raise ScoringError(name, "must be a flat list of finite numbers")
            return torch.from_numpy(arr.astype(np.float32))
        vocab = self.schema.vocab(f.name)
        if f.kind == "categorical":
            ids = _int_array(name, values, "ids")
            _check_ids(name, ids, vocab)
            return torch.from_numpy(ids)
        rows = [_int_array(f"{name}.{i}", v, "ids") for i, v in enumerate(values)]
        for i, r in enumerate(rows):
            _check_ids(f"{name}.{i}", r, vocab)
        return torch.from_numpy(np.stack([_padded(r, f.max_len) for r in rows]))

    # ------------------------------------------------------------------------------- scoring

    def logits(self, user: Batch, rows: Tensor, pair: Batch | None) -> Tensor:
        """Logits ``[N]`` of cache ``rows`` ``[N]`` for a validated user batch of one row and cross features."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        sig = self.runtime.signature
        cross = [pair.features[n] for n in sig.cross_features] if pair is not None else []
        with torch.inference_mode():
            return self.runtime.request([user.features[n] for n in sig.user_features], self.cache.states, rows, cross)

    def score(
        self,
        user: Mapping[str, object],
        candidates: Sequence[int] | np.ndarray,
        *,
        k: int | None = None,
        cross: Mapping[str, Sequence[object]] | None = None,
    ) -> ScoreResult:
        """Score ``candidates`` (item ids) for ``user``; the top ``k`` sorted by score if ``k`` is given.

        ``cross`` maps each cross feature to one value per candidate, in candidate order.
        Raises :class:`ScoringError` (``field`` names the problem) or :class:`RequestTooLarge`.
        """
        if k is not None and (not _is_int(k) or k < 1):
            raise ScoringError("k", f"must be an integer >= 1, got {k!r}")
        ids = self.candidate_ids(candidates)
        user_batch = self.user_batch(user)
        pair = self.pair_batch(cross, len(ids))
        rows = self.cache.rows(ids)
        unknown = rows == 0
        skipped: list[int] = []
        if bool(unknown.any()):
            bad = ids[unknown].tolist()
            if self.unknown_items == "fail":
                more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
                raise ScoringError("candidates", f"unknown item ids {bad[:10]}{more} are not in the item cache")
            skipped = bad
            keep = ~unknown
            ids, rows = ids[keep], rows[keep]
            pair = pair.select(keep) if pair is not None else None
            if len(ids) == 0:
                return ScoreResult(ids=[], scores=[], skipped=skipped)
        logits = self.logits(user_batch, rows, pair)
        if k is not None:
            order = torch.sort(logits, descending=True, stable=True).indices[:k]
            ids, logits = ids[order], logits[order]
        return ScoreResult(ids=ids.tolist(), scores=logits.tolist(), skipped=skipped)

    def metadata(self) -> dict[str, Any]:
        """What the service reports at ``GET /metadata``."""
        m = self.manifest
        return {
            "model": m.get("model_name"),
            "runtime": self.runtime.name,
            "weights_sha256": m.get("weights_sha256"),
            "num_items": self.cache.num_items,
            "cache_dtype": self.cache.cache_dtype,
            "prerank_version": m.get("prerank_version"),
            "created": m.get("created"),
            "threads": self.threads,
            "unknown_items": self.unknown_items,
            "max_candidates": self.max_candidates,
            "required_user_features": list(self.required_user),
            "required_cross_features": list(self.required_cross),
            "schema": self.schema.to_dict(),
        }
