"""Synthetic impression logs with a known ground truth: the package's built-in default dataset.

``generate(out, rows, seed)`` writes a dataset directory (DESIGN.md "Data") of ``rows`` impressions
drawn from a hidden world, deterministically from ``seed`` and in bounded memory at any size.

The hidden world (:class:`World`, built by :func:`make_world`)
----------------------------------------------------------------
* Items have a category, a brand (nested in the category), a price level 1-10, a popularity
  (Zipf-like over a random rank) and a latent vector ``b_i = c_cat + 0.6 e_brand + e_i`` in
  ``R^d`` (``c``, ``e`` ~ N(0, I/d), so a category centre has unit norm).
* Users belong to a hidden segment that shapes their observed age and gender, their category
  tastes and price sensitivity; each has an activity level (request rate and click propensity) and
  ``K`` interests: distinct categories ``cat_uk`` with strength ``w_uk`` and vectors
  ``a_uk = w_uk (c_cat_uk + e_uk)``.
* The true click logit of user ``u`` shown item ``i`` at hour ``h`` on device ``v`` is::

      z = base + 0.4 pop_i + 0.3 act_u + hour_h + device_v
          + scale * (max_k <a_uk, b_i> - m0)                 # multi-interest match
          + T[segment_u, cat_i, daypart_h]                    # segment x category x context
          - sens[segment_u] * (price_i - 5.5)

  with ``pop`` the standardised log popularity, ``act`` ~ N(0, 1), ``hour_h = 0.25 cos(2 pi (h -
  20) / 24)``, ``device`` ~ N(0, 0.15^2), ``T`` ~ N(0, 0.35^2), ``sens`` ~ U(0, 0.15) and ``m0``
  centring the match term. ``max_k`` (a user answers to the interest an item matches best, the
  multi-interest view of MIND, Li et al. CIKM 2019) makes the interaction non-separable: no
  single user vector dotted with an item vector reproduces it. With the defaults (d = 16, K = 4)
  the best rank-16 / 32 / 64 fit of the match term over users x items leaves 30% / 20% / 12% of
  its variance (main effects removed; the tests check the rank-d residual on a small world).
  Popularity and activity are main effects every model can learn.
* Graded labels: click ~ Bernoulli(sigmoid(z)); cart | click ~ Bernoulli(sigmoid(-1.5 + 0.8 m - 0.15
  (price - 5.5))); purchase | cart ~ Bernoulli(sigmoid(-0.8 + 0.5 m - 0.2 (price - 5.5))) with
  ``m = max_k <a_uk, b_i> - m0``. ``label_level`` is 0 exposure, 1 click, 2 cart, 3 purchase and
  ``label = label_level >= 1``.

What is observed
----------------
Each user has a behaviour log (up to ``log_len`` events, before and during the logged period)
of items drawn with probability proportional to ``exp(4 m(u, i) + 0.5 pop_i)``, i.e. mostly from
their interests.
A request is one user at one time (arrivals follow a daily cycle) with ``min_request_size`` to
``max_request_size`` impressions. The previous system shows, per impression, with probability
``interest_exposure`` a popular item of one of the user's interests, otherwise a popular item,
avoiding repeats inside a request. Features, with their FSCD Table 1 cost type as
:data:`prerank.schema.COST_O` reads it (I simple per-request, II simple per-item, III complex
per-request, IV complex per-item):

* user (I): ``user_id``, ``age``, ``gender``; (III) ``user_ctr``: smoothed click rate of a
  simulated warm-up period before the log; ``hist_item_id``/``hist_category_id``: the last
  ``hist_len`` log events before the request (sharing the ``item_id``/``category_id`` tables).
* context (I): ``hour``, ``device``.
* item (II): ``item_id``, ``category_id``, ``brand_id``, ``price_level``; (IV) ``item_ctr`` and
  ``item_popularity`` from the warm-up period.
* cross (IV): ``user_cat_affinity``, the share of the visible history in the candidate's
  category; ``user_cat_clicks``, the user's whole earlier log aggregated per category (longer
  than the visible history), bucketed counts.

No feature sees a label of the generated rows: statistics come from the warm-up simulation, the
log is drawn from the hidden interests independently of the impressions, and a request sees only
log events time-stamped before it. Every row is an impression (``stage`` 0, no unexposed rows);
the cascade builder adds candidates. Splits are by request time: the first ``1 - valid_share -
test_share`` of requests train, then valid, then test. ``meta.json`` records the options, label
rates and the ground-truth AUC and logloss of the true logits per split, an upper reference no
model beats in expectation.

Default size (200k rows, seed 0): click rate 17%, ground-truth test AUC 0.818. The same logits
with the match term replaced by its mean over the item's category reach 0.770 (what category
level cross features can give), without it 0.691; item-level interaction (e.g. target attention
over the history) is worth up to about 0.05 AUC more.

Determinism and memory: requests are generated in blocks of :data:`BLOCK_REQUESTS`, each with its
own RNG derived from ``(seed, block)``, and written through :class:`~prerank.data.parquet.SplitWriter`,
so memory depends on the world, the block and ``rows_per_file`` (the writer's buffer), never on
``rows`` (about 0.6 GB peak RSS at the defaults, 0.3 GB of it the imports); the same seed and options give
identical Parquet files.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from prerank.data.parquet import SPLITS, SplitWriter, arrow_schema, read_meta
from prerank.data.recipes.common import fscd_cost
from prerank.io import atomic_write, atomic_write_text
from prerank.schema import FeatureSpec, Schema

__all__ = ["BLOCK_REQUESTS", "SyntheticConfig", "World", "generate", "make_world", "synthetic_schema", "true_logits"]

#: Requests per RNG block: the unit of determinism and of memory.
BLOCK_REQUESTS = 1024
GENERATOR = "prerank.data.synthetic"
VERSION = 1

_T0 = 1_704_067_200  # 2024-01-01 00:00:00 UTC: the logged period starts here
_LOG_LEAD_DAYS = 30  # behaviour logs start this long before the logged period
_N_AGES, _N_DEVICES, _N_PRICES = 7, 3, 10
_PRICE_MID = 5.5
_HIST_TEMPERATURE = 4.0  # how strongly logged behaviour follows the interests
#: ``user_cat_clicks`` id k + 1 holds counts in ``[_COUNT_EDGES[k], _COUNT_EDGES[k + 1])``.
_COUNT_EDGES = np.array([0, 1, 2, 3, 4, 6, 9, 13])
_AUC_BINS = np.linspace(-20.0, 20.0, 40_001)  # 1e-3 logit resolution for the streamed ground-truth AUC


@dataclass(frozen=True)
class SyntheticConfig:
    """Options of :func:`generate` (every field is also a keyword of ``generate``).

    Sizes of the world (``n_*``, ``latent_dim`` = d, ``n_interests`` = K), of the visible history
    (``hist_len``) and of each user's behaviour log (``log_len``); request sizes; the logged period
    (``days``) and the valid/test shares of requests (the latest ones); ``interest_exposure``, how
    often the previous system targets the user's interests; ``base_logit`` sets the click rate
    (about 17% by default) and ``interaction_scale`` the weight of the non-separable term.
    """

    n_users: int = 5000
    n_items: int = 2000
    n_categories: int = 20
    n_brands: int = 200
    n_segments: int = 6
    n_interests: int = 4
    latent_dim: int = 16
    hist_len: int = 20
    log_len: int = 100
    min_request_size: int = 10
    max_request_size: int = 50
    days: int = 14
    valid_share: float = 0.1
    test_share: float = 0.1
    interest_exposure: float = 0.5
    base_logit: float = -3.5
    interaction_scale: float = 2.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if f.type == "float" and not (numeric and math.isfinite(value)):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if self.n_categories > self.n_items or self.n_brands < self.n_categories:
            raise ValueError("need n_categories <= n_items and n_brands >= n_categories (brands nest in categories)")
        if self.n_interests > self.n_categories:
            raise ValueError("n_interests must not exceed n_categories (interests are distinct categories)")
        if self.hist_len > self.log_len:
            raise ValueError("hist_len must not exceed log_len (the history is the end of the log)")
        if self.max_request_size < self.min_request_size or self.max_request_size > self.n_items:
            raise ValueError("need min_request_size <= max_request_size <= n_items")
        for name in ("valid_share", "test_share"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name} must lie in (0, 0.5)")
        if not 0.0 <= self.interest_exposure <= 1.0:
            raise ValueError("interest_exposure must lie in [0, 1]")
        if self.interaction_scale < 0:
            raise ValueError("interaction_scale must be >= 0 (users like, not avoid, what matches their interests)")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SyntheticConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown synthetic options {sorted(unknown)} (known: {sorted(known)})")
        return cls(**options)


def synthetic_schema(config: SyntheticConfig = SyntheticConfig()) -> Schema:
    """The schema of a synthetic dataset with these options (FSCD cost types by :func:`fscd_cost`)."""
    c = config
    item_seq = {"shares": "item_id", "max_len": c.hist_len, "n_values": c.hist_len}
    category_seq = {**item_seq, "shares": "category_id"}
    edges = ",".join(map(str, _COUNT_EDGES.tolist()))
    clicks = f"all earlier log events in the item's category, counted and bucketed at {edges}+ (id 1 = none)"
    # name, tower, kind, vocab_size, embedding_dim, complex (FSCD), description, other FeatureSpec fields
    rows: tuple[tuple[str, str, str, int, int, bool, str, dict[str, Any]], ...] = (
        ("user_id", "user", "categorical", c.n_users + 1, 16, False, "user id", {}),
        ("age", "user", "categorical", _N_AGES + 1, 4, False, "age bucket (the hidden segment shapes it)", {}),
        ("gender", "user", "categorical", 3, 4, False, "gender (the hidden segment shapes it)", {}),
        ("user_ctr", "user", "dense", 0, 16, True, "smoothed click rate in a warm-up period", {}),
        ("hist_item_id", "user", "sequence", 0, 16, True, "latest log items, most recent last", item_seq),
        ("hist_category_id", "user", "sequence", 0, 8, True, "categories of hist_item_id", category_seq),
        ("hour", "context", "categorical", 25, 4, False, "hour of day + 1 (UTC)", {}),
        ("device", "context", "categorical", _N_DEVICES + 1, 4, False, "device of the request", {}),
        ("item_id", "item", "categorical", c.n_items + 1, 16, False, "item id", {}),
        ("category_id", "item", "categorical", c.n_categories + 1, 8, False, "item category", {}),
        ("brand_id", "item", "categorical", c.n_brands + 1, 8, False, "item brand (nested in a category)", {}),
        ("price_level", "item", "categorical", _N_PRICES + 1, 4, False, "price level 1-10", {}),
        ("item_ctr", "item", "dense", 0, 16, True, "smoothed click rate in a warm-up period", {}),
        ("item_popularity", "item", "dense", 0, 16, True, "log1p(warm-up impressions) / its maximum, in [0, 1]", {}),
        ("user_cat_affinity", "cross", "dense", 0, 16, True, "share of the visible history in the item's category", {}),
        ("user_cat_clicks", "cross", "categorical", len(_COUNT_EDGES) + 1, 4, True, clicks, {}),
    )
    features = tuple(
        FeatureSpec(
            name,
            tower,
            kind,
            vocab_size=vocab,
            embedding_dim=dim,
            cost_type=fscd_cost(tower, complex_=cx),
            description=text,
            **extra,
        )
        for name, tower, kind, vocab, dim, cx, text, extra in rows
    )
    return Schema(name="synthetic", features=features, has_label_level=True, has_stage=True)


# ----------------------------------------------------------------------------------- the hidden world


@dataclass(frozen=True)
class World:
    """The hidden ground truth. Index 0 of every per-user and per-item array is the padding id (unused).

    Shapes: U users, I items, C categories, S segments, K interests, d latent dim, H ``log_len``.
    """

    config: SyntheticConfig
    segment: np.ndarray  # [U+1]
    age: np.ndarray  # [U+1] 1.._N_AGES
    gender: np.ndarray  # [U+1] 1..2
    home_device: np.ndarray  # [U+1] 1.._N_DEVICES
    activity: np.ndarray  # [U+1] standard normal: log request rate and click propensity
    interest_cat: np.ndarray  # [U+1, K] distinct categories
    interest_weight: np.ndarray  # [U+1, K]
    interest_vec: np.ndarray  # [U+1, K, d]
    user_ctr: np.ndarray  # [U+1] observed feature (warm-up statistic)
    log_items: np.ndarray  # [U+1, H] 0-padded at the end
    log_ts: np.ndarray  # [U+1, H] sorted, int64 max on padding
    item_category: np.ndarray  # [I+1]
    item_brand: np.ndarray  # [I+1]
    item_price: np.ndarray  # [I+1] 1.._N_PRICES
    item_vec: np.ndarray  # [I+1, d]
    popularity: np.ndarray  # [I+1] hidden: standardised log popularity
    item_ctr: np.ndarray  # [I+1] observed feature (warm-up statistic)
    item_popularity: np.ndarray  # [I+1] observed feature (warm-up statistic)
    hour_effect: np.ndarray  # [24]
    device_effect: np.ndarray  # [_N_DEVICES + 1]
    context_table: np.ndarray  # [S, C+1, 4] segment x category x daypart
    price_sensitivity: np.ndarray  # [S]
    match_offset: float  # m0: mean of max_k <a_uk, b_i> over random pairs
    exposure_cdf: np.ndarray  # [I] cumulative exposure probability of items 1..I
    category_items: np.ndarray  # [I] item ids sorted by category
    category_cdf: np.ndarray  # [I] cumulative exposure probability inside each category (sorted order)
    category_bounds: np.ndarray  # [C+2] category c occupies category_items[bounds[c]:bounds[c+1]]
    user_cdf: np.ndarray  # [U] cumulative request probability of users 1..U
    arrival_grid: np.ndarray  # [M] minutes of the logged period
    arrival_cdf: np.ndarray  # [M] cumulative arrival intensity (daily cycle)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _normalised_cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights, dtype=np.float64)
    return cdf / cdf[-1]


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Indices drawn by inverse CDF (``u`` uniform in [0, 1))."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _interest_match(world: World, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``max_k <a_uk, b_i> - m0`` for paired ``users`` and ``items`` ``[n]``."""
    dots = np.einsum("nkd,nd->nk", world.interest_vec[users], world.item_vec[items])
    return dots.max(axis=1) - world.match_offset


def true_logits(world: World, users: np.ndarray, items: np.ndarray, hour: np.ndarray, device: np.ndarray) -> np.ndarray:
    """The hidden click logit ``z`` (module docstring) for paired arrays ``[n]``; ``hour`` in 0..23."""
    c = world.config
    seg, cat = world.segment[users], world.item_category[items]
    return (
        c.base_logit
        + 0.4 * world.popularity[items]
        + 0.3 * world.activity[users]
        + world.hour_effect[hour]
        + world.device_effect[device]
        + c.interaction_scale * _interest_match(world, users, items)
        + world.context_table[seg, cat, hour // 6]
        - world.price_sensitivity[seg] * (world.item_price[items] - _PRICE_MID)
    )


def make_world(config: SyntheticConfig = SyntheticConfig(), seed: int = 0) -> World:
    """Draw the hidden world for ``seed`` (cost grows with users x items, never with rows)."""
    c = config
    rng = _rng(seed, 0)
    U, n_items, C, S, K, d = c.n_users, c.n_items, c.n_categories, c.n_segments, c.n_interests, c.latent_dim

    # items: categories of uneven size (each has at least one item), brands nested in categories,
    # Zipf-like popularity over a random rank
    centres = rng.normal(0, 1 / math.sqrt(d), (C + 1, d))
    drawn = _draw(_normalised_cdf(rng.dirichlet(np.full(C, 2.0))), rng.random(n_items - C)) + 1
    item_category = np.concatenate(([0], rng.permutation(np.concatenate((np.arange(1, C + 1), drawn)))))
    brands_per_cat = [np.arange(cat, c.n_brands + 1, C) for cat in range(1, C + 1)]  # brand b is in cat (b-1)%C+1
    item_brand = np.zeros(n_items + 1, dtype=np.int64)
    for cat in range(1, C + 1):
        members = np.flatnonzero(item_category == cat)
        item_brand[members] = rng.choice(brands_per_cat[cat - 1], len(members))
    brand_vec = rng.normal(0, 1 / math.sqrt(d), (c.n_brands + 1, d))
    item_vec = centres[item_category] + 0.6 * brand_vec[item_brand] + rng.normal(0, 1 / math.sqrt(d), (n_items + 1, d))
    brand_tier = rng.integers(1, _N_PRICES + 1, c.n_brands + 1)
    item_price = np.clip(brand_tier[item_brand] + np.rint(rng.normal(0, 1.2, n_items + 1)), 1, _N_PRICES)
    item_price = item_price.astype(np.int64)
    log_pop = -1.0 * np.log(rng.permutation(n_items) + 1.0)
    popularity = np.concatenate(([0.0], (log_pop - log_pop.mean()) / log_pop.std()))
    exposure = np.exp(0.9 * log_pop)
    item_category[0] = item_brand[0] = item_price[0] = 0

    # users: hidden segment -> observed age/gender, category tastes, price sensitivity
    segment = np.concatenate(([0], rng.integers(0, S, U)))
    age_mode = rng.integers(1, _N_AGES + 1, S)
    age_logits = -np.abs(np.arange(1, _N_AGES + 1)[None, :] - age_mode[:, None]) * 1.2
    age_u = rng.gumbel(size=(U + 1, _N_AGES)) + age_logits[segment]
    age = age_u.argmax(1) + 1
    gender = np.where(rng.random(U + 1) < rng.uniform(0.2, 0.8, S)[segment], 1, 2)
    home_device = rng.integers(1, _N_DEVICES + 1, U + 1)
    activity = rng.normal(0, 1, U + 1)
    taste = np.log(rng.dirichlet(np.full(C, 0.5), S) + 1e-12)
    interest_cat = np.argsort(-(taste[segment] + rng.gumbel(size=(U + 1, C))), axis=1)[:, :K] + 1
    interest_weight = rng.lognormal(0, 0.25, (U + 1, K)) * 0.9 ** np.arange(K)
    interest_vec = interest_weight[..., None] * (centres[interest_cat] + rng.normal(0, 1 / math.sqrt(d), (U + 1, K, d)))
    for a in (segment, age, gender, home_device, activity):
        a[0] = 0
    interest_cat[0], interest_weight[0], interest_vec[0] = 0, 0.0, 0.0

    hour_effect = 0.25 * np.cos(2 * np.pi * (np.arange(24) - 20) / 24)
    device_effect = np.concatenate(([0.0], rng.normal(0, 0.15, _N_DEVICES)))
    context_table = rng.normal(0, 0.35, (S, C + 1, 4))
    price_sensitivity = rng.uniform(0.0, 0.15, S)

    # samplers
    order = np.argsort(item_category[1:], kind="stable") + 1
    bounds = np.searchsorted(item_category[order], np.arange(C + 2))
    cat_weights = exposure[order - 1]
    cat_cdf = np.empty(n_items)
    for cat in range(1, C + 1):
        lo, hi = bounds[cat], bounds[cat + 1]
        if hi > lo:
            cat_cdf[lo:hi] = _normalised_cdf(cat_weights[lo:hi])
    minutes = np.arange(c.days * 24 * 60 + 1)
    intensity = 1.0 + 0.6 * np.cos(2 * np.pi * ((minutes / 60.0) % 24 - 20) / 24)  # evening peak
    arrival_cdf = np.concatenate(([0.0], np.cumsum(intensity[:-1])))
    arrival_cdf /= arrival_cdf[-1]

    partial = World(
        config=c,
        segment=segment,
        age=age,
        gender=gender,
        home_device=home_device,
        activity=activity,
        interest_cat=interest_cat,
        interest_weight=interest_weight,
        interest_vec=interest_vec,
        user_ctr=np.zeros(U + 1),
        log_items=np.zeros((U + 1, c.log_len), dtype=np.int64),
        log_ts=np.zeros((U + 1, c.log_len), dtype=np.int64),
        item_category=item_category,
        item_brand=item_brand,
        item_price=item_price,
        item_vec=item_vec,
        popularity=popularity,
        item_ctr=np.zeros(n_items + 1),
        item_popularity=np.zeros(n_items + 1),
        hour_effect=hour_effect,
        device_effect=device_effect,
        context_table=context_table,
        price_sensitivity=price_sensitivity,
        match_offset=0.0,
        exposure_cdf=_normalised_cdf(exposure),
        category_items=order,
        category_cdf=cat_cdf,
        category_bounds=bounds,
        user_cdf=_normalised_cdf(np.exp(activity[1:])),
        arrival_grid=minutes,
        arrival_cdf=arrival_cdf,
    )
    pu, pi = rng.integers(1, U + 1, 20_000), rng.integers(1, n_items + 1, 20_000)
    offset = float(_interest_match(partial, pu, pi).mean())
    world = replace(partial, match_offset=offset)
    log_items, log_ts = _behaviour_logs(world, rng)
    user_ctr, item_ctr, item_popularity = _warm_up_statistics(world, rng)
    return replace(
        world, log_items=log_items, log_ts=log_ts, user_ctr=user_ctr, item_ctr=item_ctr, item_popularity=item_popularity
    )


def _behaviour_logs(world: World, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per user, up to ``log_len`` events ``[U+1, H]``: items ~ softmax(4 m(u, i) + 0.5 pop_i), sorted times."""
    c = world.config
    U, n_items, H = c.n_users, c.n_items, c.log_len
    lengths = np.minimum(H, 5 + rng.poisson(0.4 * H * np.exp(0.5 * world.activity)))
    lengths[0] = 0
    start = _T0 - _LOG_LEAD_DAYS * 86_400
    span = (_LOG_LEAD_DAYS + c.days) * 86_400
    log_items = np.zeros((U + 1, H), dtype=np.int64)
    items = np.arange(1, n_items + 1)
    for lo in range(1, U + 1, 256):
        users = np.arange(lo, min(lo + 256, U + 1))
        vec = world.interest_vec[users]  # [u, K, d]
        match = (vec.reshape(-1, vec.shape[-1]) @ world.item_vec[items].T).reshape(len(users), -1, n_items).max(1)
        logit = _HIST_TEMPERATURE * match + 0.5 * world.popularity[items]
        p = np.exp(logit - logit.max(1, keepdims=True))
        cdf = np.cumsum(p, 1)
        cdf = cdf / cdf[:, -1:] + np.arange(len(users))[:, None]  # row r lives in [r, r+1): one flat search
        u = rng.random((len(users), H)) + np.arange(len(users))[:, None]
        idx = np.minimum(np.searchsorted(cdf.ravel(), u.ravel(), side="right").reshape(len(users), H), cdf.size - 1)
        log_items[users] = items[idx % n_items]
    # the first `length` slots are the events (items are i.i.d., so sorting times alone keeps them exchangeable)
    valid = np.arange(H)[None, :] < lengths[:, None]
    log_ts = np.sort(np.where(valid, start + rng.integers(0, span, (U + 1, H)), np.iinfo(np.int64).max), axis=1)
    return np.where(valid, log_items, 0), log_ts


def _warm_up_statistics(world: World, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CTR-like statistics from a simulated warm-up period before the log (never from the labels).

    Item ``i`` gets ``n_i ~ Poisson(50 n_items q_i)`` impressions (``q`` the exposure distribution) shown to
    a random panel of users; user ``u`` gets ``n_u ~ Poisson(30 exp(0.5 act_u))`` impressions of
    exposure-distributed items. Clicks are Binomial with the true click probability; rates are
    smoothed towards the global rate with 10 pseudo-impressions, so rare users and items carry
    the noise real statistics have.
    """
    c = world.config
    U, n_items = c.n_users, c.n_items
    panel = 128
    items = np.repeat(np.arange(1, n_items + 1), panel)
    users = rng.integers(1, U + 1, n_items * panel)
    hours = rng.integers(0, 24, n_items * panel)
    p_item = _sigmoid(true_logits(world, users, items, hours, world.home_device[users])).reshape(n_items, panel).mean(1)
    q = np.diff(np.concatenate(([0.0], world.exposure_cdf)))
    n_item = rng.poisson(50 * n_items * q)
    clicks_item = rng.binomial(n_item, p_item)
    users = np.repeat(np.arange(1, U + 1), 32)
    items = _draw(world.exposure_cdf, rng.random(U * 32)) + 1
    hours = rng.integers(0, 24, U * 32)
    p_user = _sigmoid(true_logits(world, users, items, hours, world.home_device[users])).reshape(U, 32).mean(1)
    n_user = rng.poisson(30 * np.exp(0.5 * world.activity[1:]))
    clicks_user = rng.binomial(n_user, p_user)
    prior = (clicks_item.sum() + clicks_user.sum()) / max(n_item.sum() + n_user.sum(), 1)
    item_ctr = np.concatenate(([0.0], (clicks_item + 10 * prior) / (n_item + 10)))
    user_ctr = np.concatenate(([0.0], (clicks_user + 10 * prior) / (n_user + 10)))
    log_impressions = np.log1p(n_item)
    return user_ctr, item_ctr, np.concatenate(([0.0], log_impressions / max(log_impressions.max(), 1.0)))


# ----------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class _Plan:
    """How many requests ``rows`` need and how they split; sizes are drawn per block from the seed."""

    n_requests: int
    last_size: int  # the last request is cut so that the total is exactly ``rows``
    bounds: tuple[int, int]  # first valid request, first test request


def _block_sizes(config: SyntheticConfig, seed: int, block: int) -> np.ndarray:
    rng = _rng(seed, 1, block)
    return rng.integers(config.min_request_size, config.max_request_size + 1, BLOCK_REQUESTS)


def _plan(config: SyntheticConfig, seed: int, rows: int) -> _Plan:
    total, block = 0, 0
    while True:
        sizes = _block_sizes(config, seed, block)
        cum = total + np.cumsum(sizes)
        if cum[-1] >= rows:
            j = int(np.searchsorted(cum, rows))  # request j completes the total
            n = block * BLOCK_REQUESTS + j + 1
            last = int(rows - (cum[j - 1] if j > 0 else total))
            break
        total, block = int(cum[-1]), block + 1
    n_test = int(round(n * config.test_share))
    n_valid = int(round(n * config.valid_share))
    if min(n_test, n_valid, n - n_test - n_valid) < 1:
        raise ValueError(f"rows={rows} gives {n} requests, too few for train/valid/test splits")
    return _Plan(n, last, (n - n_test - n_valid, n - n_test))


def _distinct_items(world: World, rng: np.random.Generator, request: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Redraw repeated items inside a request from the exposure distribution (a few rounds; rare leftovers stay)."""
    for _ in range(5):
        order = np.lexsort((items, request))
        dup = np.zeros(len(items), dtype=bool)
        dup[order[1:]] = (request[order[1:]] == request[order[:-1]]) & (items[order[1:]] == items[order[:-1]])
        if not dup.any():
            break
        items[dup] = _draw(world.exposure_cdf, rng.random(int(dup.sum()))) + 1
    return items


def _sequences(offsets: np.ndarray, values: np.ndarray, take: np.ndarray) -> pa.Array:
    """Per-request lists (``offsets`` ``[R+1]``, ``values``) repeated for rows ``take`` ``[n]``."""
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
    return lists.take(pa.array(take, pa.int64()))


def _block(world: World, seed: int, plan: _Plan, block: int) -> tuple[pa.Table, np.ndarray]:
    """Rows of one block of requests as an Arrow table (ordered by request), plus their true logits ``[n]``."""
    c = world.config
    rng = _rng(seed, 2, block)
    first = block * BLOCK_REQUESTS
    n_req = min(BLOCK_REQUESTS, plan.n_requests - first)
    sizes = _block_sizes(c, seed, block)[:n_req].copy()
    if first + n_req == plan.n_requests:
        sizes[-1] = plan.last_size
    request_ids = np.arange(first, first + n_req)

    # one request: a user, a time (daily cycle), a device
    users = _draw(world.user_cdf, rng.random(n_req)) + 1
    minute = np.interp((request_ids + rng.random(n_req)) / plan.n_requests, world.arrival_cdf, world.arrival_grid)
    ts = _T0 + np.floor(minute * 60).astype(np.int64)
    hour = ((ts - _T0) // 3600) % 24
    device = np.where(rng.random(n_req) < 0.8, world.home_device[users], rng.integers(1, _N_DEVICES + 1, n_req))
    hist = _History.before(world, users, ts)

    req = np.repeat(np.arange(n_req), sizes)  # row -> request of this block
    u, h, dv = users[req], hour[req], device[req]
    items = _impressions(world, rng, req, u)
    z = true_logits(world, u, items, h, dv)
    level = _label_levels(world, rng, u, items, z)
    cat = world.item_category[items]
    columns: dict[str, Any] = {
        "request_id": request_ids[req],
        "label": (level >= 1).astype(np.float32),
        "label_level": level,
        "stage": np.zeros(len(req), dtype=np.int8),
        "ts": ts[req],
        "user_id": u,
        "age": world.age[u],
        "gender": world.gender[u],
        "user_ctr": world.user_ctr[u].astype(np.float32),
        "hist_item_id": _sequences(hist.offsets, hist.items, req),
        "hist_category_id": _sequences(hist.offsets, world.item_category[hist.items], req),
        "hour": h + 1,
        "device": dv,
        **_item_columns(world, items),
        "user_cat_affinity": (hist.visible_counts[req, cat] / np.maximum(hist.lengths[req], 1)).astype(np.float32),
        "user_cat_clicks": np.searchsorted(_COUNT_EDGES, hist.log_counts[req, cat], side="right"),
    }
    schema = arrow_schema(synthetic_schema(c), ("request_id", "label", "label_level", "stage", "ts"))
    return pa.table({name: columns[name] for name in schema.names}).cast(schema), z


@dataclass(frozen=True)
class _History:
    """What R requests know of their users' logs: events time-stamped before each request.

    ``items`` holds the visible histories back to back (the last ``hist_len`` earlier events,
    most recent last), request r at ``items[offsets[r]:offsets[r + 1]]``; ``visible_counts`` and
    ``log_counts`` ``[R, C+1]`` count the visible history and the whole earlier log per category.
    """

    offsets: np.ndarray
    items: np.ndarray
    lengths: np.ndarray
    visible_counts: np.ndarray
    log_counts: np.ndarray

    @classmethod
    def before(cls, world: World, users: np.ndarray, ts: np.ndarray) -> _History:
        c = world.config
        n_req, n_cat = len(users), c.n_categories + 1
        n_prior = (world.log_ts[users] < ts[:, None]).sum(1)
        lengths = np.minimum(n_prior, c.hist_len)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        owner = np.repeat(np.arange(n_req), lengths)
        slot = np.repeat(n_prior - lengths, lengths) + np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        items = world.log_items[users[owner], slot]
        earlier = np.arange(c.log_len)[None, :] < n_prior[:, None]
        log_owner = np.broadcast_to(np.arange(n_req)[:, None], earlier.shape)[earlier]
        log_cats = world.item_category[world.log_items[users]][earlier]
        return cls(
            offsets=offsets,
            items=items,
            lengths=lengths,
            visible_counts=_count_by(owner, world.item_category[items], n_req, n_cat),
            log_counts=_count_by(log_owner, log_cats, n_req, n_cat),
        )


def _count_by(rows: np.ndarray, values: np.ndarray, n_rows: int, n_values: int) -> np.ndarray:
    """``out[r, v]`` = how often ``(rows, values)`` holds ``(r, v)``; shape ``[n_rows, n_values]``."""
    return np.bincount(rows * n_values + values, minlength=n_rows * n_values).reshape(n_rows, n_values)


def _impressions(world: World, rng: np.random.Generator, req: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Items the previous system showed ``[n]``: a popular item of one of the user's interests
    (probability ``interest_exposure``, interest k chosen by its strength) or a popular item."""
    n = len(req)
    k = _draw_rows(world.interest_weight[users], rng.random(n))
    targeted = world.category_items[_draw_in_category(world, world.interest_cat[users, k], rng.random(n))]
    popular = _draw(world.exposure_cdf, rng.random(n)) + 1
    items = np.where(rng.random(n) < world.config.interest_exposure, targeted, popular)
    return _distinct_items(world, rng, req, items)


def _label_levels(
    world: World, rng: np.random.Generator, users: np.ndarray, items: np.ndarray, z: np.ndarray
) -> np.ndarray:
    """Graded labels ``[n]`` int8: 0 exposure, 1 click, 2 cart, 3 purchase (module docstring)."""
    n = len(z)
    m = _interest_match(world, users, items)
    price = world.item_price[items] - _PRICE_MID
    click = rng.random(n) < _sigmoid(z)
    cart = click & (rng.random(n) < _sigmoid(-1.5 + 0.8 * m - 0.15 * price))
    purchase = cart & (rng.random(n) < _sigmoid(-0.8 + 0.5 * m - 0.2 * price))
    return (click.astype(np.int8) + cart + purchase).astype(np.int8)


def _draw_rows(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row of ``weights`` ``[n, K]`` one index drawn proportionally to the row (``u`` ``[n]`` uniform)."""
    cdf = np.cumsum(weights, 1)
    return np.minimum((cdf < (u * cdf[:, -1])[:, None]).sum(1), weights.shape[1] - 1)


def _draw_in_category(world: World, cat: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Positions in ``category_items`` drawn by exposure inside each row's category ``cat`` ``[n]``."""
    pos = np.empty(len(cat), dtype=np.int64)
    for c in np.unique(cat):  # at most n_categories rounds
        rows = np.flatnonzero(cat == c)
        lo, hi = world.category_bounds[c], world.category_bounds[c + 1]
        pos[rows] = lo + _draw(world.category_cdf[lo:hi], u[rows])
    return pos


def _item_columns(world: World, items: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "item_id": items,
        "category_id": world.item_category[items],
        "brand_id": world.item_brand[items],
        "price_level": world.item_price[items],
        "item_ctr": world.item_ctr[items].astype(np.float32),
        "item_popularity": world.item_popularity[items].astype(np.float32),
    }


# ----------------------------------------------------------------------------------- writing


class _SplitStats:
    """Label counts and a histogram of true logits by label, streamed (ground-truth AUC in O(1) memory)."""

    def __init__(self) -> None:
        self.rows = self.requests = 0
        self.levels = np.zeros(4, dtype=np.int64)
        self.hist = np.zeros((2, len(_AUC_BINS) + 1), dtype=np.int64)  # [negative|positive, bin]
        self.logloss_sum = 0.0

    def add(self, table: pa.Table, z: np.ndarray) -> None:
        level = table.column("label_level").to_numpy()
        y = (level >= 1).astype(np.int64)
        self.rows += len(z)
        self.requests += len(np.unique(table.column("request_id").to_numpy()))
        self.levels += np.bincount(level, minlength=4)
        np.add.at(self.hist, (y, np.digitize(z, _AUC_BINS)), 1)
        self.logloss_sum += float(np.sum(np.logaddexp(0.0, z) - y * z))

    def auc(self) -> float | None:
        neg, pos = self.hist
        if neg.sum() == 0 or pos.sum() == 0:
            return None
        below = np.cumsum(neg) - neg  # negatives in lower bins; ties inside a bin count one half
        return float(np.sum(pos * (below + 0.5 * neg)) / (pos.sum() * neg.sum()))

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "requests": self.requests,
            "label_rate": float(self.levels[1:].sum() / max(self.rows, 1)),
            "label_level_rate": (self.levels / max(self.rows, 1)).tolist(),
            "true_auc": self.auc(),
            "true_logloss": self.logloss_sum / max(self.rows, 1),
        }


def _prepare(out: Path) -> None:
    """Refuse to write into a non-empty directory unless it holds an earlier synthetic dataset."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and read_meta(out).get("generator") != GENERATOR:
        raise FileExistsError(f"{out} is not empty and holds no synthetic dataset; choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "schema.json").unlink(missing_ok=True)  # a crash mid-way leaves no dataset that looks complete
    for split in SPLITS:
        if (out / split).is_dir():
            shutil.rmtree(out / split)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]synthetic"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not enabled
    )


def _blocks(world: World, seed: int, plan: _Plan) -> Iterator[tuple[pa.Table, np.ndarray]]:
    for block in range(math.ceil(plan.n_requests / BLOCK_REQUESTS)):
        yield _block(world, seed, plan, block)


def generate(
    out: str | Path,
    rows: int = 200_000,
    seed: int = 0,
    *,
    progress: bool = True,
    rows_per_file: int = 500_000,
    **options: Any,
) -> Path:
    """Write a synthetic dataset of exactly ``rows`` impressions to ``out`` and return ``out``.

    ``options`` are :class:`SyntheticConfig` fields (``n_users``, ``n_items``, ...). ``out`` must be
    empty, new, or an earlier synthetic dataset (which is replaced). ``meta.json`` is written first
    (marked incomplete) and ``schema.json`` last, so an interrupted run never looks like a dataset.
    """
    config = SyntheticConfig.from_options(options)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive integer, got {rows!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    plan = _plan(config, seed, rows)
    _prepare(out)
    meta: dict[str, Any] = {"generator": GENERATOR, "version": VERSION, "seed": seed, "options": asdict(config)}
    atomic_write_text(out / "meta.json", json.dumps({**meta, "complete": False}, indent=2))

    world = make_world(config, seed)
    schema = synthetic_schema(config)
    writers = {s: SplitWriter(out, s, rows_per_file=rows_per_file) for s in SPLITS}
    stats = {s: _SplitStats() for s in SPLITS}
    with _progress(progress) as bar:
        task = bar.add_task("rows", total=rows)
        for table, z in _blocks(world, seed, plan):
            # rows come ordered by request, so each split is one contiguous slice of the block
            split_of_row = np.searchsorted(plan.bounds, table.column("request_id").to_numpy(), side="right")
            cuts = np.searchsorted(split_of_row, np.arange(len(SPLITS) + 1))
            for i, split in enumerate(SPLITS):
                lo, hi = int(cuts[i]), int(cuts[i + 1])
                if hi > lo:
                    writers[split].write(table.slice(lo, hi - lo))
                    stats[split].add(table.slice(lo, hi - lo), z[lo:hi])
            bar.advance(task, table.num_rows)
    for w in writers.values():
        w.close()

    item_fields = [f.name for f in schema.tower("item")]
    item_schema = pa.schema([arrow_schema(schema, ()).field(name) for name in item_fields])
    item_cols = _item_columns(world, np.arange(1, config.n_items + 1))
    items = pa.table({name: item_cols[name] for name in item_fields}).cast(item_schema)
    atomic_write(out / "items.parquet", lambda tmp: pq.write_table(items, tmp))

    summaries = {s: stats[s].summary() for s in SPLITS}
    meta.update(
        complete=True,
        rows={s: summaries[s]["rows"] for s in SPLITS},
        requests={s: summaries[s]["requests"] for s in SPLITS},
        label_rate={s: summaries[s]["label_rate"] for s in SPLITS},
        label_level_rate={s: summaries[s]["label_level_rate"] for s in SPLITS},
        label_levels=["exposure", "click", "cart", "purchase"],
        ground_truth={
            "auc": {s: summaries[s]["true_auc"] for s in SPLITS},
            "logloss": {s: summaries[s]["true_logloss"] for s in SPLITS},
            "note": "AUC and logloss of the hidden true click logits against the sampled labels: an upper "
            "reference no model can beat in expectation (AUC binned at 1e-3 logit resolution)",
        },
        time_range={"start": _T0, "end": _T0 + config.days * 86_400},
        block_requests=BLOCK_REQUESTS,
    )
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    schema.save(out / "schema.json")
    return out
