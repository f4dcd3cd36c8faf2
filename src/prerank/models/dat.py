"""DAT: the Dual Augmented Two-tower model.

Yu et al., "A Dual Augmented Two-tower Model for Online Large-scale Recommendation" (DLP-KDD 2021).
Two components on top of a two-tower model:

- Adaptive-Mimic Mechanism (AMM): a learned augmented vector per user (``a_u``) and per item
  (``a_v``), concatenated to that side's feature embeddings as tower input. ``a_u`` is trained to
  mimic the *item* tower's output ``p_v`` on positive pairs and ``a_v`` the *user* tower's output
  ``p_u``, so each tower gets a summary of the opposite tower's view of its past positives:
  ``loss_u = [y a_u + (1 - y) p_v - p_v]^2`` and ``loss_v = [y a_v + (1 - y) p_u - p_u]^2``,
  which is ``||a_u - p_v||^2`` on positives and 0 on negatives. The paper stops the gradient of
  ``p_u`` / ``p_v`` in these losses, so they move only the augmented vectors.
- Category Alignment Loss (CAL): ``sum_{i >= 2} ||C(S^major) - C(S^i)||_F^2``, the squared Frobenius
  distance between the covariance of the item-tower outputs of the batch's majority category and
  that of every other category, to transfer the majority category's representation structure to
  the rarer ones.

The public IntTower repository's DAT draws ``a_u`` / ``a_v`` as fresh uniform noise on every forward
pass and never trains them; here they are embedding tables trained by the mimic losses (and by
the main loss, through the tower they feed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.layers.embedding import EmbeddingTables
from prerank.layers.mlp import MLP
from prerank.models.base import ConfigError, FeatureSelection, PreRanker, State
from prerank.schema import Schema

#: Names that auto-detection (``category_feature="auto"``) accepts as an item category.
CATEGORY_NAMES: tuple[str, ...] = ("category_id", "category", "cate_id", "cat_id", "categories", "genres", "genre")


@dataclass(frozen=True)
class DATConfig:
    """``out_dim`` is the width of ``p_u``, ``p_v`` and of the augmented vectors ``a_u``, ``a_v``.

    ``user_id`` / ``item_id`` name the categorical features whose ids index the augmented vectors
    (used for that even when ``features`` leaves them out of the towers).
    ``amm_weight_user`` / ``amm_weight_item`` / ``cal_weight`` weight loss_u, loss_v and CAL against
    the main loss; they are tuning knobs, and the defaults are not values from the paper.
    ``category_feature``: ``"auto"`` looks for an item feature named like a category
    (:data:`CATEGORY_NAMES`), a feature name uses that item feature, ``None`` disables CAL.
    ``temperature`` is the initial value of the learnable temperature of the cosine score.
    """

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (256, 128)
    out_dim: int = 32
    dropout: float = 0.0
    temperature: float = 0.1
    user_id: str = "user_id"
    item_id: str = "item_id"
    amm_weight_user: float = 0.5
    amm_weight_item: float = 0.5
    cal_weight: float = 1.0
    category_feature: str | None = "auto"
    features: tuple[str, ...] | None = None


class DAT(PreRanker):
    """``logit = cos(p_u, p_v) / tau + b`` with ``p_u = f_u([e_u; a_u])``, ``p_v = f_v([e_v; a_v])``.

    ``p_u`` and ``p_v`` are L2-normalised as in the paper; the paper trains with an in-batch softmax
    over this cosine and a temperature, here the trainer's loss (pointwise BCE by default) is used,
    with a learnable temperature ``tau`` (initialised to ``temperature``) and bias so that the
    bounded cosine can reach confident probabilities.

    Reading of "the augmented vector carries the opposite tower's information": ``a_u`` is an input
    of the *user* tower and mimics the *item* tower's output (and vice versa), as in the paper's
    Fig. 1; it is this mimicry, not its position, that brings the other tower's information in.
    The contract holds: ``a_u`` needs only the user id (user side), ``a_v`` only the item id.

    Mimic losses are averaged over the positives of the batch (the paper divides the sum by the
    number of all samples; the two differ by the batch's positive rate, absorbed by the weights).
    CAL uses every row's item representation, the category of a multi-valued feature (``genres``)
    is its first value, rows with category 0 (unknown) are left out, and categories with fewer
    than two rows in the batch (no covariance) are skipped.
    Under distributed training (``torchrun``) "the batch" of both terms is each rank's *local* batch (B/N rows of
    a global batch of B): the mimic means are over the rank's positives and CAL's covariances over the rank's rows,
    and DDP averages the ranks' gradients. So N ranks match one process only approximately (exactly for the main
    loss); IntTower's CIR, by contrast, gathers the global batch.

    Cached per user: ``p_u`` ``[D]``; per item: ``p_v`` ``[D]`` (D = ``out_dim``); per candidate: one
    D-dim dot product. Cross features are not used (no tower can see them).
    """

    def __init__(self, schema: Schema, config: DATConfig = DATConfig()):
        super().__init__(schema)
        if config.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {config.temperature}")
        if min(config.amm_weight_user, config.amm_weight_item, config.cal_weight) < 0:
            raise ConfigError("amm_weight_user, amm_weight_item and cal_weight must be >= 0")
        self.config = config
        self.sel = FeatureSelection.resolve(schema, config.features, use_cross=False)
        _require_id(schema, config.user_id, ("user", "context"), "user_id")
        _require_id(schema, config.item_id, ("item",), "item_id")
        self.category = _category_feature(schema, config.category_feature)
        d, out = config.embedding_dim, config.out_dim
        self.emb = EmbeddingTables(schema, d, self.sel.user + self.sel.item)
        self.aug_user = nn.Embedding(schema.vocab(config.user_id), out, padding_idx=0)
        self.aug_item = nn.Embedding(schema.vocab(config.item_id), out, padding_idx=0)
        for table in (self.aug_user, self.aug_item):
            nn.init.normal_(table.weight, std=0.01)
            with torch.no_grad():
                table.weight[0].zero_()  # unknown ids get no augmented information
        self.user_tower = MLP(len(self.sel.user) * d + out, config.hidden, out_dim=out, dropout=config.dropout)
        self.item_tower = MLP(len(self.sel.item) * d + out, config.hidden, out_dim=out, dropout=config.dropout)
        self.log_inv_temperature = nn.Parameter(torch.tensor(-math.log(config.temperature)))
        self.bias = nn.Parameter(torch.zeros(()))

    def encode_user(self, batch: Batch) -> State:
        x = torch.cat(
            [self.emb.fields(batch, self.sel.user).flatten(-2), self.aug_user(batch.features[self.config.user_id])], -1
        )
        return {"p": F.normalize(self.user_tower(x), dim=-1)}

    def encode_item(self, batch: Batch) -> State:
        x = torch.cat(
            [self.emb.fields(batch, self.sel.item).flatten(-2), self.aug_item(batch.features[self.config.item_id])], -1
        )
        return {"p": F.normalize(self.item_tower(x), dim=-1)}

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        return (user["p"] * item["p"]).sum(-1) * self.log_inv_temperature.exp() + self.bias

    def mimic_losses(self, batch: Batch, user: State, item: State) -> tuple[Tensor, Tensor]:
        """``(loss_u, loss_v)``: mean over positives of ``||a_u - sg(p_v)||^2`` and ``||a_v - sg(p_u)||^2``."""
        if batch.label is None:
            raise ValueError("DAT's mimic losses need batch.label (positives select the pairs to mimic)")
        pos = batch.label > 0.5
        a_u = self.aug_user(batch.features[self.config.user_id][pos])
        a_v = self.aug_item(batch.features[self.config.item_id][pos])
        p_u, p_v = user["p"].expand(len(batch), -1)[pos].detach(), item["p"][pos].detach()
        n = pos.sum().clamp_min(1)
        return ((a_u - p_v) ** 2).sum() / n, ((a_v - p_u) ** 2).sum() / n

    def category_alignment_loss(self, batch: Batch, item: State) -> Tensor | None:
        """CAL over the batch's item representations ``p_v``; None when CAL is disabled."""
        if self.category is None:
            return None
        ids = batch.features[self.category]
        return category_alignment_loss(item["p"], ids[:, 0] if ids.dim() == 2 else ids)

    def auxiliary_loss(self, batch: Batch, user: State, item: State) -> Tensor:
        loss_u, loss_v = self.mimic_losses(batch, user, item)
        loss = self.config.amm_weight_user * loss_u + self.config.amm_weight_item * loss_v
        cal = self.category_alignment_loss(batch, item)
        return loss if cal is None else loss + self.config.cal_weight * cal


def category_alignment_loss(reps: Tensor, categories: Tensor) -> Tensor:
    """``sum_{c != major} ||C(S^major) - C(S^c)||_F^2`` over categories with >= 2 rows (DAT's CAL).

    ``reps`` ``[B, D]``, ``categories`` ``[B]`` int (0 = unknown, ignored). ``C`` is the unbiased
    covariance ``[D, D]`` of a category's rows; the major category is the most frequent one.
    Returns a zero that keeps the graph when fewer than two categories qualify.
    """
    keep = categories > 0
    values, group, counts = torch.unique(categories[keep], return_inverse=True, return_counts=True)
    x = reps[keep]
    if int((counts >= 2).sum()) < 2:
        return reps.sum() * 0.0
    n_groups, d = len(values), x.shape[-1]
    size = counts[:, None].to(x.dtype)
    means = x.new_zeros(n_groups, d).index_add(0, group, x) / size  # [G, D]
    centred = x - means[group]
    # per-row outer products summed per category: O(B D^2), not O(G B D^2) as a one-hot einsum would be
    outer = (centred.unsqueeze(2) * centred.unsqueeze(1)).flatten(1)  # [B', D*D]
    cov = x.new_zeros(n_groups, d * d).index_add(0, group, outer).view(n_groups, d, d)
    cov = cov / (size - 1).clamp_min(1)[:, :, None]
    valid = counts >= 2
    major = int(torch.argmax(counts))
    gap = ((cov - cov[major]) ** 2).sum((-2, -1))
    valid[major] = False
    return gap[valid].sum()


def _require_id(schema: Schema, name: str, towers: tuple[str, ...], option: str) -> None:
    if name not in schema:
        raise ConfigError(f"DAT needs an id feature for its augmented vectors: {option}={name!r} is not in the schema")
    f = schema[name]
    if f.kind != "categorical" or f.tower not in towers:
        raise ConfigError(f"DAT option {option}={name!r} must name a categorical feature of tower {'/'.join(towers)}")


def _category_feature(schema: Schema, option: str | None) -> str | None:
    if option is None:
        return None
    if option == "auto":
        found = [f.name for f in schema.tower("item") if f.name in CATEGORY_NAMES and f.kind != "dense"]
        return found[0] if found else None
    if option not in schema or schema[option].tower != "item" or schema[option].kind == "dense":
        raise ConfigError(f"DAT category_feature={option!r} must name a categorical or sequence item feature")
    return option
