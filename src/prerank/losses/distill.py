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
)


def softmax_distillation(
    logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0
) -> Tensor:
    """Listwise softmax distillation, RankTower Eq. 9: ``-sum_i p_i log softmax(z / T)_i``.

    Reading of Eq. 9: the paper's ``p_i`` is "the prediction of the ranking model"; we take the
    teacher's distribution over the list, ``p = softmax(teacher_logit / T)``, so that the target is
    a distribution like the student's (raw probabilities would weight each request by its total
    predicted CTR and make the loss grow with list length). The same temperature T softens both
    sides, as in Hinton et al. 2015; no ``T^2`` factor is applied (scale it with the loss weight).
    A list needs >= 2 real items to carry an ordering; others are skipped.
    """
    check_positive(temperature=temperature)
    mask = check_lists(logits, mask, teacher_logits=teacher_logits)
    teacher = teacher_logits.masked_fill(~mask, 0).to(logits.dtype)
    target = masked_log_softmax(teacher / temperature, mask).exp() * mask
    logq = masked_log_softmax(logits.masked_fill(~mask, 0.0) / temperature, mask)
    return mean_over_lists(-(target * logq).sum(-1), mask.sum(-1) >= 2)


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
