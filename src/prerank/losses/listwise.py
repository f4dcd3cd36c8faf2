"""Listwise learning-to-rank losses over request-level tensors, and the helpers they share.

Every loss takes ``logits`` ``[R, N]`` (R requests, N candidate slots), a target of the same shape
and an optional ``mask`` ``[R, N]`` (True = real item; None = every slot is real). Padding never
affects the value or the gradient, even when it holds NaN. The value is the mean over the requests
that have what the loss needs (a positive, an ordered pair...); when no request qualifies the result
is a zero that is still connected to ``logits``, never NaN. Pairwise, ApproxNDCG, Rankmax and SoftSort
materialise ``[R, N, N]`` tensors: memory grows with the square of the list length.

Losses (RankTower, Yan & Li 2024, Sec. 3.3, compares all of them in its Table 3):

- :func:`softmax_cross_entropy`: labels normalised into a distribution, cross-entropy with the
  softmax of the logits.
- :func:`ranknet`: Burges et al. 2005, logistic loss on every pair ordered by the labels.
- :func:`approx_ndcg`: Qin, Liu & Li 2010, NDCG with the rank made smooth by sigmoids.
- :func:`rankmax`: Kong et al. 2020 as written in RankTower Eq. 12.
- :func:`am_rankmax`: RankTower Eq. 13-14, Rankmax with an adaptive margin for graded labels.
- :func:`softsort_loss`: RankTower Eq. 10-11, cross-entropy between SoftSort permutation matrices
  (Prillo & Eisenschlos 2020) of the labels and of the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def to_lists(flat_values: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """Scatter per-row values back into request lists; the inverse of :meth:`Batch.flat`.

    ``flat_values`` ``[K, ...]`` are the values of the K True slots of ``mask`` ``[R, N]`` in
    row-major order (the order ``Batch.flat`` selects them in). Returns ``[R, N, ...]`` with
    ``fill`` in the padding; differentiable with respect to ``flat_values``.
    """
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a bool tensor [R, N], got {mask.dtype} of shape {tuple(mask.shape)}")
    k = int(mask.sum())
    if flat_values.dim() < 1 or flat_values.shape[0] != k:
        raise ValueError(f"flat_values has {tuple(flat_values.shape)[:1]} rows but mask has {k} valid slots")
    out = flat_values.new_full((*mask.shape, *flat_values.shape[1:]), fill)
    return out.index_put((mask,), flat_values)


def check_lists(logits: Tensor, mask: Tensor | None, **targets: Tensor | None) -> Tensor:
    """Validate request-level inputs and return the mask (all True when ``mask`` is None).

    Raises ValueError naming the argument whose shape, dtype or values are wrong. Targets are
    checked to be finite on real items only, since padding may hold anything.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [R, N], got {logits.dtype} of shape {tuple(logits.shape)}")
    if mask is None:
        mask = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    elif mask.dtype != torch.bool or mask.shape != logits.shape:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(logits.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    for name, t in targets.items():
        if t is None:
            continue
        if t.shape != logits.shape:
            raise ValueError(f"{name} must have the shape of logits {tuple(logits.shape)}, got {tuple(t.shape)}")
        if not torch.isfinite(t[mask].float()).all():
            raise ValueError(f"{name} has NaN or infinite values on real (unmasked) items")
    return mask


def check_relevance(relevance: Tensor, mask: Tensor) -> None:
    if (relevance[mask] < 0).any():
        raise ValueError("relevance must be >= 0 on real items (0 = not relevant)")


def check_positive(**values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")


def masked_log_softmax(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """``log_softmax`` over the True entries of ``mask`` along ``dim``; 0 at masked entries.

    Masked entries are set to the most negative finite value rather than -inf so that a slice
    without any real entry stays finite (its values are never used, but NaN would leak into the
    backward pass through the zero gradient).
    """
    neg = torch.finfo(x.dtype).min
    return torch.log_softmax(x.masked_fill(~mask, neg), dim=dim).masked_fill(~mask, 0.0)


def mean_over_lists(per_list: Tensor, keep: Tensor) -> Tensor:
    """Mean of ``per_list`` ``[R]`` over requests where ``keep`` ``[R]`` is True.

    ``per_list`` must be finite everywhere (losses compute with safe denominators), so a batch
    where nothing qualifies yields an exact zero that still carries the graph of the logits.
    """
    kept = torch.where(keep, per_list, torch.zeros_like(per_list))
    return kept.sum() / keep.sum().clamp_min(1).to(per_list.dtype)


LIST_REDUCTIONS = ("sum", "mean")


def reduce_list(total: Tensor, count: Tensor, per_list: str) -> Tensor:
    """A list's loss from the sum of its terms ``total`` ``[R]``: that sum (``"sum"``, as the papers write the
    equations) or its mean over the list's ``count`` ``[R]`` terms (``"mean"``, so lists of different lengths
    weigh alike and a weight in a sum of losses means what it says)."""
    if per_list not in LIST_REDUCTIONS:
        raise ValueError(f"per_list must be one of {LIST_REDUCTIONS}, got {per_list!r}")
    return total if per_list == "sum" else total / count.clamp_min(1).to(total.dtype)


def ordered_pairs(target: Tensor, mask: Tensor, min_gap: float = 0.0) -> Tensor:
    """``[R, N, N]`` bool: ``pairs[r, i, j]`` when both items are real and ``target_i - target_j > min_gap``."""
    t = target.masked_fill(~mask, 0)
    both = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    return both & (t.unsqueeze(-1) - t.unsqueeze(-2) > min_gap)


def pairwise_logistic(logits: Tensor, pairs: Tensor, sigma: float) -> Tensor:
    """Per list, the mean over ``pairs[r, i, j]`` of ``log(1 + exp(-sigma (z_i - z_j)))``; ``[R]``."""
    z = logits.unsqueeze(-1) - logits.unsqueeze(-2)
    loss = F.softplus(-sigma * z) * pairs
    return loss.sum((-2, -1)) / pairs.sum((-2, -1)).clamp_min(1).to(logits.dtype)


def _clean(logits: Tensor, mask: Tensor) -> Tensor:
    """Logits with padding replaced by 0 so that NaN/inf there can never reach a value or gradient."""
    return logits.masked_fill(~mask, 0.0)


def softmax_cross_entropy(
    logits: Tensor, relevance: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0
) -> Tensor:
    """Softmax cross-entropy: ``-sum_i (y_i / sum_j y_j) log softmax(z / T)_i``, averaged over lists.

    ``relevance`` ``[R, N]`` >= 0 (binary or graded) is normalised into a distribution over the
    list. Lists without any relevant item carry no target and are skipped.
    """
    check_positive(temperature=temperature)
    mask = check_lists(logits, mask, relevance=relevance)
    check_relevance(relevance, mask)
    y = relevance.masked_fill(~mask, 0).to(logits.dtype)
    total = y.sum(-1, keepdim=True)
    target = y / total.clamp_min(torch.finfo(y.dtype).tiny)
    logp = masked_log_softmax(_clean(logits, mask) / temperature, mask)
    return mean_over_lists(-(target * logp).sum(-1), total.squeeze(-1) > 0)


def ranknet(logits: Tensor, relevance: Tensor, mask: Tensor | None = None, *, sigma: float = 1.0) -> Tensor:
    """RankNet (Burges et al., ICML 2005): ``log(1 + exp(-sigma (z_i - z_j)))`` for every pair ``y_i > y_j``.

    Averaged over the ordered pairs of a list (so long lists do not dominate), then over lists
    with at least one ordered pair. Tied labels form no pair.
    """
    check_positive(sigma=sigma)
    mask = check_lists(logits, mask, relevance=relevance)
    pairs = ordered_pairs(relevance, mask)
    return mean_over_lists(pairwise_logistic(_clean(logits, mask), pairs, sigma), pairs.flatten(1).any(-1))


def approx_ndcg(logits: Tensor, relevance: Tensor, mask: Tensor | None = None, *, temperature: float = 0.1) -> Tensor:
    """ApproxNDCG (Qin, Liu & Li, "A general approximation framework for direct optimization of IR measures", 2010).

    The position of item i is made smooth (their Eq. 17 with ``alpha = 1 / temperature``):
    ``pi_i = 1 + sum_{j != i} sigmoid((z_j - z_i) / T)``, and
    ``ApproxNDCG = (1 / IDCG) sum_i (2^{y_i} - 1) / log2(1 + pi_i)`` with the exact ideal DCG of
    the labels. The loss is ``1 - ApproxNDCG`` (0 for a perfect, infinitely sharp ranking; it can
    dip below 0 while the smooth ranks of several items crowd near the top). Lists without a
    relevant item have IDCG = 0 and are skipped.
    """
    check_positive(temperature=temperature)
    mask = check_lists(logits, mask, relevance=relevance)
    check_relevance(relevance, mask)
    z = _clean(logits, mask)
    y = relevance.masked_fill(~mask, 0).to(logits.dtype)
    others = mask.unsqueeze(-2) & ~torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)  # [R, N(i), N(j)]
    beats = torch.sigmoid((z.unsqueeze(-2) - z.unsqueeze(-1)) / temperature) * others  # [r, i, j] ~ 1[z_j > z_i]
    rank = 1.0 + beats.sum(-1)
    gain = torch.pow(2.0, y) - 1.0
    dcg = (gain / torch.log2(1.0 + rank)).sum(-1)
    ideal_gain = gain.sort(dim=-1, descending=True).values
    discount = torch.log2(torch.arange(2, y.shape[-1] + 2, device=y.device, dtype=y.dtype))
    idcg = (ideal_gain / discount).sum(-1)
    per_list = 1.0 - dcg / idcg.clamp_min(torch.finfo(y.dtype).tiny)
    return mean_over_lists(per_list, idcg > 0)


def rankmax(logits: Tensor, relevance: Tensor, mask: Tensor | None = None, *, margin: float = 1.0) -> Tensor:
    """Rankmax loss as written in RankTower Eq. 12 (after Kong et al., NeurIPS 2020).

    ``L = sum_{j: y_j > 0} log sum_{i=1}^{n} (z_i - z_j + margin)_+``. The inner sum runs over every
    real item including ``i = j``, whose term is ``margin``; so the loss is >= 0 with equality when
    every other item trails each positive by at least the margin (``margin = 1`` in the paper). Any
    ``y > 0`` counts as positive. Summed over the positives of a list (as in Eq. 12), averaged over
    lists with a positive.
    """
    check_positive(margin=margin)
    mask = check_lists(logits, mask, relevance=relevance)
    check_relevance(relevance, mask)
    z = _clean(logits, mask)
    positive = mask & (relevance.masked_fill(~mask, 0) > 0)
    hinge = F.relu(z.unsqueeze(-1) - z.unsqueeze(-2) + margin) * mask.unsqueeze(-1)  # [r, i, j]
    inner = hinge.sum(-2)  # [r, j]; >= margin for every real j
    per_item = torch.log(torch.where(positive, inner, torch.ones_like(inner)))
    return mean_over_lists(per_item.sum(-1), positive.any(-1))


def am_rankmax(
    logits: Tensor,
    relevance: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    power: float = 1.0,
    per_list: str = "sum",
) -> Tensor:
    """Adaptive-Margin Rankmax, RankTower Eq. 13-14.

    ``m(i, j) = alpha * 1[y_i = 0] + beta * |y_i - y_j|^power`` (Eq. 13; ``power = 0`` gives the
    paper's constant option ``delta = beta`` because only pairs with ``y_i < y_j`` occur), and
    ``L = sum_{j: y_j > 0} log(1 + sum_{i: y_i < y_j} (z_i - z_j + m(i, j))_+)``.

    Reading of Eq. 14: taken literally, the inner sum is empty or all-zero once positive j beats
    every lower item by its margin, and ``log 0 = -inf``. Eq. 12, which Eq. 14 extends, avoids
    that through its ``i = j`` term ``(z_j - z_j + 1)_+ = 1``; we keep that term as the ``1 +``,
    so the loss is >= 0, is 0 exactly when every margin holds, and with ``alpha = 0, beta = 1,
    power = 0`` equals Eq. 12 restricted to pairs ``y_i < y_j`` (the first change the paper lists).
    Summed over the positives of a list (``per_list="mean"``: averaged over the positives that have a lower
    item), then averaged over lists with at least one ordered pair.
    """
    if alpha < 0 or beta < 0 or power < 0:
        raise ValueError(f"alpha, beta and power must be >= 0, got alpha={alpha}, beta={beta}, power={power}")
    mask = check_lists(logits, mask, relevance=relevance)
    check_relevance(relevance, mask)
    z = _clean(logits, mask)
    y = relevance.masked_fill(~mask, 0).to(logits.dtype)
    lower = ordered_pairs(relevance, mask).transpose(-1, -2) & (y > 0).unsqueeze(-2)  # [r, i, j]: y_i < y_j, y_j > 0
    gap = (y.unsqueeze(-2) - y.unsqueeze(-1)).abs()  # [r, i, j] = |y_i - y_j|
    margin = alpha * (y == 0).unsqueeze(-1).to(z.dtype) + beta * gap**power
    hinge = F.relu(z.unsqueeze(-1) - z.unsqueeze(-2) + margin) * lower
    per_item = torch.log1p(hinge.sum(-2))  # [r, j]; 0 where j has no lower item or is not positive
    per_list_loss = reduce_list(per_item.sum(-1), lower.any(-2).sum(-1), per_list)
    return mean_over_lists(per_list_loss, lower.flatten(1).any(-1))


def softsort_log_matrix(scores: Tensor, mask: Tensor, *, temperature: float, power: float) -> tuple[Tensor, Tensor]:
    """Log of the SoftSort operator, RankTower Eq. 10 (Prillo & Eisenschlos 2020, Eq. 2), per list.

    ``SoftSort(s)[r, i] = softmax_i(-|sort(s)_r - s_i|^power / temperature)`` where ``sort`` is
    descending: row r is a soft one-hot of the item holding the r-th largest score. Returns the
    log-matrix ``[R, N, N]`` (0 outside real rows/columns) and the ``[R, N, N]`` mask of real
    (row, column) cells; the first ``n_valid`` rows of a list are real.
    """
    n = scores.shape[-1]
    s = scores.masked_fill(~mask, 0.0)
    ranked = scores.masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True).values
    real_rows = torch.arange(n, device=mask.device) < mask.sum(-1, keepdim=True)  # [R, N]
    ranked = torch.where(real_rows, ranked, torch.zeros_like(ranked))
    dist = (ranked.unsqueeze(-1) - s.unsqueeze(-2)).abs() ** power  # [r, row, col]
    cells = real_rows.unsqueeze(-1) & mask.unsqueeze(-2)
    return masked_log_softmax(-dist / temperature, cells), cells


def softsort_loss(
    logits: Tensor,
    relevance: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    power: float = 1.0,
    label_temperature: float | None = None,
    per_list: str = "sum",
) -> Tensor:
    """SoftSort sorting loss, RankTower Eq. 11.

    ``L = -tr(J_n (SoftSort(y) o log SoftSort(z)))``: since ``tr(J_n A)`` is the sum of all entries of
    A, this is the sum over the n rows of the cross-entropy between the soft permutation matrix of the
    labels (target) and that of the logits, i.e. summed, not averaged, over the list as the paper
    writes it. ``d = |.|^power`` (``power >= 1`` keeps the gradient finite); both matrices use
    ``temperature`` as in Eq. 11 unless ``label_temperature`` is given. Tied labels give identical
    target rows, so ties are handled without an arbitrary order. Gradients flow through both the
    sorted scores and the scores, as in SoftSort. Lists whose labels are all equal give no order to
    learn and are skipped. ``per_list="mean"`` divides a list's sum by its number of rows (real items).
    """
    check_positive(temperature=temperature)
    if label_temperature is not None:
        check_positive(label_temperature=label_temperature)
    if power < 1:
        raise ValueError(f"power must be >= 1 (|x|^p with p < 1 has an infinite gradient at 0), got {power}")
    mask = check_lists(logits, mask, relevance=relevance)
    y = relevance.masked_fill(~mask, 0).to(logits.dtype)
    log_pz, cells = softsort_log_matrix(logits, mask, temperature=temperature, power=power)
    log_py, _ = softsort_log_matrix(y, mask, temperature=label_temperature or temperature, power=power)
    target = log_py.exp() * cells
    per_list_loss = reduce_list(-(target * log_pz).sum((-2, -1)), mask.sum(-1), per_list)
    return mean_over_lists(per_list_loss, ordered_pairs(relevance, mask).flatten(1).any(-1))


__all__ = [
    "approx_ndcg",
    "am_rankmax",
    "check_lists",
    "masked_log_softmax",
    "mean_over_lists",
    "reduce_list",
    "rankmax",
    "ranknet",
    "softmax_cross_entropy",
    "softsort_log_matrix",
    "softsort_loss",
    "to_lists",
]
