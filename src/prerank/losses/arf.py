"""ARF: the Adaptive Neural Ranking Framework loss (Wang et al. 2023, arXiv:2310.10462), RankTower Table 1's baseline.

ARF trains a cascade stage for the metric the cascade needs, Recall@m@k: the share of the ground truth's
top ``k`` items that the stage keeps in its top ``m`` (the ``m`` it passes on). Both of its targets are
written on permutation matrices relaxed by NeuralSort (Grover et al. 2019, Eq. 5 / Cor. 3):

    P_hat(s)[i, :] = softmax(((n + 1 - 2i) s - A_s 1) / tau),   A_s[j, l] = |s_j - s_l|,  i = 1..n,

a row-stochastic matrix whose row ``i`` is a soft one-hot of the item at rank ``i``.

* ``L_Relax`` (the relaxed target, Recall@m@k): item ``j``'s soft membership in the top ``m`` is
  ``M_j = sum_{i <= m} P_hat[i, j]``; the loss is the cross-entropy of the ground-truth top-k set against
  it, ``-(1 / |G|) sum_{j in G} log min(M_j, 1)``.
* ``L_Global`` (the full target, OPA: every ordered pair): the cross-entropy between the labels' permutation
  matrix and the scores', averaged over the list's rows, ``-(1 / n) sum_i sum_j P(y)[i, j] log P_hat(s)[i, j]``;
  the labels' matrix is NeuralSort at ``label_temperature`` (near 0 it is the hard sort, with tied labels
  sharing their rows evenly, so ties need no arbitrary order).
* The two are combined with learned weights, ARF's variant of uncertainty weighting (Liebel & Koerner 2018,
  after Kendall et al. 2018): ``L = sum_t L_t / (2 sigma_t^2) + log(1 + sigma_t^2)`` with ``sigma_t^2 =
  exp(s_t)``, ``s_t`` trained with the model (``uncertainty=False``: the plain sum).

Readings where the abstract and RankTower's use leave room (the ARF paper is not in ../shared/papers; the
structure above follows its abstract: "NeuralSort to obtain the relaxed permutation matrix", "the variant of the
uncertainty weight method", relaxed target Recall@m@k, full target OPA):

* the ground truth is RankTower's hard label (Sec. 3.2.1, :func:`~prerank.losses.hybrid.batch_relevance`) over
  the whole list (impressions, candidates, random items), as RankTower trains every Table 1 model on the same
  full-stage samples; ``G`` is every item with a positive hard label (the exposed items) unless ``k`` is given,
  then the ``k`` best (ties broken by list position);
* a list with no positive item, or no longer than ``m`` (everything is kept), gives ``L_Relax`` nothing to learn
  and is skipped; a list whose labels are all equal is skipped by ``L_Global``;
* ``min(M_j, 1)``: NeuralSort's matrix is row- but not column-stochastic, so ``M_j`` may exceed 1;
* each part is a per-list mean, then a mean over lists (as the hybrid loss's default).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from prerank.data.batch import Batch
from prerank.losses.hybrid import batch_relevance, check_feedback
from prerank.losses.listwise import check_lists, check_positive, check_relevance, masked_log_softmax, mean_over_lists


def neuralsort_log_matrix(scores: Tensor, mask: Tensor, *, temperature: float) -> tuple[Tensor, Tensor]:
    """Log of NeuralSort's relaxed permutation matrix (Grover et al. 2019, Eq. 5), per list of ``[R, N]``.

    Returns the log-matrix ``[R, N, N]`` (rows: ranks, descending; columns: items; 0 outside real cells) and the
    ``[R, N, N]`` mask of real cells. ``n`` is each list's number of real items; padding takes no part.
    """
    s = scores.masked_fill(~mask, 0.0)
    n = mask.sum(-1, keepdim=True).to(s.dtype)  # [R, 1]
    spread = ((s.unsqueeze(-1) - s.unsqueeze(-2)).abs() * mask.unsqueeze(-2)).sum(-1)  # [R, N]: (A_s 1)_j
    rank = torch.arange(1, s.shape[-1] + 1, device=s.device, dtype=s.dtype)
    coef = n + 1 - 2 * rank  # [R, N]: n + 1 - 2i
    real_rows = rank <= n
    cells = real_rows.unsqueeze(-1) & mask.unsqueeze(-2)
    logits = (coef.unsqueeze(-1) * s.unsqueeze(-2) - spread.unsqueeze(-2)) / temperature
    return masked_log_softmax(logits, cells), cells


def top_k_set(relevance: Tensor, mask: Tensor, k: int | None) -> Tensor:
    """``[R, N]`` bool: the items with a positive relevance, or the ``k`` best of them (ties by position)."""
    positive = mask & (relevance.masked_fill(~mask, 0) > 0)
    if k is None:
        return positive
    n = relevance.shape[-1]
    order = relevance.masked_fill(~positive, float("-inf")) - torch.arange(n, device=relevance.device) / (2 * n)
    rank = order.argsort(-1, descending=True).argsort(-1)
    return positive & (rank < k)


def relaxed_recall_loss(
    logits: Tensor, relevance: Tensor, mask: Tensor | None = None, *, m: int, k: int | None = None, temperature: float
) -> Tensor:
    """ARF's ``L_Relax``: cross-entropy of the top-k set against its soft membership in the top ``m``."""
    if m < 1 or (k is not None and k < 1):
        raise ValueError(f"m and k must be >= 1, got m={m}, k={k}")
    check_positive(temperature=temperature)
    mask = check_lists(logits, mask, relevance=relevance)
    check_relevance(relevance, mask)
    log_p, cells = neuralsort_log_matrix(logits, mask, temperature=temperature)
    top_rows = (torch.arange(logits.shape[-1], device=logits.device) < m).unsqueeze(-1)
    member = (log_p.exp() * cells * top_rows).sum(-2)  # [R, N]: M_j
    target = top_k_set(relevance, mask, k)
    log_member = torch.log(member.clamp(min=torch.finfo(member.dtype).tiny, max=1.0))
    per_list = -(log_member * target).sum(-1) / target.sum(-1).clamp_min(1)
    return mean_over_lists(per_list, target.any(-1) & (mask.sum(-1) > m))


def global_order_loss(
    logits: Tensor, relevance: Tensor, mask: Tensor | None = None, *, temperature: float, label_temperature: float
) -> Tensor:
    """ARF's ``L_Global``: cross-entropy between the labels' and the scores' NeuralSort matrices, mean per row."""
    check_positive(temperature=temperature, label_temperature=label_temperature)
    mask = check_lists(logits, mask, relevance=relevance)
    check_relevance(relevance, mask)
    log_p, cells = neuralsort_log_matrix(logits, mask, temperature=temperature)
    y = relevance.masked_fill(~mask, 0).to(logits.dtype)
    log_target, _ = neuralsort_log_matrix(y, mask, temperature=label_temperature)
    per_list = -(log_target.exp() * cells * log_p).sum((-2, -1)) / mask.sum(-1).clamp_min(1)
    ordered = (y.masked_fill(~mask, float("inf")).amin(-1) < y.masked_fill(~mask, float("-inf")).amax(-1)) & (
        mask.sum(-1) >= 2
    )
    return mean_over_lists(per_list, ordered)


class ARFLoss(nn.Module):
    """Trainer loss ``loss(logits, batch)``: ``L_Relax`` + ``L_Global`` with learned uncertainty weights.

    It holds parameters (the two log-variances), so the trainer optimises them with the model and keeps them in
    its checkpoint; it deep-copies the loss per run, so runs never share them.
    """

    requires_lists: ClassVar[bool] = True
    PARTS: ClassVar[tuple[str, str]] = ("relax", "global")

    def __init__(
        self,
        m: int = 10,
        k: int | None = None,
        temperature: float = 1.0,
        label_temperature: float = 0.01,
        uncertainty: bool = True,
        feedback: str = "binary",
    ):
        super().__init__()
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"arf option m must be an integer >= 1, got {m!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"arf option k must be an integer >= 1 or None, got {k!r}")
        check_positive(temperature=temperature, label_temperature=label_temperature)
        check_feedback(feedback)
        self.m, self.k, self.feedback = m, k, feedback
        self.temperature, self.label_temperature = float(temperature), float(label_temperature)
        self.log_var = nn.Parameter(torch.zeros(2)) if uncertainty else None

    def parts(self, logits: Tensor, relevance: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return {
            "relax": relaxed_recall_loss(logits, relevance, mask, m=self.m, k=self.k, temperature=self.temperature),
            "global": global_order_loss(
                logits, relevance, mask, temperature=self.temperature, label_temperature=self.label_temperature
            ),
        }

    def forward(self, logits: Tensor, batch: Batch) -> Tensor:
        if batch.mask is None or logits.shape != batch.mask.shape:
            raise ValueError("the arf loss needs a request-level batch: logits [R, N] matching batch.mask")
        parts = torch.stack(
            list(self.parts(logits, batch_relevance(batch, batch.mask, self.feedback), batch.mask).values())
        )
        if self.log_var is None:
            return parts.sum()
        return (0.5 * torch.exp(-self.log_var) * parts + F.softplus(self.log_var)).sum()


__all__ = ["ARFLoss", "global_order_loss", "neuralsort_log_matrix", "relaxed_recall_loss", "top_k_set"]
