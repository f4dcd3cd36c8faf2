"""Parts of FIT (Xiong et al., "A Learnable Fully Interacted Two-Tower Model for Pre-Ranking System", 2025).

Citations are to the authors' slides (``../shared/papers/fit-fully-interacted-two-tower.txt``):
the "Meta Query Module (MQM)" slide and Figure 2 for :class:`MetaQuerySelector`, the "Lightweight
Similarity Scorer (LSS)" slide for :class:`LightweightSimilarityScorer`, and the "Component
Effectiveness Analysis" slide for the ablation scorers (w/o LSS, w SumMax, w FC).

Every scorer splits into a user part, an item part and a per-candidate part so that the user part
is computed once per request (once per meta vector in FIT), the item part is cached per item, and
only ``forward`` runs per candidate:

``user_part(u [..., D']) -> [..., *U]``, ``item_part(v [N, D']) -> [N, *V]``,
``forward(user [N, *U], item [N, *V]) -> logits [N]``.

``forward(user [M, *U], item [N, *V], index [N])`` scores candidate n against ``user[index[n]]`` (FIT's
user part per meta vector, picked by the item's meta index).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gather_rows(user: Tensor, index: Tensor | None) -> Tensor:
    """``user[index]`` ``[N, *U]``, or ``user`` itself without ``index``."""
    return user if index is None else user.index_select(0, index)


class MetaQuerySelector(nn.Module):
    """The meta matrix and the attention unit of the MQM (MQM slide, points 1-2; Figure 2).

    The meta matrix ``[M, D]`` holds M trainable vectors, each standing for a cluster of items. The
    attention unit scores every meta vector against an item's key ``[N, D]`` and keeps only the most
    similar one (the slides: "retains only the most similar meta vector" in training; the item's
    "index" picks the user representation at inference).

    The slides leave open how the hard choice is trained. This implementation:

    * scores by cosine similarity, ``s = cos(key, m_k) / tau`` ``[N, M]``. Normalised codes spread the
      items over the meta vectors from a random start and avoid the norm-driven collapse of
      dot-product or Euclidean codebooks (Yu et al., "Vector-quantized Image Modeling with Improved
      VQGAN", ICLR 2022, Sec. 3.2);
    * keeps the forward pass exactly the slides' hard choice (``one_hot(argmax s)``) and trains it
      with a straight-through estimator: the backward pass uses the gradient of ``softmax(s)``, so
      the task loss reaches the meta matrix (also rows not chosen) and the item encoder through
      the choice itself;
    * offers a VQ-VAE-style clustering loss (van den Oord et al., "Neural Discrete Representation
      Learning", NeurIPS 2017, Eq. 3) on the normalised vectors, which moves each chosen meta vector
      toward its items (online k-means on directions; the slides' "each row represents a clustered
      item embedding") and commits items to their meta vector so the choice stays stable between
      steps. The meta vectors' norms stay free and are learnt by the task loss through the query;
    * restarts dead clusters, as online k-means and VQ codebooks do (Dhariwal et al., "Jukebox", 2020, Sec. 2.3
      "random restarts"): :meth:`observe` keeps an exponential moving average of the share of items that choose
      each meta vector (decay ``usage_decay``), and :meth:`restart_dead` moves every vector whose share fell below
      ``restart_threshold / M`` onto the direction of a random item key of the last observed batch (with the mean
      norm of the live vectors). Without it the clustering loss let most items share one or two meta vectors and
      the others drift together (mean pairwise cosine 0.91-0.97 on ML-100K): every meta query then gave almost the
      same user state and FIT fell back to a two-tower model. ``restart_threshold = 0`` turns it off.
    """

    def __init__(
        self,
        num_meta: int,
        dim: int,
        *,
        temperature: float,
        init_std: float = 0.01,
        restart_threshold: float = 0.1,
        usage_decay: float = 0.99,
    ):
        super().__init__()
        self.meta = nn.Parameter(torch.randn(num_meta, dim) * init_std)
        self.temperature = temperature
        self.restart_threshold = restart_threshold
        self.usage_decay = usage_decay
        # training-time statistics, not part of the model: old checkpoints load, and a resumed run re-learns them
        self.register_buffer("usage", torch.full((num_meta,), 1.0 / num_meta), persistent=False)
        self._last_keys: Tensor | None = None

    @property
    def num_meta(self) -> int:
        return self.meta.shape[0]

    def logits(self, key: Tensor) -> Tensor:
        """Similarity of each key ``[N, D]`` to each meta vector: ``[N, M]``."""
        return F.normalize(key, dim=-1) @ F.normalize(self.meta, dim=-1).T / self.temperature

    def index(self, key: Tensor) -> Tensor:
        """The most similar meta vector of each key: int64 ``[N]`` in ``[0, M)``."""
        return self.logits(key).argmax(-1)

    def select(self, key: Tensor) -> tuple[Tensor, Tensor]:
        """The chosen meta vector as the item's query ``[N, D]`` (straight-through) and its index ``[N]``.

        The forward value is exactly ``meta[index]``: the hard one-hot plus ``soft - soft.detach()``
        (exactly 0) times the meta matrix; the backward pass sees ``softmax(s) @ meta``.
        """
        logits = self.logits(key)
        index = logits.argmax(-1)
        soft = logits.softmax(-1)
        hard = F.one_hot(index, self.num_meta).to(soft.dtype)
        return (hard + (soft - soft.detach())) @ self.meta, index

    @torch.no_grad()
    def observe(self, key: Tensor, index: Tensor) -> None:
        """Update the moving share of items per meta vector with a training batch's choices; keep its keys."""
        share = torch.bincount(index, minlength=self.num_meta).to(self.usage.dtype) / max(len(index), 1)
        self.usage.mul_(self.usage_decay).add_((1 - self.usage_decay) * share)
        self._last_keys = key.detach()

    @torch.no_grad()
    def restart_dead(self) -> int:
        """Move the meta vectors chosen by too few items onto random keys of the last batch; returns how many.

        Call it before the meta matrix enters a step's graph (an in-place change of a tensor a graph holds would
        break its backward pass).
        """
        if self.restart_threshold <= 0 or self._last_keys is None or not len(self._last_keys):
            return 0
        dead = self.usage < self.restart_threshold / self.num_meta
        n_dead = int(dead.sum())
        if n_dead == 0 or n_dead == self.num_meta:
            return 0
        norm = self.meta[~dead].norm(dim=-1).mean()
        pick = torch.randint(len(self._last_keys), (n_dead,), device=self._last_keys.device)
        self.meta[dead] = F.normalize(self._last_keys[pick], dim=-1) * norm
        self.usage[dead] = 1.0 / self.num_meta
        return n_dead

    def mean_pairwise_cosine(self) -> float:
        """Mean cosine similarity over the ``M (M - 1) / 2`` pairs of meta vectors (1.0: all point the same way)."""
        m = F.normalize(self.meta.detach(), dim=-1)
        cos = m @ m.T
        pairs = torch.triu(torch.ones_like(cos, dtype=torch.bool), diagonal=1)
        return float(cos[pairs].mean()) if pairs.any() else float("nan")

    def cluster_loss(self, key: Tensor, index: Tensor, commitment: float) -> Tensor:
        """``||sg(k) - m_idx||^2 + commitment * ||k - sg(m_idx)||^2`` on unit vectors, mean over N (scalar)."""
        k = F.normalize(key, dim=-1)
        m = F.normalize(self.meta[index], dim=-1)
        codebook = (k.detach() - m).pow(2).sum(-1).mean()
        commit = (k - m.detach()).pow(2).sum(-1).mean()
        return codebook + commitment * commit


class LightweightSimilarityScorer(nn.Module):
    """LSS (LSS slide, "How it works" 1-3).

    1. The user and item representations ``[..., D']`` are mapped into ``H_u`` and ``H_v`` sub-spaces
       of width ``d``: ``U = P u`` ``[..., H_u, d]``, ``V = Q v`` ``[..., H_v, d]``.
    2. The similarity matrix of all head pairs: ``S_ij = <U_i, V_j>`` ``[N, H_u, H_v]``, plain dot
       products as on the slide (no ``1/sqrt(d)``: the representations start small, and shrinking
       ``S`` further only lengthens the early phase where the output is near-constant).
    3. A row-wise FC then a column-wise FC reduce ``S`` to one score:
       ``r_i = PReLU(sum_j W_ij S_ij + b_i)`` ``[N, H_u]``, then ``logit = sum_i c_i r_i + c_0``.

    The slides do not give the layer shapes; this reading gives each row (user head) its own
    weights over the item heads, so row i scores user head i against its own mixture of item
    heads: the ``H_v`` cached item heads feed ``H_u`` distinct bilinear forms, rather than
    collapsing into one mixed item vector as a row FC shared across rows would (a linear map of a
    bilinear form is again a bilinear form, so the non-linearity between the two FCs is what
    gives the scorer power beyond a dot product). The activation is PReLU (one slope per row, as in
    DIN's FCs) because it does not saturate: the representations are unnormalised, and in our runs
    on the synthetic data the variant without MQM stayed at the base rate with tanh (and, while
    dense inputs were large, with GELU, ELU and softplus), never with PReLU or leaky ReLU.
    Computation order: the row FC is linear in ``S``, so ``sum_j W_ij S_ij = <U_i, sum_j W_ij V_j>``.
    The mixture ``X_i = sum_j W_ij V_j`` depends on the item alone, so :meth:`item_part` returns it
    (``[N, H_u, d]``, cached per item) and :meth:`forward` takes only the ``H_u`` dot products
    ``<U_i, X_i>``, the same function as building ``S``. Parameters: ``H_u*H_v + 3*H_u + 1``;
    per-candidate FLOPs about ``2*H_u*d`` for the dot products and ``O(H_u)`` for the rest (the
    ``2*H_u*H_v*d`` of the mixture are spent once per item).
    """

    def __init__(self, rep_dim: int, user_heads: int, item_heads: int, head_dim: int):
        super().__init__()
        self.user_heads, self.item_heads, self.head_dim = user_heads, item_heads, head_dim
        self.user_proj = nn.Linear(rep_dim, user_heads * head_dim)
        self.item_proj = nn.Linear(rep_dim, item_heads * head_dim)
        self.row_weight = nn.Parameter(torch.randn(user_heads, item_heads) / math.sqrt(item_heads))
        self.row_bias = nn.Parameter(torch.zeros(user_heads))
        self.activation = nn.PReLU(user_heads)
        self.column = nn.Linear(user_heads, 1)

    def user_part(self, u: Tensor) -> Tensor:
        """``[..., D']`` -> user heads ``[..., H_u, d]``."""
        return self.user_proj(u).unflatten(-1, (self.user_heads, self.head_dim))

    def item_part(self, v: Tensor) -> Tensor:
        """``[N, D']`` -> the item heads mixed for each user head, ``[N, H_u, d]`` (see :meth:`mix`)."""
        return self.mix(self.item_proj(v).unflatten(-1, (self.item_heads, self.head_dim)))

    def mix(self, heads: Tensor) -> Tensor:
        """Item heads ``V`` ``[N, H_v, d]`` -> ``X_i = sum_j W_ij V_j`` ``[N, H_u, d]``."""
        return torch.einsum("ij,njd->nid", self.row_weight, heads)

    def forward(self, user: Tensor, item: Tensor, index: Tensor | None = None) -> Tensor:
        """User heads ``U`` ``[N, H_u, d]`` (or ``[M, H_u, d]`` picked by ``index``), mixed item heads ``X``
        ``[N, H_u, d]`` -> logits ``[N]``: ``r_i = PReLU(<U_i, X_i> + b_i)``, ``logit = sum_i c_i r_i + c_0``."""
        pre = (gather_rows(user, index) * item).sum(-1) + self.row_bias  # [N, H_u]
        return self.column(self.activation(pre)).squeeze(-1)


class SumMaxScorer(nn.Module):
    """ "w SumMax" ablation: ColBERT-style late interaction, ``sum_i max_j <U_i, V_j> + b``.

    Same head projections as :class:`LightweightSimilarityScorer` (``U`` ``[N, H_u, d]``, ``V``
    ``[N, H_v, d]``); the hand-crafted sum-max reduction replaces the learnt row/column FCs (IntTower's
    scorer, which the slides' Background contrasts with LSS).
    """

    def __init__(self, rep_dim: int, user_heads: int, item_heads: int, head_dim: int):
        super().__init__()
        self.user_heads, self.item_heads, self.head_dim = user_heads, item_heads, head_dim
        self.user_proj = nn.Linear(rep_dim, user_heads * head_dim)
        self.item_proj = nn.Linear(rep_dim, item_heads * head_dim)
        self.bias = nn.Parameter(torch.zeros(()))

    def user_part(self, u: Tensor) -> Tensor:
        return self.user_proj(u).unflatten(-1, (self.user_heads, self.head_dim))

    def item_part(self, v: Tensor) -> Tensor:
        return self.item_proj(v).unflatten(-1, (self.item_heads, self.head_dim))

    def forward(self, user: Tensor, item: Tensor, index: Tensor | None = None) -> Tensor:
        sim = torch.einsum("nid,njd->nij", gather_rows(user, index), item)
        return sim.amax(-1).sum(-1) + self.bias


class DotScorer(nn.Module):
    """ "w/o LSS" ablation: the Two-Tower output layer, ``<u, v> + b`` over the ``D'``-dim representations."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def user_part(self, u: Tensor) -> Tensor:
        return u

    def item_part(self, v: Tensor) -> Tensor:
        return v

    def forward(self, user: Tensor, item: Tensor, index: Tensor | None = None) -> Tensor:
        return (gather_rows(user, index) * item).sum(-1) + self.bias


class FCScorer(nn.Module):
    """ "w FC" ablation: an FC head over the concatenated representations, ``w^T ReLU(W [u; v] + b) + c``.

    An FC with no hidden layer over ``[u; v]`` would be additive (``W_u u + W_v v``), i.e. no user-item
    interaction at all, so the slides' "FC layer" is read as one hidden layer of width ``h``. Its first
    layer splits like COLD's (DESIGN.md): ``W_u u`` ``[..., h]`` is precomputed per user (per meta
    vector), ``W_v v + b`` ``[N, h]`` is cached per item, and per candidate only the sum, the ReLU and
    an ``h``-dim dot product remain (about ``4h`` FLOPs).
    """

    def __init__(self, rep_dim: int, hidden: int):
        super().__init__()
        self.user_proj = nn.Linear(rep_dim, hidden, bias=False)
        self.item_proj = nn.Linear(rep_dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def user_part(self, u: Tensor) -> Tensor:
        return self.user_proj(u)

    def item_part(self, v: Tensor) -> Tensor:
        return self.item_proj(v)

    def forward(self, user: Tensor, item: Tensor, index: Tensor | None = None) -> Tensor:
        return self.out(torch.relu(gather_rows(user, index) + item)).squeeze(-1)


Scorer = LightweightSimilarityScorer | SumMaxScorer | DotScorer | FCScorer
