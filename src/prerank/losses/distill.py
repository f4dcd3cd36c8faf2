"""Distillation losses from the ranking model (teacher) to the pre-ranker (student).

All take request-level tensors: student ``logits`` ``[R, N]``, ``teacher_logits`` ``[R, N]`` (the
ranking model's logged logit, ``Batch.teacher_logit``) and an optional ``mask`` ``[R, N]``. RankTower
(Yan & Li 2024) Sec. 4.3.3, Table 4 compares exactly these three; its hybrid loss uses the softmax one
on impressions only (Sec. 3.3.1). Padding never affects the value or the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from prerank.losses.listwise import (
    check_lists,
    check_positive,
    masked_log_softmax,
    mean_over_lists,
    ordered_pairs,
    pairwise_logistic,
    reduce_list,
)

DISTILLATION_TARGETS = ("probability", "softmax")


def softmax_distillation(
    logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    target: str = "probability",
    per_list: str = "sum",
) -> Tensor:
    """Listwise softmax distillation, RankTower Eq. 9: ``L = -sum_i p_i log softmax(z / T)_i`` per list.

    ``target`` says what ``p_i`` is:

    - ``"probability"`` (default, Eq. 9 as written): ``p_i = sigmoid(t_i)``, "the prediction of the ranking
      model", i.e. its predicted click probability. The student's optimum is ``softmax(z) ∝ p``. The weights do
      not sum to 1: a list's term grows with its total predicted CTR, as the equation says.
    - ``"softmax"`` (another reading, kept as an option): ``p = softmax(t / T)`` over the list, a distribution like
      the student's; since ``exp(t) = p / (1 - p)`` this weights each item by the teacher's odds, not its
      probability, and puts much more weight on the top items.

    ``T`` softens the student's softmax (and, with ``"softmax"``, the teacher's too, as in Hinton et al. 2015); no
    ``T^2`` factor is applied. Reduction: the sum over a list's real items (Eq. 9; ``per_list="mean"``: divided by
    their number), then the **mean over lists** with >= 2 real items (a single item carries no ordering and is
    skipped).
    """
    check_positive(temperature=temperature)
    if target not in DISTILLATION_TARGETS:
        raise ValueError(f"target must be one of {list(DISTILLATION_TARGETS)}, got {target!r}")
    mask = check_lists(logits, mask, teacher_logits=teacher_logits)
    teacher = teacher_logits.masked_fill(~mask, 0).to(logits.dtype)
    if target == "probability":
        weight = torch.sigmoid(teacher) * mask
    else:
        weight = masked_log_softmax(teacher / temperature, mask).exp() * mask
    logq = masked_log_softmax(logits.masked_fill(~mask, 0.0) / temperature, mask)
    per_list_loss = reduce_list(-(weight * logq).sum(-1), mask.sum(-1), per_list)
    return mean_over_lists(per_list_loss, mask.sum(-1) >= 2)


def weighted_logloss_distillation(
    logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    weights: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Pointwise distillation: binary cross-entropy with the teacher's probability as a soft label.

    Per item ``w_i * BCE(z_i / T, sigmoid(t_i / T))``; per list the weighted mean over real items
    (``weights`` ``[R, N]`` >= 0, default 1), then the mean over lists with positive total weight.
    RankTower Table 4's "Weighted Logloss".
    """
    check_positive(temperature=temperature)
    mask = check_lists(logits, mask, teacher_logits=teacher_logits, weights=weights)
    w = mask.to(logits.dtype)
    if weights is not None:
        if (weights[mask] < 0).any():
            raise ValueError("weights must be >= 0")
        w = weights.masked_fill(~mask, 0).to(logits.dtype)
    soft = torch.sigmoid(teacher_logits.masked_fill(~mask, 0).to(logits.dtype) / temperature)
    item = F.binary_cross_entropy_with_logits(logits.masked_fill(~mask, 0.0) / temperature, soft, reduction="none")
    total = w.sum(-1)
    per_list = (w * item).sum(-1) / total.clamp_min(torch.finfo(w.dtype).tiny)
    return mean_over_lists(per_list, total > 0)


def pairwise_distillation(
    logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0, min_gap: float = 0.0
) -> Tensor:
    """Pairwise logloss distillation: RankNet on the pairs the teacher orders.

    ``log(1 + exp(-sigma (z_i - z_j)))`` for every pair with ``t_i - t_j > min_gap``, averaged over
    the pairs of a list, then over lists with at least one such pair. It keeps only the teacher's
    order, not how far apart its scores are (RankTower Table 4's "Pairwise Logloss").
    """
    check_positive(sigma=sigma)
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    mask = check_lists(logits, mask, teacher_logits=teacher_logits)
    pairs = ordered_pairs(teacher_logits, mask, min_gap)
    per_list = pairwise_logistic(logits.masked_fill(~mask, 0.0), pairs, sigma)
    return mean_over_lists(per_list, pairs.flatten(1).any(-1))


__all__ = ["pairwise_distillation", "softmax_distillation", "weighted_logloss_distillation"]
