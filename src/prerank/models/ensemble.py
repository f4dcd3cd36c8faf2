"""An ensemble: K members of one registered model whose logits are averaged.

The ranking teacher may cost far more per candidate than a pre-ranker (issue 21), and averaging the logits of
independently trained members is the cheapest reliable gain a ranker can buy: each member's errors from its
initialisation and batch order partly cancel (Lakshminarayanan et al., "Simple and Scalable Predictive Uncertainty
Estimation using Deep Ensembles", NeurIPS 2017, Sec. 2.4, averaged in logit space here, since a teacher's output
is a logit). ``prerank teacher fit --ensemble K`` trains the members one by one (seeds ``seed .. seed + K - 1``,
each early-stopped on its own) and writes one checkpoint of this model; the trainer can train one directly too,
but then the members are fitted jointly through the average, which is not the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.models.base import ConfigError, PreRanker, State
from prerank.schema import Schema


@dataclass(frozen=True)
class EnsembleConfig:
    """``members`` copies of registered model ``model`` with config overrides ``model_config``."""

    model: str = "ranker"
    members: int = 2
    model_config: dict = field(default_factory=dict)


class Ensemble(PreRanker):
    """``logit = (1 / K) sum_k member_k(x)``.

    States are the members' states side by side, member k's keys prefixed ``k/``; the item cache holds K item
    states, and each candidate costs K members' ``score``.
    """

    def __init__(self, schema: Schema, config: EnsembleConfig = EnsembleConfig()):
        super().__init__(schema)
        from prerank.models.registry import build_model  # the registry lists this model

        if config.members < 1:
            raise ConfigError(f"an ensemble needs at least one member, got members={config.members}")
        if config.model == "ensemble":
            raise ConfigError("an ensemble's members cannot be ensembles")
        self.config = config
        members = (build_model(config.model, schema, config.model_config) for _ in range(config.members))
        self.members = nn.ModuleList(members)

    def encode_user(self, batch: Batch) -> State:
        return _join(m.encode_user(batch) for m in self.members)

    def encode_item(self, batch: Batch) -> State:
        return _join(m.encode_item(batch) for m in self.members)

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        logits = [m.score(_part(user, k), _part(item, k), pair) for k, m in enumerate(self.members)]
        return torch.stack(logits).mean(0)

    def auxiliary_loss(self, batch: Batch, user: State, item: State) -> Tensor | None:
        terms = [m.auxiliary_loss(batch, _part(user, k), _part(item, k)) for k, m in enumerate(self.members)]
        terms = [t for t in terms if t is not None]
        return torch.stack(terms).mean() if terms else None


def _join(states) -> State:  # type: ignore[no-untyped-def]
    return {f"{k}/{key}": v for k, state in enumerate(states) for key, v in state.items()}


def _part(state: State, k: int) -> State:
    prefix = f"{k}/"
    return {key.removeprefix(prefix): v for key, v in state.items() if key.startswith(prefix)}
