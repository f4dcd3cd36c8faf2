"""FSCD: learnable feature selection by feature complexity and variational dropout.

Ma et al., "Towards a Better Tradeoff between Effectiveness and Efficiency in Pre-Ranking: A Learnable
Feature Selection based Approach" (SIGIR 2021), Sec. 2.1-2.2, Eqs. 1-6, Algorithm 1, Table 1.

Algorithm 1, as implemented here:

1. per field ``j``: ``c_j = g1 o_j + g2 e_j + g3 n_j`` (Eq. 2, ``g = (1, 1e-2, 1e-7)``, ``o_j`` from
   Table 1 by the schema's ``cost_type``), ``theta_j = 1 - sigmoid(c_j)`` (Eq. 2) and
   ``alpha_j = log(1 - theta_j) - log(theta_j)`` (Eq. 4; note that this equals ``c_j``);
2. the interaction-focused network (:class:`prerank.models.fscd.FSCDNet`) with field ``j``'s embedding
   multiplied by ``z_j`` relaxed as Eq. 5 (temperature ``t = 0.1``) from a learned ``delta_j in (0, 1)``;
3. train on Eq. 3 and rank the fields by ``delta``; keep the top ``K``;
4. fine-tune the pre-ranker on the ``K`` fields from the selection run's weights without gates
   (Eq. 6): :func:`finetune_state` maps the selection network's weights onto the pre-ranker, and
   ``prerank select-finetune`` trains it with the ordinary trainer (BCE = Eq. 6's log-likelihood).

Readings of what the paper leaves open:

- ``e_j`` is the schema's ``embedding_dim`` of the field (the width it has in the online system, even
  though prerank's networks share one width); ``n_j`` is, by default, the schema's ``n_values`` (values
  per sample). The paper calls ``n_j`` "the number of keys"; ``g3 = 1e-7`` suggests an embedding-table
  size, so ``n_source="vocab"`` uses the vocabulary size instead (dense fields: 1).
- Eq. 3 in mini-batches: the cross entropy is the batch mean (``-1/N log P`` estimated on B rows); the
  prior terms are not per sample, so every step adds ``(lambda ||w||^2 + lambda ||v||^2 + sum_j alpha_j
  z_j) / N`` with ``N`` the number of training rows (``prior_scale=None``, the literal reading), where
  ``z_j`` is the batch mean of the relaxed gate (an unbiased estimate of ``E[z_j] = delta_j`` as
  ``t -> 0``). With billions of rows, as in the paper, ``1/N`` makes the prior nearly vanish; on small
  data the same happens only slowly, so ``prior_scale`` can replace ``1/N`` by a constant (the prior's
  weight relative to one sample's cross entropy, e.g. ``1e-2``).
- ``lambda`` (the Gaussian prior on ``v`` and ``w``, Eq. 7) is a constructor argument ``l2``, 0 by
  default (the trainer's default is no weight decay either).
- ``u_j`` is drawn per row and field (each sample sees its own dropout mask, as in concrete dropout),
  ``delta`` starts at ``init_keep`` (0.5: an uninformative start; the prior enters only through Eq. 3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from prerank.models.base import ConfigError
from prerank.models.fscd import FSCDNet
from prerank.schema import FeatureSpec, Schema
from prerank.selection.base import Data, FieldSelector, relaxed_bernoulli, uniform

#: FSCD Sec. 3.1: ``gamma_1 = 1, gamma_2 = 1e-2, gamma_3 = 1e-7``.
GAMMAS: tuple[float, float, float] = (1.0, 1e-2, 1e-7)
#: FSCD Sec. 2.1 / 3.1: the relaxation temperature of Eq. 5.
TEMPERATURE = 0.1


def complexity_terms(
    spec: FeatureSpec, schema: Schema | None = None, n_source: str = "n_values"
) -> tuple[float, int, int]:
    """``(o_j, e_j, n_j)`` of a field: Table 1's cost of its type, its embedding width, its number of values."""
    if n_source == "vocab":
        n = 1 if spec.kind == "dense" else (schema.vocab(spec.name) if schema is not None else spec.vocab_size)
    else:
        n = spec.n_values
    return spec.cost_o, spec.embedding_dim, int(n)


def complexity(o: float, e: float, n: float, gammas: tuple[float, float, float] = GAMMAS) -> float:
    """Eq. 2's ``c_j = G(o_j, e_j, n_j) = g1 o_j + g2 e_j + g3 n_j`` (the paper's linear choice)."""
    return gammas[0] * o + gammas[1] * e + gammas[2] * n


def prior_keep(c: float | np.ndarray) -> float | np.ndarray:
    """Eq. 2: ``theta_j = H(c_j) = 1 - sigmoid(c_j)``, the prior probability of keeping field ``j``."""
    return 1.0 - 1.0 / (1.0 + np.exp(-np.asarray(c, dtype=np.float64)))


def penalty_weight(theta: float | np.ndarray) -> float | np.ndarray:
    """Eq. 4: ``alpha_j = log(1 - theta_j) - log(theta_j)`` (increases with the complexity)."""
    theta = np.asarray(theta, dtype=np.float64)
    return np.log1p(-theta) - np.log(theta)


def cost_table(
    schema: Schema, gammas: tuple[float, float, float] = GAMMAS, n_source: str = "n_values"
) -> dict[str, dict[str, float]]:
    """Per field: ``o, e, n, complexity, theta, alpha`` (Eqs. 2 and 4)."""
    out = {}
    for spec in schema.features:
        o, e, n = complexity_terms(spec, schema, n_source)
        c = complexity(o, e, n, gammas)
        theta = float(prior_keep(c))
        out[spec.name] = {
            "o": o,
            "e": e,
            "n": n,
            "complexity": c,
            "theta": theta,
            "alpha": float(penalty_weight(theta)),
        }
    return out


class _Delta(nn.Module):
    def __init__(self, n_fields: int, init_keep: float):
        super().__init__()
        self.logit = nn.Parameter(torch.full((n_fields,), math.log(init_keep) - math.log1p(-init_keep)))


class FSCD(FieldSelector):
    """FSCD selector (Algorithm 1, steps 1-3). Importance = ``delta_j``, the learned posterior keep probability.

    Extra args: ``gammas`` (Eq. 2), ``temperature`` (Eq. 5), ``prior_scale`` (``None``: ``1/N``, see the
    module docstring), ``l2`` (``lambda`` of Eq. 3), ``init_keep`` (start value of ``delta``),
    ``n_source`` (``"n_values"`` or ``"vocab"`` for ``n_j``). After ``fit`` also ``complexity_``,
    ``theta_``, ``alpha_`` and ``delta_`` ``[F]`` in the order of ``feature_names_``.
    """

    method = "fscd"

    def __init__(
        self,
        k: int = 10,
        *,
        gammas: tuple[float, float, float] = GAMMAS,
        temperature: float = TEMPERATURE,
        prior_scale: float | None = None,
        l2: float = 0.0,
        init_keep: float = 0.5,
        n_source: Literal["n_values", "vocab"] = "n_values",
        **kwargs,
    ):
        super().__init__(k, **kwargs)
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if not 0.0 < init_keep < 1.0:
            raise ConfigError(f"init_keep must be in (0, 1), got {init_keep}")
        if n_source not in ("n_values", "vocab"):
            raise ConfigError(f"n_source must be 'n_values' or 'vocab', got {n_source!r}")
        self.gammas = tuple(gammas)
        self.temperature = temperature
        self.prior_scale = prior_scale
        self.l2 = l2
        self.init_keep = init_keep
        self.n_source = n_source

    def _check_schema(self, schema: Schema, data: Data) -> None:
        if isinstance(data, (str, Path)):
            require_cost_types(Path(data))

    def _init_gates(self, net: FSCDNet) -> nn.Module:
        costs = cost_table(self.schema_, self.gammas, self.n_source)
        rows = [costs[n] for n in net.names]
        self.complexity_ = np.array([r["complexity"] for r in rows])
        self.theta_ = np.array([r["theta"] for r in rows])
        self.alpha_ = np.array([r["alpha"] for r in rows])
        self._alpha = torch.tensor(self.alpha_, dtype=torch.float32)
        self._net = net
        self._delta = _Delta(len(net.names), self.init_keep)
        return self._delta

    def _gate(self, rows: int) -> Tensor:
        u = uniform(self.rng_, (rows, len(self.feature_names_)))
        return relaxed_bernoulli(self._delta.logit, u, self.temperature)

    def _penalty(self, z: Tensor, n_rows: int) -> Tensor:
        scale = 1.0 / n_rows if self.prior_scale is None else self.prior_scale
        total = (self._alpha * z.mean(0)).sum()
        if self.l2:
            total = total + self.l2 * sum(p.pow(2).sum() for p in self._net.parameters())
        return scale * total

    def _importances(self) -> np.ndarray:
        self.delta_ = torch.sigmoid(self._delta.logit.detach()).double().numpy()
        return self.delta_

    def _extra_field_report(self, i: int) -> dict[str, float | None]:
        return {
            "complexity": float(self.complexity_[i]),
            "theta": float(self.theta_[i]),
            "alpha": float(self.alpha_[i]),
        }


def require_cost_types(root: str | Path) -> None:
    """Fail unless every feature of ``root/schema.json`` states its FSCD ``cost_type`` (Table 1).

    A schema without them would silently price every field as type I, which makes FSCD's prior uniform.
    """
    path = Path(root)
    path = path / "schema.json" if path.is_dir() else path
    raw = json.loads(path.read_text())
    missing = [f.get("name") for f in raw.get("features", []) if "cost_type" not in f]
    if missing:
        raise ConfigError(f"FSCD needs each feature's cost_type (I-IV, FSCD Table 1) in {path}; missing for {missing}")


def finetune_state(
    selection_state: dict[str, Tensor],
    selection_names: tuple[str, ...],
    target: FSCDNet,
    field_scale: dict[str, float] | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """The pre-ranker's initial weights from the selection network's (Eq. 6: ``v', w'`` start at ``v, w``).

    Embedding tables and dense maps of the kept fields are copied; the first layer keeps the blocks
    ``W_{1,j}`` of the kept fields (in the target's field order); the bias and deeper layers are copied
    when their shapes match. ``field_scale`` folds a per-field input weight into its block (DFS's
    one-to-one layer; FSCD's gates are omitted, as Eq. 6 says). Returns the state and the keys copied.
    """
    own = target.state_dict()
    index = {n: i for i, n in enumerate(selection_names)}
    out, copied = {}, []
    for key, value in own.items():
        if key == "first.weight":
            src = selection_state.get(key)
            if src is None or src.shape[1:] != value.shape[1:]:
                continue
            blocks = torch.stack([src[index[n]] for n in target.names])
            if field_scale:
                scale = torch.tensor([field_scale.get(n, 1.0) for n in target.names], dtype=blocks.dtype)
                blocks = blocks * scale[:, None, None]
            out[key] = blocks
        elif key in selection_state and selection_state[key].shape == value.shape:
            out[key] = selection_state[key]
        else:
            continue
        copied.append(key)
    return {**own, **out}, copied
