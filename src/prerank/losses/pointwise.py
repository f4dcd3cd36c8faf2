"""Pointwise binary cross-entropy on logits: the trainer's default loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from prerank.data.batch import Batch


def binary_cross_entropy(logits: Tensor, labels: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """Weighted mean of ``BCE(sigmoid(z), y)`` over rows: ``sum_b w_b l_b / sum_b w_b``.

    Shapes: ``logits``, ``labels`` (in [0, 1], soft labels allowed) and ``weights`` (>= 0, default 1)
    all ``[B]``. An empty batch or zero total weight gives a zero still connected to ``logits``.
    """
    if logits.dim() != 1 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [B], got {logits.dtype} of shape {tuple(logits.shape)}")
    if labels.shape != logits.shape:
        raise ValueError(f"labels must have the shape of logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if not ((labels >= 0) & (labels <= 1)).all():
        raise ValueError("labels must lie in [0, 1] (NaN is not allowed)")
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    if weights is None:
        return loss.sum() / max(loss.numel(), 1)
    if weights.shape != logits.shape:
        raise ValueError(f"weights must have the shape of logits {tuple(logits.shape)}, got {tuple(weights.shape)}")
    if not (weights >= 0).all():
        raise ValueError("weights must be >= 0 (NaN is not allowed)")
    w = weights.to(logits.dtype)
    return (w * loss).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)


@dataclass(frozen=True)
class PointwiseBCE:
    """``loss(logits, batch)`` = :func:`binary_cross_entropy` against ``batch.label``.

    Works on a row batch (``logits`` ``[B]``) and on a request-level batch (``logits`` ``[R, N]``
    with ``batch.mask``), where padding is dropped first.
    """

    requires_lists: ClassVar[bool] = False

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor:
        if batch.label is None:
            raise ValueError("the bce loss needs batch.label")
        labels = batch.label
        if batch.mask is not None and logits.shape == batch.mask.shape:
            logits, labels = logits[batch.mask], labels[batch.mask]
        return binary_cross_entropy(logits, labels)


__all__ = ["PointwiseBCE", "binary_cross_entropy"]
