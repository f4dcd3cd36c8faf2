"""Deep feature selection (Li, Chen and Wasserman, "Deep Feature Selection: Theory and Application to
Identify Enhancers and Promoters", J. Comput. Biol. 2016), the other baseline of FSCD Tables 2-3.

A one-to-one weighted input layer: field ``j``'s embedding is multiplied by a scalar ``w_j`` (init 1)
before the network, and the objective adds an elastic-net penalty on those weights,
``lambda_1 ((1 - rho) / 2 ||w||_2^2 + rho ||w||_1)`` (Li et al. Eq. 2, with ``rho = lambda_2``), plus
``alpha_1 / 2 ||W||_2^2`` on the network's weights (their second term's ridge part). Importance =
``|w_j|``.

Readings: the paper weights single inputs; here one weight per feature field (its whole embedding),
since fields are what a pre-ranker keeps or drops. The penalties are per-step constants added to the
batch mean cross entropy. Without ``alpha_1`` the network could undo a small ``w_j`` by growing field
``j``'s embedding and first-layer block, so ``net_l2`` defaults to a small positive value.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from prerank.models.base import ConfigError
from prerank.models.fscd import FSCDNet
from prerank.selection.base import FieldSelector


class DFS(FieldSelector):
    """DFS selector; extra args ``reg`` (``lambda_1``), ``l1_ratio`` (``rho``), ``net_l2`` (``alpha_1``).

    After ``fit`` also ``weights_`` ``[F]``: the signed input weights ``w_j``.
    """

    method = "dfs"

    def __init__(self, k: int = 10, *, reg: float = 1e-2, l1_ratio: float = 1.0, net_l2: float = 1e-6, **kwargs):
        super().__init__(k, **kwargs)
        if reg < 0 or net_l2 < 0:
            raise ConfigError(f"reg and net_l2 must be >= 0, got {reg}, {net_l2}")
        if not 0.0 <= l1_ratio <= 1.0:
            raise ConfigError(f"l1_ratio must be in [0, 1], got {l1_ratio}")
        self.reg = reg
        self.l1_ratio = l1_ratio
        self.net_l2 = net_l2

    def _init_gates(self, net: FSCDNet) -> nn.Module:
        module = nn.Module()
        module.weight = nn.Parameter(torch.ones(len(net.names)))
        self._w, self._net = module.weight, net
        return module

    def _gate(self, rows: int) -> Tensor:
        return self._w

    def _penalty(self, z: Tensor, n_rows: int) -> Tensor:
        w = self._w
        total = self.reg * ((1 - self.l1_ratio) / 2 * w.pow(2).sum() + self.l1_ratio * w.abs().sum())
        if self.net_l2:
            total = total + self.net_l2 / 2 * sum(p.pow(2).sum() for p in self._net.parameters())
        return total

    def _importances(self) -> np.ndarray:
        self.weights_ = self._w.detach().double().numpy()
        return np.abs(self.weights_)

    def field_scale(self) -> dict[str, float]:
        """``w_j`` per field, to fold into the pre-ranker's first layer when fine-tuning."""
        return {n: float(w) for n, w in zip(self.feature_names_, self.weights_, strict=True)}
