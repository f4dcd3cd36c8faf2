"""RankTower's hybrid loss (Yan & Li 2024, Eq. 15) with its sample scopes, and its hard-label aggregation.

``L = l1 * L_distill(z, p) + l2 * L_sorting(z, y) + l3 * L_AM-Rankmax(z, y)`` where each part sees
the samples the paper gives it (full-stage sampling, Sec. 3.1 and 3.3):

===============  ====================================  ==========================
part             samples (``stage``)                   target
===============  ====================================  ==========================
distillation     impressions (Sec. 3.3.1)              teacher logit ``p``
sorting          impressions + rank/pre-rank cands.    hard label ``y`` (Eq. 11)
AM-Rankmax       all: + random samples (Sec. 3.3.3)    hard label ``y`` (Eq. 14)
===============  ====================================  ==========================

Hard label (Sec. 3.2.1, :func:`hard_relevance`): user feedback aggregated by importance plus the
impression label (1 for impressions, 0 otherwise), so ``y = feedback + 1`` on impressions (feedback =
``label_level`` of positives, 0 for shown-but-ignored items) and 0 on every unexposed candidate and
random item. Candidates and random items tie at the bottom, as in the paper ("... > exposed items >
candidate items and randomly sampled items"); what separates them is the scopes: random items only
enter AM-Rankmax, as plain negatives.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import torch
from torch import Tensor

from prerank.data.batch import Batch
from prerank.losses.distill import pairwise_distillation, softmax_distillation, weighted_logloss_distillation
from prerank.losses.listwise import LIST_REDUCTIONS, am_rankmax, check_lists, softsort_loss
from prerank.schema import STAGES

IMPRESSION = STAGES.index("impression")
RANDOM = STAGES.index("random")

DISTILLATIONS = {
    "softmax": softmax_distillation,
    "logloss": weighted_logloss_distillation,
    "pairwise": pairwise_distillation,
}


def check_stage(stage: Tensor, mask: Tensor) -> None:
    if stage.shape != mask.shape:
        raise ValueError(f"stage must have the shape of the mask {tuple(mask.shape)}, got {tuple(stage.shape)}")
    real = stage[mask]
    if ((real < 0) | (real >= len(STAGES))).any():
        raise ValueError(f"stage values must index prerank.schema.STAGES {STAGES}")


def hard_relevance(
    label: Tensor | None, label_level: Tensor | None, stage: Tensor | None, mask: Tensor | None = None
) -> Tensor:
    """RankTower Sec. 3.2.1 hard label ``[R, N]`` (float): graded feedback plus the impression label.

    Feedback is the graded ``label_level`` of positive rows (``label > 0``) and 0 on negatives, so a
    level that also grades non-positive rows (a MovieLens rating of 1, a Taobao page view at level 1)
    never counts as feedback; without ``label_level`` it is the binary ``label``, without ``label``
    the level itself. Levels keep their dataset's scale (e.g. ratings 4 and 5), which the margins of
    AM-Rankmax and the distances of SoftSort see. With a ``stage`` tensor the impression label is
    added: ``feedback + 1`` for impressions, 0 for candidates and random items (feedback on items
    never shown cannot exist and is ignored). Without ``stage`` every row is an impression, so the
    constant impression label carries no information and ``y = feedback``. Padding is 0.
    """
    if label is None and label_level is None:
        raise ValueError("a hard label needs batch.label or batch.label_level")
    if label_level is None:
        feedback = label
    elif label is None:
        feedback = label_level
    else:
        if label.shape != label_level.shape:
            raise ValueError(f"label_level must have the shape of label {tuple(label.shape)}")
        feedback = torch.where(label > 0, label_level, torch.zeros_like(label_level))
    feedback = feedback.to(torch.get_default_dtype())
    valid = torch.ones_like(feedback, dtype=torch.bool) if mask is None else mask
    if valid.shape != feedback.shape:
        raise ValueError(f"mask must have the shape of the labels {tuple(feedback.shape)}, got {tuple(valid.shape)}")
    if stage is not None:
        check_stage(stage, valid)
        feedback = torch.where(stage == IMPRESSION, feedback + 1.0, torch.zeros_like(feedback))
    if (feedback[valid] < 0).any():
        raise ValueError("label/label_level must be >= 0")
    return feedback.masked_fill(~valid, 0.0)


FEEDBACK = ("binary", "graded")


def check_feedback(feedback: str) -> None:
    if feedback not in FEEDBACK:
        raise ValueError(f"feedback must be one of {FEEDBACK}, got {feedback!r}")


def batch_relevance(batch: Batch, mask: Tensor, feedback: str = "binary") -> Tensor:
    """The hard label (:func:`hard_relevance`) of a request batch, with the paper's feedback part.

    Sec. 4.1.1: "as all labels in the datasets are binary, we aggregate them by summing the labels".
    ``binary`` (default) sums what a dataset has: its one binary ``label`` plus the impression label,
    so hard labels are 0 / 1 / 2 (ML-1M's rating > 3, Taobao's fav/cart/buy). ``graded`` uses
    ``label_level`` instead (a rating 4-5, a behaviour level 2-4) as a stand-in for a sum of several
    binary labels; it widens the gaps that SoftSort and AM-Rankmax margins see, and on the ML-1M
    cascade it inverted the clicks among impressions (docs/results.md).
    """
    check_feedback(feedback)
    level = batch.label_level if feedback == "graded" else None
    return hard_relevance(batch.label, level, batch.stage, mask)


@dataclass(frozen=True)
class HybridLossConfig:
    """Weights and hyper-parameters of Eq. 15. The paper publishes none of their values; ours are neutral.

    ``feedback`` is the feedback part of the hard label (:func:`batch_relevance`).
    ``distillation`` picks the Eq. 9 part: ``softmax`` (the paper's), or the Table 4 alternatives
    ``logloss`` / ``pairwise``; ``distillation_weight = 0`` is Table 4's "No Distillation".
    ``distillation_target`` is Eq. 9's ``p_i``: ``probability`` (the ranker's predicted probability, as written)
    or ``softmax`` (the teacher's softmax over the list; see :func:`~prerank.losses.distill.softmax_distillation`).
    ``sorting_temperature``/``sorting_power`` are SoftSort's tau and p (Eq. 10); Eq. 11 applies the
    same tau to the labels' SoftSort, and ``sorting_label_temperature`` sets a separate one (small
    values make the target the labels' hard permutation matrix); ``margin_alpha``,
    ``margin_beta``, ``margin_power`` are AM-Rankmax's alpha, beta, p (Eq. 13).
    ``list_reduction``: the paper writes each part as a sum over a list (Eq. 9 over items, Eq. 11 over the rows
    of the permutation matrix, Eq. 14 over positives), so on lists of 10-100 items the parts differ in scale by
    the list's length and the weights stop meaning what they say (on the ML-1M cascade the distillation part's
    gradient was about 10x smaller than the others'). ``mean`` (default) divides each part's per-list sum by its
    number of terms, so every part is a per-list mean; ``sum`` is the equations as written. Either way each part
    is then averaged over lists.
    """

    distillation_weight: float = 1.0
    sorting_weight: float = 1.0
    rankmax_weight: float = 1.0
    distillation: Literal["softmax", "logloss", "pairwise"] = "softmax"
    feedback: Literal["graded", "binary"] = "binary"
    distillation_temperature: float = 1.0
    distillation_target: Literal["probability", "softmax"] = "probability"
    sorting_temperature: float = 1.0
    sorting_label_temperature: float | None = None
    sorting_power: float = 1.0
    margin_alpha: float = 1.0
    margin_beta: float = 1.0
    margin_power: float = 1.0
    list_reduction: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("distillation", "feedback", "distillation_target", "list_reduction"):
                continue
            if value is None and f.name == "sorting_label_temperature":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"HybridLossConfig.{f.name} must be a number, got {value!r}")
        for name in ("distillation_weight", "sorting_weight", "rankmax_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"HybridLossConfig.{name} must be >= 0, got {getattr(self, name)}")
        check_feedback(self.feedback)
        if self.distillation_target not in ("probability", "softmax"):
            raise ValueError("HybridLossConfig.distillation_target must be 'probability' or 'softmax'")
        if self.list_reduction not in LIST_REDUCTIONS:
            raise ValueError(f"HybridLossConfig.list_reduction must be one of {LIST_REDUCTIONS}")
        if self.distillation not in DISTILLATIONS:
            raise ValueError(f"HybridLossConfig.distillation must be one of {sorted(DISTILLATIONS)}")
        for name in ("distillation_temperature", "sorting_temperature", "sorting_label_temperature"):
            if name == "sorting_label_temperature" and self.sorting_label_temperature is None:
                continue
            if not getattr(self, name) > 0:
                raise ValueError(f"HybridLossConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.sorting_power >= 1:
            raise ValueError(f"HybridLossConfig.sorting_power must be >= 1, got {self.sorting_power}")
        for name in ("margin_alpha", "margin_beta", "margin_power"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"HybridLossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.distillation_weight + self.sorting_weight + self.rankmax_weight == 0:
            raise ValueError("HybridLossConfig: at least one of the three weights must be > 0")

    @classmethod
    def from_options(cls, **options: object) -> HybridLossConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"hybrid loss has no options {sorted(unknown)} (known: {sorted(known)})")
        return cls(**options)  # type: ignore[arg-type]


def hybrid_components(
    logits: Tensor,
    relevance: Tensor,
    stage: Tensor,
    mask: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    config: HybridLossConfig = HybridLossConfig(),
) -> dict[str, Tensor]:
    """The three unweighted parts of Eq. 15, each on its sample scope; shapes ``[R, N]``.

    A part whose weight is 0 is not computed (so ``teacher_logits`` may be None without
    distillation). Returns ``{"distillation", "sorting", "am_rankmax"}`` (scalars, present when
    their weight is > 0).
    """
    mask = check_lists(logits, mask, relevance=relevance, stage=stage, teacher_logits=teacher_logits)
    check_stage(stage, mask)
    parts: dict[str, Tensor] = {}
    if config.distillation_weight > 0:
        if teacher_logits is None:
            raise ValueError("the hybrid loss's distillation part needs teacher logits (batch.teacher_logit)")
        options: dict[str, object] = {}
        if config.distillation != "pairwise":
            options["temperature"] = config.distillation_temperature
        if config.distillation == "softmax":
            options["target"] = config.distillation_target
            options["per_list"] = config.list_reduction
        distill = DISTILLATIONS[config.distillation]
        parts["distillation"] = distill(logits, teacher_logits, mask & (stage == IMPRESSION), **options)
    if config.sorting_weight > 0:
        parts["sorting"] = softsort_loss(
            logits,
            relevance,
            mask & (stage != RANDOM),
            temperature=config.sorting_temperature,
            power=config.sorting_power,
            label_temperature=config.sorting_label_temperature,
            per_list=config.list_reduction,
        )
    if config.rankmax_weight > 0:
        parts["am_rankmax"] = am_rankmax(
            logits,
            relevance,
            mask,
            alpha=config.margin_alpha,
            beta=config.margin_beta,
            power=config.margin_power,
            per_list=config.list_reduction,
        )
    return parts


def hybrid_loss(
    logits: Tensor,
    relevance: Tensor,
    stage: Tensor,
    mask: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    config: HybridLossConfig = HybridLossConfig(),
) -> Tensor:
    """RankTower Eq. 15: ``l1 L_distill + l2 L_sorting + l3 L_AM-Rankmax`` (see :func:`hybrid_components`)."""
    parts = hybrid_components(logits, relevance, stage, mask, teacher_logits, config)
    weights = {
        "distillation": config.distillation_weight,
        "sorting": config.sorting_weight,
        "am_rankmax": config.rankmax_weight,
    }
    return sum((weights[name] * value for name, value in parts.items()), start=logits.new_zeros(()))


@dataclass(frozen=True)
class HybridLoss:
    """``loss(logits, batch)`` for a request-level batch: hard labels (Sec. 3.2.1) then Eq. 15.

    ``batch`` needs ``mask`` and ``[R, N]`` ``stage``, ``label`` or ``label_level``, and
    ``teacher_logit`` unless ``config.distillation_weight`` is 0.
    """

    config: HybridLossConfig = HybridLossConfig()
    requires_lists: ClassVar[bool] = True

    @classmethod
    def from_options(cls, **options: object) -> HybridLoss:
        return cls(HybridLossConfig.from_options(**options))

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor:
        if batch.mask is None or logits.shape != batch.mask.shape:
            raise ValueError("the hybrid loss needs a request-level batch: logits [R, N] matching batch.mask")
        if batch.stage is None:
            raise ValueError("the hybrid loss needs batch.stage (full-stage samples, RankTower Sec. 3.1)")
        relevance = batch_relevance(batch, batch.mask, self.config.feedback)
        return hybrid_loss(logits, relevance, batch.stage, batch.mask, batch.teacher_logit, self.config)


__all__ = ["HybridLoss", "HybridLossConfig", "batch_relevance", "hard_relevance", "hybrid_components", "hybrid_loss"]
