"""Dropout feature ranking (Chang, Rampasek and Goldenberg, "Dropout Feature Ranking for Deep Learning
Models", 2017, arXiv:1712.08645), the cost-free baseline of FSCD Tables 2-3.

Each field ``j`` gets a learned keep probability ``delta_j``; its embedding is multiplied by a concrete
(relaxed Bernoulli) gate ``z_j`` drawn as FSCD Eq. 5 (temperature 0.1), and the objective is the
batch mean cross entropy plus ``lambda sum_j E[z_j]``: one weight for every field (a uniform prior, no
feature cost), which pushes uninformative fields towards being dropped. Importance = ``delta_j``.

Readings: ``E[z_j]`` is estimated by the batch mean of the relaxed gates, as in FSCD; ``lambda`` is a
per-step constant (``reg``, default 1e-2: the objective is per sample, there is no ``1/N`` prior
scaling to read). With ``reg`` equal to FSCD's ``prior_scale`` the two differ only in the per-field
weight (1 here, ``alpha_j`` there).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from prerank.models.base import ConfigError
from prerank.models.fscd import FSCDNet
from prerank.selection.base import FieldSelector, relaxed_bernoulli, uniform
from prerank.selection.fscd import TEMPERATURE


class DropoutFR(FieldSelector):
    """Dropout-FR selector; extra args ``reg`` (``lambda``), ``temperature``, ``init_keep``."""

    method = "dropout_fr"

    def __init__(
        self, k: int = 10, *, reg: float = 1e-2, temperature: float = TEMPERATURE, init_keep: float = 0.5, **kwargs
    ):
        super().__init__(k, **kwargs)
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if not 0.0 < init_keep < 1.0:
            raise ConfigError(f"init_keep must be in (0, 1), got {init_keep}")
        if reg < 0:
            raise ConfigError(f"reg must be >= 0, got {reg}")
        self.reg = reg
        self.temperature = temperature
        self.init_keep = init_keep

    def _init_gates(self, net: FSCDNet) -> nn.Module:
        module = nn.Module()
        module.logit = nn.Parameter(
            torch.full((len(net.names),), math.log(self.init_keep) - math.log1p(-self.init_keep))
        )
        self._logit = module.logit
        return module

    def _gate(self, rows: int) -> Tensor:
        u = uniform(self.rng_, (rows, len(self.feature_names_)))
        return relaxed_bernoulli(self._logit, u, self.temperature)

    def _penalty(self, z: Tensor, n_rows: int) -> Tensor:
        return self.reg * z.mean(0).sum()

    def _importances(self) -> np.ndarray:
        self.delta_ = torch.sigmoid(self._logit.detach()).double().numpy()
        return self.delta_
