"""Losses: pointwise BCE, distillation, listwise ranking and RankTower's hybrid loss.

Two layers:

- Functions with explicit typed arguments on plain tensors (``listwise``, ``distill``, ``pointwise``,
  ``hybrid``): request-level ``logits`` ``[R, N]``, targets ``[R, N]`` and ``mask`` ``[R, N]``.
- Trainer losses ``loss(logits, batch) -> Tensor`` built by name from :data:`LOSSES`. ``requires_lists``
  says whether the loss needs a request-level batch (``batch.mask`` ``[R, N]``, logits scattered back
  with :func:`to_lists`) or also takes a row batch.

Under distributed training (``torchrun``) a loss sees each rank's *local* batch: rows, or whole requests
(a request is read whole by the rank owning the row group it starts in, so lists never span ranks).
The value is a mean over that batch's rows or requests and DDP averages the ranks' gradients, which equals
the global batch's mean when the ranks' batches are of equal size (the last batch of an epoch may not be).

Names (``build_loss(name, **options)``; options are the keyword arguments of the function named):

- ``bce``: :func:`binary_cross_entropy` on ``label``, the trainer's default; no options.
- ``hybrid``: RankTower Eq. 15 with its sample scopes; options are the fields of :class:`HybridLossConfig`.
- ``distill:softmax``: :func:`softmax_distillation` (RankTower Eq. 9); ``temperature``, ``target``
  (``probability``: Eq. 9's ``p_i``, the default; ``softmax``: the teacher's softmax over the list).
- ``distill:logloss``: :func:`weighted_logloss_distillation`; ``temperature``.
- ``distill:pairwise``: :func:`pairwise_distillation`; ``sigma``, ``min_gap``.
- ``distill:soft_hard``: :class:`SoftHardLoss`, hard and teacher labels together; ``hard_weight``, ``temperature``.
- ``ranking:softmax``: :func:`softmax_cross_entropy`; ``temperature``.
- ``ranking:ranknet``: :func:`ranknet`; ``sigma``.
- ``ranking:approx_ndcg``: :func:`approx_ndcg`; ``temperature``.
- ``ranking:rankmax``: :func:`rankmax` (Eq. 12); ``margin``.
- ``ranking:am_rankmax``: :func:`am_rankmax` (Eq. 13-14); ``alpha``, ``beta``, ``power``.
- ``ranking:softsort``: :func:`softsort_loss` (Eq. 10-11); ``temperature``, ``power``, ``label_temperature``.
- ``arf``: :class:`~prerank.losses.arf.ARFLoss` (ARF, RankTower Table 1's baseline: relaxed Recall@m@k + full order,
  uncertainty-weighted); ``m``, ``k``, ``temperature``, ``label_temperature``, ``uncertainty``, ``feedback``.

``ranking:*`` losses rank the whole list by the hard label of RankTower Sec. 3.2.1
(:func:`batch_relevance`; option ``feedback=binary|graded``, as for ``hybrid``). ``distill:*``
losses match ``teacher_logit`` on impressions only when the batch has ``stage`` (Sec. 3.3.1: the
teacher was trained on impressions), else on every item.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor

from prerank.data.batch import Batch
from prerank.losses.arf import ARFLoss
from prerank.losses.distill import pairwise_distillation, softmax_distillation, weighted_logloss_distillation
from prerank.losses.hybrid import (
    IMPRESSION,
    HybridLoss,
    HybridLossConfig,
    batch_relevance,
    check_feedback,
    hard_relevance,
    hybrid_loss,
)
from prerank.losses.listwise import (
    am_rankmax,
    approx_ndcg,
    rankmax,
    ranknet,
    softmax_cross_entropy,
    softsort_loss,
    to_lists,
)
from prerank.losses.pointwise import PointwiseBCE, binary_cross_entropy


class LossFn(Protocol):
    requires_lists: ClassVar[bool]

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor: ...


def _scalar_options(fn: Callable[..., Tensor], options: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``options`` against the keyword-only, non-tensor arguments of ``fn``."""
    known = {
        name: str(p.annotation)
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and "Tensor" not in str(p.annotation)
    }
    unknown = set(options) - set(known)
    if unknown:
        raise ValueError(f"{fn.__name__} has no options {sorted(unknown)} (known: {sorted(known)})")
    for name, value in options.items():
        if known[name] == "str":
            if not isinstance(value, str):
                raise ValueError(f"{fn.__name__} option {name!r} must be a string, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int | float | None):
            raise ValueError(f"{fn.__name__} option {name!r} must be a number, got {value!r}")
    return dict(options)


def _request_mask(logits: Tensor, batch: Batch, what: str) -> Tensor:
    if batch.mask is None or logits.shape != batch.mask.shape:
        raise ValueError(f"{what} needs a request-level batch: logits [R, N] matching batch.mask")
    return batch.mask


@dataclass(frozen=True)
class RankingLoss:
    """A listwise ranking function applied to the hard labels of a request-level batch."""

    fn: Callable[..., Tensor]
    options: Mapping[str, Any] = field(default_factory=dict)
    feedback: str = "binary"
    requires_lists: ClassVar[bool] = True

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor:
        mask = _request_mask(logits, batch, self.fn.__name__)
        return self.fn(logits, batch_relevance(batch, mask, self.feedback), mask, **self.options)


@dataclass(frozen=True)
class DistillationLoss:
    """A distillation function matching ``batch.teacher_logit`` (on impressions when ``stage`` is known)."""

    fn: Callable[..., Tensor]
    options: Mapping[str, Any] = field(default_factory=dict)
    requires_lists: ClassVar[bool] = True

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor:
        mask = _request_mask(logits, batch, self.fn.__name__)
        if batch.teacher_logit is None:
            raise ValueError(f"{self.fn.__name__} needs batch.teacher_logit (the ranking model's logit)")
        if batch.stage is not None:
            mask = mask & (batch.stage == IMPRESSION)
        return self.fn(logits, batch.teacher_logit, mask, **self.options)


@dataclass(frozen=True)
class SoftHardLoss:
    """Hard and teacher labels together: ``a * BCE(z, label) + (1 - a) * distill:logloss(z, teacher_logit)``.

    ``a`` = ``hard_weight`` in [0, 1] (1: hard labels only, 0: the teacher's only). The weighted sum of the hard
    and the soft cross-entropy of Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network", Sec. 2) and the
    stage-2 multi-task loss of the Taobao distilled DSSM (``../shared/papers/taobao-coarse-ranking-distillation.txt``,
    "Two-stage distillation"), where the report gives no weight; ours is chosen on valid. Each part is a mean over
    its own samples, so ``a`` means what it says: the hard part is ``bce``'s mean over every real row of the batch;
    the soft part is :func:`weighted_logloss_distillation` with ``temperature`` (the per-list mean over
    impressions when the batch has ``stage``, where the teacher is valid, then the mean over lists). Takes
    request-level batches: logits ``[R, N]`` with ``batch.mask``.
    """

    hard_weight: float = 0.5
    temperature: float = 1.0
    requires_lists: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.hard_weight, bool) or not 0.0 <= self.hard_weight <= 1.0:
            raise ValueError(f"hard_weight must be in [0, 1], got {self.hard_weight!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor:
        soft = DistillationLoss(weighted_logloss_distillation, {"temperature": self.temperature})(logits, batch)
        hard = PointwiseBCE()(logits, batch)
        return self.hard_weight * hard + (1.0 - self.hard_weight) * soft


def _ranking(fn: Callable[..., Tensor]) -> Callable[..., LossFn]:
    def build(feedback: str = "binary", **options: Any) -> LossFn:
        check_feedback(feedback)
        return RankingLoss(fn, _scalar_options(fn, options), feedback)

    return build


def _distillation(fn: Callable[..., Tensor]) -> Callable[..., LossFn]:
    return lambda **options: DistillationLoss(fn, _scalar_options(fn, options))


def _bce(**options: Any) -> LossFn:
    if options:
        raise ValueError(f"the bce loss has no options, got {sorted(options)}")
    return PointwiseBCE()


LOSSES: dict[str, Callable[..., LossFn]] = {
    "bce": _bce,
    "hybrid": HybridLoss.from_options,
    "distill:softmax": _distillation(softmax_distillation),
    "distill:logloss": _distillation(weighted_logloss_distillation),
    "distill:pairwise": _distillation(pairwise_distillation),
    "distill:soft_hard": SoftHardLoss,
    "ranking:softmax": _ranking(softmax_cross_entropy),
    "ranking:ranknet": _ranking(ranknet),
    "ranking:approx_ndcg": _ranking(approx_ndcg),
    "ranking:rankmax": _ranking(rankmax),
    "ranking:am_rankmax": _ranking(am_rankmax),
    "ranking:softsort": _ranking(softsort_loss),
    "arf": ARFLoss,
}


def build_loss(name: str, **options: Any) -> LossFn:
    """The trainer loss registered as ``name`` with ``options`` (see the table above)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered: {', '.join(LOSSES)}")
    return LOSSES[name](**options)


__all__ = [
    "LOSSES",
    "ARFLoss",
    "DistillationLoss",
    "HybridLoss",
    "HybridLossConfig",
    "LossFn",
    "PointwiseBCE",
    "RankingLoss",
    "SoftHardLoss",
    "am_rankmax",
    "approx_ndcg",
    "binary_cross_entropy",
    "build_loss",
    "batch_relevance",
    "hard_relevance",
    "hybrid_loss",
    "pairwise_distillation",
    "rankmax",
    "ranknet",
    "softmax_cross_entropy",
    "softmax_distillation",
    "softsort_loss",
    "to_lists",
    "weighted_logloss_distillation",
]
