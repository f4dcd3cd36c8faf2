"""IntTower: an interaction-enhanced two-tower model.

Li et al., "IntTower: the Next Generation of Two-Tower Model for Pre-Ranking System" (CIKM 2022,
arXiv:2210.09890). Three modules on top of a two-tower model:

- Light-SE (:class:`prerank.layers.field.LightSE`) re-weights each tower's field embeddings.
- FE-Block (fine-grained early interaction): the user tower's hidden representation at *every*
  layer ``l`` is projected into ``H_u`` heads of width ``d``; the item tower's final representation
  into ``H_i`` heads. The score sums, over layers and user heads, the best-matching item head
  (a ColBERT-style sum of max similarities): ``s = sum_l sum_i max_j <e_u^{l,i}, e_v^j>``.
- CIR (contrastive interaction regularisation): an in-batch contrastive loss between user and
  item representations with a temperature, added to the main loss.

The public code (archersama/IntTower) computes its contrastive loss and never adds it to the
objective; here :meth:`IntTower.auxiliary_loss` returns it and the trainer adds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.layers.collective import gather_rows, rank_and_world, sum_over_ranks
from prerank.layers.embedding import EmbeddingTables
from prerank.layers.field import LightSE
from prerank.models.base import ConfigError, FeatureSelection, PreRanker, State
from prerank.schema import Schema


@dataclass(frozen=True)
class IntTowerConfig:
    """Tower widths, FE-Block heads and the CIR loss.

    The paper's setting is 3 tower layers with 32 heads of 64 dims per side
    (``user_heads=32, item_heads=32, head_dim=64``): ``3 x 32 x 32 x 64`` multiply-adds per candidate.
    The defaults (8 x 16) cost 64 times less, which suits CPU; set the published values to match the paper.
    ``cir_temperature`` 0.07 is the value in the authors' code; ``cir_weight`` scales CIR against the main loss;
    ``cir_mask_positives`` keeps a request's other positives out of each positive's negatives (see IntTower).
    """

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (256, 128, 64)
    user_heads: int = 8
    item_heads: int = 8
    head_dim: int = 16
    dropout: float = 0.0
    cir_weight: float = 0.1
    cir_temperature: float = 0.07
    cir_mask_positives: bool = True
    features: tuple[str, ...] | None = None


class IntTower(PreRanker):
    """``logit = sum_l sum_i max_j <U^l_i, V_j> + b`` with ``U^l`` ``[H_u, d]`` per user layer, ``V`` ``[H_i, d]``.

    Towers: Light-SE over the side's fields ``[B, F, D]``, flattened, then ``L`` layers
    ``h^l = relu(W_l h^{l-1} + b_l)``. FE-Block: ``U^l = reshape(P_l h^l)`` for ``l = 1..L`` (each
    layer's output, so the interaction sees shallow as well as deep user representations) and
    ``V = reshape(Q h_v^L)``. Reading: "multi-head representations at each layer of the user tower"
    is taken as each layer's output ``h^1 .. h^L``; the public code projects each layer's *input*
    instead (the raw embeddings and ``h^1 .. h^{L-1}``), which never lets the last layer interact.

    CIR: for each positive row ``i`` of the batch, a softmax over the batch's items
    ``cos(h_u^{L,i}, h_v^{L,j}) / tau`` with target ``j = i`` (the other rows' items are negatives),
    averaged over positives, on the last-layer tower outputs. As in a plain in-batch softmax, another
    row showing the same item counts as a negative (not masked: popular items make this happen). The other
    *positives of the same request* are masked out of the softmax (``cir_mask_positives``, default on): the
    paper's in-batch negatives are other users' items, which holds in shuffled row batches, but a request batch
    (``batching=requests``, whole lists for listwise and distillation losses) holds all of a user's positives
    together, and without the mask CIR would push the user away from the items the user chose (on ML-1M, where
    78% of impressions are positive, about 70 of them per list). The authors' code trains on row batches and
    masks nothing; ``cir_mask_positives=false`` is that reading.
    Under distributed training (``torchrun``) the batch is the *global* batch: each rank's positives are
    contrasted with the items of every rank (:func:`~prerank.layers.collective.gather_rows`) and the mean is over
    all ranks' positives, so N ranks of B/N rows train as one process of B rows.

    Cached per user: ``heads`` ``[L, H_u, d]``; per item: ``heads`` ``[H_i, d]`` (the last-layer
    ``rep`` ``[hidden[-1]]`` is added to the states in training mode only, for CIR); per candidate:
    ``L x H_u x H_i`` dot products of width ``d``, a max over item heads and a sum.
    Cross features are not used (no tower can see them).
    """

    def __init__(self, schema: Schema, config: IntTowerConfig = IntTowerConfig()):
        super().__init__(schema)
        if not config.hidden or min(config.hidden) < 1:
            raise ConfigError(f"IntTower needs at least one positive hidden width, got hidden={config.hidden}")
        if min(config.user_heads, config.item_heads, config.head_dim) < 1:
            raise ConfigError("user_heads, item_heads and head_dim must be >= 1")
        if config.cir_temperature <= 0 or config.cir_weight < 0:
            raise ConfigError("cir_temperature must be > 0 and cir_weight >= 0")
        self.config = config
        self.sel = FeatureSelection.resolve(schema, config.features, use_cross=False)
        d = config.embedding_dim
        self.emb = EmbeddingTables(schema, d, self.sel.user + self.sel.item)
        self.user_se = LightSE(len(self.sel.user))
        self.item_se = LightSE(len(self.sel.item))
        self.user_layers = _layers(len(self.sel.user) * d, config.hidden)
        self.item_layers = _layers(len(self.sel.item) * d, config.hidden)
        self.user_proj = nn.ModuleList(nn.Linear(h, config.user_heads * config.head_dim) for h in config.hidden)
        self.item_proj = nn.Linear(config.hidden[-1], config.item_heads * config.head_dim)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.bias = nn.Parameter(torch.zeros(()))

    def _tower(self, layers: nn.ModuleList, fields: Tensor) -> list[Tensor]:
        """Outputs ``h^1 .. h^L`` of a tower, each ``[B, hidden[l]]``."""
        h = fields.flatten(-2)
        out = []
        for layer in layers:
            h = self.dropout(torch.relu(layer(h)))
            out.append(h)
        return out

    def encode_user(self, batch: Batch) -> State:
        hs = self._tower(self.user_layers, self.user_se(self.emb.fields(batch, self.sel.user)))
        c = self.config
        heads = torch.cat([p(h) for p, h in zip(self.user_proj, hs, strict=True)], -1)
        heads = heads.view(-1, len(hs), c.user_heads, c.head_dim)
        return {"heads": heads, "rep": hs[-1]} if self.training else {"heads": heads}

    def encode_item(self, batch: Batch) -> State:
        hs = self._tower(self.item_layers, self.item_se(self.emb.fields(batch, self.sel.item)))
        heads = self.item_proj(hs[-1]).view(-1, self.config.item_heads, self.config.head_dim)
        return {"heads": heads, "rep": hs[-1]} if self.training else {"heads": heads}

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        u, v = user["heads"].flatten(1, 2), item["heads"]  # [B_u, L*H_u, d], [N, H_i, d]
        sim = torch.matmul(u, v.transpose(1, 2))  # [N, L*H_u, H_i]; B_u = 1 broadcasts (matmul, portable to ONNX)
        return sim.amax(-1).sum(-1) + self.bias

    def cir_loss(self, batch: Batch, user: State, item: State) -> Tensor:
        """In-batch contrastive loss of positive rows (0 with the graph kept when there is none)."""
        if "rep" not in user or "rep" not in item:
            raise ValueError("IntTower's CIR loss needs states encoded in training mode (model.train())")
        if batch.label is None:
            raise ValueError("IntTower's CIR loss needs batch.label (positives are the contrastive pairs)")
        pos = batch.label > 0.5
        u = F.normalize(user["rep"].expand(len(batch), -1)[pos], dim=-1)  # [P, D]
        v, start = gather_rows(F.normalize(item["rep"], dim=-1))  # [B, D], every rank's items under torchrun
        _, world = rank_and_world()
        n_pos = sum_over_ranks(u.shape[0])
        if n_pos == 0:
            return v.sum() * 0.0
        logits = u @ v.T / self.config.cir_temperature  # [P, B]
        target = torch.nonzero(pos).squeeze(-1) + start
        if self.config.cir_mask_positives and batch.request_id is not None:
            # a positive's request id, or a value no request has; gathered like the items under torchrun
            no_request = torch.iinfo(torch.int64).min
            key, _ = gather_rows(torch.where(pos, batch.request_id, no_request))
            same = batch.request_id[pos][:, None] == key[None, :]  # [P, B]: positives of the anchor's request
            same[torch.arange(len(target), device=same.device), target] = False  # its own item stays the target
            logits = logits.masked_fill(same, float("-inf"))
        # the mean over the global batch's positives (DDP divides the sum of the ranks' gradients by ``world``);
        # ``v.sum() * 0`` keeps the gather in the graph of a rank without positives, so its backward runs everywhere
        return F.cross_entropy(logits, target, reduction="sum") * (world / n_pos) + v.sum() * 0.0

    def auxiliary_loss(self, batch: Batch, user: State, item: State) -> Tensor:
        return self.config.cir_weight * self.cir_loss(batch, user, item)


def _layers(in_dim: int, hidden: tuple[int, ...]) -> nn.ModuleList:
    dims = (in_dim, *hidden)
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
