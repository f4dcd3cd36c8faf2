"""What the three feature-field selectors share: data input, the selection network, the training loop.

Each selector trains :class:`prerank.models.fscd.FSCDNet` over every field of the schema with a
per-field gate on the field embeddings (FSCD Fig. 2) and ranks the fields by a learned importance.
The interface follows scikit-learn: ``fit(data)`` returns ``self``; the learned state ends in ``_``:

- ``feature_names_``: the fields, in the network's order (user, context, item, cross);
- ``importances_`` ``[F]``: the method's importance per field (higher = keep);
- ``ranking_`` ``[F]``: rank per field, 1 = most important (as scikit-learn's ``RFE.ranking_``);
- ``selected_features_``: the ``k`` most important fields, most important first;
- ``model_``: the trained selection network (gates not included), ``gates_`` the gate parameters,
  ``schema_`` the schema fitted on, ``n_rows_`` the training rows per epoch, ``steps_`` optimizer steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.data.parquet import ParquetSplit, make_loader
from prerank.models.base import ConfigError
from prerank.models.fscd import FSCDConfig, FSCDNet
from prerank.schema import Schema
from prerank.train.trainer import progress_bar

Data = str | Path | Iterable[Batch]


def relaxed_bernoulli(logit_delta: Tensor, u: Tensor, temperature: float) -> Tensor:
    """FSCD Eq. 5: ``z = sigmoid((log d - log(1 - d) + log u - log(1 - u)) / t)`` with ``d = sigmoid(logit_delta)``.

    ``log d - log(1 - d)`` is ``logit_delta`` itself, which keeps the gate finite when ``d`` nears 0 or 1.
    Shapes: ``logit_delta`` ``[F]``, ``u`` ``[B, F]`` in (0, 1) -> ``z`` ``[B, F]``.
    """
    return torch.sigmoid((logit_delta + torch.log(u) - torch.log1p(-u)) / temperature)


class FieldSelector:
    """Base of the gated selectors; subclasses define the gate, its penalty and the importance.

    Args (shared by every selector):
        k: how many fields ``selected_features_`` keeps.
        schema: needed when ``fit`` gets batches rather than a dataset folder.
        hidden, embedding_dim: the selection network (default: the FSCD pre-ranker, 1024-256, so that
            fine-tuning the pre-ranker starts from every selection-run weight; see
            :func:`prerank.selection.fscd.finetune_state`).
        epochs, batch_size, lr, seed, max_steps: the selection run (Adam).
        progress: show a progress bar.
    """

    method = ""

    def __init__(
        self,
        k: int = 10,
        *,
        schema: Schema | None = None,
        hidden: tuple[int, ...] = (1024, 256),
        embedding_dim: int = 16,
        epochs: int = 1,
        batch_size: int = 2048,
        lr: float = 1e-3,
        seed: int = 0,
        max_steps: int | None = None,
        progress: bool = False,
    ):
        self.k = k
        self.schema = schema
        self.hidden = tuple(hidden)
        self.embedding_dim = embedding_dim
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.max_steps = max_steps
        self.progress = progress

    # ---------------------------------------------------------------- subclass hooks

    def _init_gates(self, net: FSCDNet) -> nn.Module:
        """The gate parameters for ``net``'s fields."""
        raise NotImplementedError

    def _gate(self, rows: int) -> Tensor:
        """Gates ``[B, F]`` (training) multiplying the field embeddings."""
        raise NotImplementedError

    def _penalty(self, z: Tensor, n_rows: int) -> Tensor:
        """The regulariser added to the batch's mean cross entropy."""
        raise NotImplementedError

    def _importances(self) -> np.ndarray:
        raise NotImplementedError

    def _check_schema(self, schema: Schema, data: Data) -> None:
        """A hook for method-specific schema checks (FSCD needs cost types)."""

    # ---------------------------------------------------------------- fit

    def _batches(self, data: Data, epoch: int) -> Iterable[Batch]:
        if isinstance(data, (str, Path)):
            loader = make_loader(data, "train", self.batch_size, shuffle=True, seed=self.seed, schema=self.schema_)
            loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
            return loader
        return data  # type: ignore[return-value]

    def _resolve(self, data: Data) -> tuple[Schema, int]:
        if isinstance(data, (str, Path)):
            schema = Schema.load(data)
            return schema, ParquetSplit(data, "train", schema).num_rows
        if self.schema is None:
            raise ConfigError("fit(batches) needs the selector's schema= (a dataset folder carries its own)")
        if isinstance(data, Iterator):
            raise ConfigError("fit needs a dataset folder or a re-iterable collection of batches, not an iterator")
        rows = sum(len(b) for b in data)
        if rows == 0:
            raise ConfigError("fit got no rows")
        return self.schema, rows

    def fit(self, data: Data) -> FieldSelector:
        """Train the gated network on ``data`` (a dataset folder's train split, or batches) and rank its fields."""
        schema, n_rows = self._resolve(data)
        self.schema_ = schema
        self._check_schema(schema, data)
        n_fields = len(schema.names)
        if not isinstance(self.k, int) or not 1 <= self.k <= n_fields:
            raise ConfigError(f"k must be between 1 and the number of fields ({n_fields}), got {self.k!r}")
        torch.manual_seed(self.seed)
        self.rng_ = torch.Generator().manual_seed(self.seed)
        config = FSCDConfig(embedding_dim=self.embedding_dim, hidden=self.hidden)
        net = FSCDNet(schema, config)
        self.feature_names_: tuple[str, ...] = net.names
        gates = self._init_gates(net)
        optimizer = torch.optim.Adam([*net.parameters(), *gates.parameters()], lr=self.lr)
        net.train()
        steps, t0 = 0, time.perf_counter()
        with progress_bar(self.progress) as bar:
            for epoch in range(self.epochs):
                task = bar.add_task(f"{self.method} epoch {epoch + 1}/{self.epochs}", total=n_rows, info="")
                seen = 0
                for batch in self._batches(data, epoch):
                    z = self._gate(len(batch))
                    logits = net.gated_logits(batch, z)
                    ce = nn.functional.binary_cross_entropy_with_logits(logits, batch.label)
                    loss = ce + self._penalty(z, n_rows)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps, seen = steps + 1, seen + len(batch)
                    if steps % 10 == 0:
                        bar.update(task, completed=seen, info=f"loss {loss.item():.4f}")
                    if self.max_steps and steps >= self.max_steps:
                        break
                bar.update(task, completed=n_rows)
                if self.max_steps and steps >= self.max_steps:
                    break
        net.eval()
        self.model_, self.gates_, self.n_rows_, self.steps_ = net, gates, n_rows, steps
        self.fit_seconds_ = time.perf_counter() - t0
        imp = self._importances()
        self.importances_ = imp
        order = np.argsort(-imp, kind="stable")
        ranking = np.empty(len(imp), dtype=np.int64)
        ranking[order] = np.arange(1, len(imp) + 1)
        self.ranking_ = ranking
        self.selected_features_ = tuple(self.feature_names_[i] for i in order[: self.k])
        return self

    def top(self, k: int) -> tuple[str, ...]:
        """The ``k`` most important fields of a fitted selector, most important first."""
        n = len(self.feature_names_)
        if not 1 <= k <= n:
            raise ConfigError(f"k must be between 1 and the number of fields ({n}), got {k}")
        order = np.argsort(self.ranking_)
        return tuple(self.feature_names_[i] for i in order[:k])

    def field_report(self) -> list[dict[str, Any]]:
        """One entry per field (schema order): its cost metadata, importance and rank."""
        from prerank.selection.fscd import complexity_terms

        index = {n: i for i, n in enumerate(self.feature_names_)}
        out = []
        for spec in self.schema_.features:
            i = index[spec.name]
            o, e, n = complexity_terms(spec, self.schema_, getattr(self, "n_source", "n_values"))
            out.append(
                {
                    "name": spec.name,
                    "tower": spec.tower,
                    "cost_type": spec.cost_type,
                    "o": o,
                    "e": e,
                    "n": n,
                    **self._extra_field_report(i),
                    "importance": float(self.importances_[i]),
                    "rank": int(self.ranking_[i]),
                }
            )
        return out

    def _extra_field_report(self, i: int) -> dict[str, float | None]:
        """Eq. 2 / Eq. 4 quantities with the paper's gammas (FSCD reports the ones it trained with)."""
        from prerank.selection.fscd import cost_table

        row = cost_table(self.schema_)[self.feature_names_[i]]
        return {"complexity": row["complexity"], "theta": row["theta"], "alpha": row["alpha"]}


def uniform(rng: torch.Generator, shape: tuple[int, ...], eps: float = 1e-6) -> Tensor:
    """``u ~ Uniform(eps, 1 - eps)`` (Eq. 5's noise, kept off 0 and 1 so its logit is finite)."""
    return torch.rand(shape, generator=rng) * (1 - 2 * eps) + eps
