"""Field-wise layers: they act on stacked field embeddings ``[B, F, D]`` (one row per feature field).

- :class:`SENET`: squeeze-and-excitation over fields (Hu et al., "Squeeze-and-Excitation Networks",
  CVPR 2018, Sec. 3, applied to feature fields as in FiBiNET, Huang et al., RecSys 2019, Sec. 3.3).
- :class:`BilinearInteraction`: FiBiNET's bilinear field interaction (Huang et al., RecSys 2019,
  "Bilinear-Interaction Layer"), ``p_ij = (v_i W) * v_j`` for every pair of fields.
- :class:`LightSE`: IntTower's light-weight SE (Li et al., CIKM 2022, "Light-SE" module).
- :class:`FieldProjection`: one linear map per field, the exact decomposition of a linear layer over
  concatenated fields that lets interaction-focused models cache the item part (DESIGN.md, "contract").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def squeeze(fields: Tensor) -> Tensor:
    """Squeeze each field to one scalar by its mean over D: ``[B, F, D]`` -> ``[B, F]``."""
    return fields.mean(-1)


class SENET(nn.Module):
    """Squeeze-and-excitation field weights.

    ``z = mean_D(E)`` ``[B, F]``; ``s = sigmoid(W2 relu(W1 z))`` ``[B, F]`` with ``W1: F -> ceil(F / r)``;
    :meth:`forward` returns ``E * s`` ``[B, F, D]``. :meth:`excite` is split out so that a caller can
    assemble ``z`` from parts computed at different times (the user part once per request, the item
    part from the item cache): the weights only need the ``F`` squeezed scalars.
    """

    def __init__(self, num_fields: int, reduction_ratio: int = 3):
        super().__init__()
        if num_fields < 1 or reduction_ratio < 1:
            raise ValueError(
                f"SENET needs num_fields >= 1 and reduction_ratio >= 1, got {num_fields}, {reduction_ratio}"
            )
        hidden = max(1, -(-num_fields // reduction_ratio))
        self.excitation = nn.Sequential(nn.Linear(num_fields, hidden), nn.ReLU(), nn.Linear(hidden, num_fields))
        self.num_fields = num_fields

    def excite(self, z: Tensor) -> Tensor:
        """Field weights ``[B, F]`` in (0, 1) from squeezed fields ``z`` ``[B, F]``."""
        if z.shape[-1] != self.num_fields:
            raise ValueError(f"SENET expects {self.num_fields} fields, got {z.shape[-1]}")
        return torch.sigmoid(self.excitation(z))

    def forward(self, fields: Tensor) -> Tensor:
        return fields * self.excite(squeeze(fields)).unsqueeze(-1)


class LightSE(nn.Module):
    """IntTower's Light-SE: ``A = softmax_F(W z + b)``, ``E' = E + E * A`` (``[B, F, D]`` -> same).

    Compared to :class:`SENET` it has one linear layer instead of two, normalises the field
    weights with a softmax over fields and keeps a residual connection, so a field is re-weighted
    but never switched off. The authors' public code also puts a ReLU between the linear layer
    and the softmax; it is left out here, as a ReLU before a softmax only clips negative scores
    to a common floor and the module is meant to be a lighter SE.
    """

    def __init__(self, num_fields: int):
        super().__init__()
        if num_fields < 1:
            raise ValueError(f"LightSE needs num_fields >= 1, got {num_fields}")
        self.linear = nn.Linear(num_fields, num_fields)
        self.num_fields = num_fields

    def weights(self, fields: Tensor) -> Tensor:
        """Field weights ``[B, F]`` (each row sums to 1)."""
        if fields.shape[-2] != self.num_fields:
            raise ValueError(f"LightSE expects {self.num_fields} fields, got {fields.shape[-2]}")
        return torch.softmax(self.linear(squeeze(fields)), dim=-1)

    def forward(self, fields: Tensor) -> Tensor:
        return fields + fields * self.weights(fields).unsqueeze(-1)


class FieldProjection(nn.Module):
    """One linear map per field: ``P[b, f] = E[b, f] @ W_f``, ``[B, F, D]`` -> ``[B, F, H]``.

    Summing over fields gives a linear layer on the concatenated fields,
    ``W [e_1; ...; e_F] = sum_f W_f e_f``; keeping the per-field terms separate lets a caller weight
    them (SE gates) and precompute the item fields' terms once per item. ``offset`` selects which
    block of fields the input holds (fields ``offset .. offset + F - 1`` of the full layout).
    """

    def __init__(self, num_fields: int, dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_fields, dim, out_dim))
        # the same fan-in as an nn.Linear over all F*D concatenated inputs
        bound = 1.0 / (num_fields * dim) ** 0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def block(self, offset: int, n: int) -> Tensor:
        """The maps of fields ``offset .. offset + n - 1`` ``[n, D, H]``."""
        if offset < 0 or offset + n > self.weight.shape[0]:
            raise ValueError(
                f"fields {offset}..{offset + n - 1} are outside the {self.weight.shape[0]} projected fields"
            )
        return self.weight[offset : offset + n]

    def forward(self, fields: Tensor, offset: int = 0) -> Tensor:
        return torch.einsum("bfd,fdh->bfh", fields, self.block(offset, fields.shape[-2]))

    def summed(self, fields: Tensor, offset: int = 0, bias: Tensor | None = None) -> Tensor:
        """``bias + sum_f E[b, f] @ W_f`` ``[B, H]`` for ``E`` ``[B, F, D]``: the forward summed over fields,
        as one ``[B, F*D] x [F*D, H]`` matmul (``bias`` ``[H]`` or ``[B, H]`` is added by the same call)."""
        x, w = fields.flatten(-2), self.block(offset, fields.shape[-2]).flatten(0, 1)
        return x @ w if bias is None else torch.addmm(bias, x, w)


BILINEAR_TYPES: tuple[str, ...] = ("field_all", "field_each", "field_interaction")


class BilinearInteraction(nn.Module):
    """FiBiNET's bilinear interaction: ``p_ij = (v_i W) * v_j`` (elementwise) for every field pair ``i < j``.

    Huang et al., "FiBiNET" (RecSys 2019), "Bilinear-Interaction Layer", with its three types:
    ``field_all`` (one ``W`` ``[D, D]`` for all pairs), ``field_each`` (``W_i`` per field ``[F, D, D]``)
    and ``field_interaction`` (``W_ij`` per pair ``[P, D, D]``).

    Shapes: ``[B, F, D]`` -> ``[B, P, D]``, ``P = F (F - 1) / 2``, pairs in the order
    ``(0, 1), (0, 2), ..., (F - 2, F - 1)``. The pairs are gathered by index, not looped over.
    """

    def __init__(self, num_fields: int, dim: int, kind: str = "field_interaction"):
        super().__init__()
        if num_fields < 2:
            raise ValueError(f"BilinearInteraction needs at least 2 fields, got {num_fields}")
        if kind not in BILINEAR_TYPES:
            raise ValueError(f"bilinear type must be one of {BILINEAR_TYPES}, got {kind!r}")
        left, right = torch.triu_indices(num_fields, num_fields, offset=1)
        # separate storages: views of one tensor would be exported as a shared, partial constant
        self.register_buffer("left", left.clone(), persistent=False)
        self.register_buffer("right", right.clone(), persistent=False)
        n_maps = {"field_all": 1, "field_each": num_fields, "field_interaction": len(left)}[kind]
        self.weight = nn.Parameter(torch.empty(n_maps, dim, dim))
        bound = dim**-0.5
        nn.init.uniform_(self.weight, -bound, bound)
        self.kind = kind
        self.num_fields = num_fields

    @property
    def num_pairs(self) -> int:
        return len(self.left)

    def forward(self, fields: Tensor) -> Tensor:
        if fields.shape[-2] != self.num_fields:
            raise ValueError(f"BilinearInteraction expects {self.num_fields} fields, got {fields.shape[-2]}")
        v_i, v_j = fields[:, self.left], fields[:, self.right]  # [B, P, D] each
        if self.kind == "field_all":
            return torch.matmul(v_i, self.weight[0]) * v_j
        w = self.weight[self.left] if self.kind == "field_each" else self.weight  # [P, D, D]
        # [B, P, 1, D] @ [P, D, D] -> [B, P, 1, D]: one map per pair, batched over B
        return torch.matmul(v_i.unsqueeze(-2), w).squeeze(-2) * v_j
