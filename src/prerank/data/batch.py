"""The :class:`Batch` every model, loss and metric consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class Batch:
    """A batch of rows, column-wise, as tensors.

    Shapes (B rows; L a sequence's ``max_len``):
        features: categorical ``[B]`` int64, sequence ``[B, L]`` int64 (0 = padding, most recent
            last), dense ``[B]`` float32.
        label ``[B]`` float32 in {0, 1}; label_level ``[B]`` int64 graded relevance;
        request_id ``[B]`` int64; stage ``[B]`` int64 (index into :data:`prerank.schema.STAGES`);
        teacher_logit ``[B]`` float32.

    A request-level batch (listwise training) has every tensor shaped ``[R, N, ...]`` instead of
    ``[B, ...]`` and a ``mask`` ``[R, N]`` that is False on padding; :meth:`flat` turns it into a
    row batch of the valid rows.
    """

    features: dict[str, Tensor]
    label: Tensor | None = None
    request_id: Tensor | None = None
    label_level: Tensor | None = None
    stage: Tensor | None = None
    teacher_logit: Tensor | None = None
    mask: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        if self.label is not None:
            return int(self.label.shape[0])
        for t in self.features.values():
            return int(t.shape[0])
        if self.request_id is not None:
            return int(self.request_id.shape[0])
        return 0

    def _map(self, fn) -> Batch:  # type: ignore[no-untyped-def]
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = fn(v)
            elif isinstance(v, dict):
                out[f.name] = {k: fn(t) for k, t in v.items()}
            else:
                out[f.name] = v
        return Batch(**out)

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def select(self, index: Tensor | slice) -> Batch:
        """Rows at ``index`` (a slice, an index tensor or a boolean mask)."""
        return self._map(lambda t: t[index])

    def only(self, names: list[str] | tuple[str, ...]) -> Batch:
        """Same rows, keeping only the named features."""
        missing = [n for n in names if n not in self.features]
        if missing:
            raise KeyError(f"batch lacks features {missing}")
        return replace(self, features={n: self.features[n] for n in names})

    def flat(self) -> Batch:
        """A request-level batch ``[R, N, ...]`` as a row batch of its valid rows."""
        if self.mask is None:
            return self
        m = self.mask
        out = self._map(lambda t: t[m] if t.shape[:2] == m.shape else t)
        out.mask = None
        return out

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        first = batches[0]
        out = {}
        for f in fields(first):
            v = getattr(first, f.name)
            if isinstance(v, Tensor):
                out[f.name] = torch.cat([getattr(b, f.name) for b in batches])
            elif isinstance(v, dict):
                out[f.name] = {k: torch.cat([getattr(b, f.name)[k] for b in batches]) for k in v}
            else:
                out[f.name] = v
        return Batch(**out)
