"""The ``wide`` MovieLens feature set (FSCD, issue 22): the default columns plus 34 more, 51 fields in all.

Feature selection among the default 17 fields proves little (FSCD selects among 246), so ``prepare ml-1m
--protocol temporal --features wide`` adds fields of every FSCD Table 1 cost type (:func:`.common.fscd_cost`;
I: simple user/context lookups, II: simple item lookups, III: user features that need computation, IV:
item-correlated features that need computation: item statistics and user x item crosses).

``--protocol paper --features wide`` (issue 21: ranker-only fields for the teacher; 42 fields) keeps the rows of
the default ``paper`` set, row for row, and leaves out the 9 fields that need a timestamp on every row (``hour``,
``weekday`` and the 7 past-only counts and rates: :data:`TIMED`). Its sequences ``hist_item_id`` (which the
default ``paper`` set lacks), ``hist_neg_item_id`` and ``hist_genres`` are *out-of-fold* instead of past-only: a
training row reads the user's training rows in the *other* folds (those of the out-of-fold statistics), valid and
test rows all of the user's training rows; the user's rows are put in one random order drawn from the seed
before any label is read (the staged ML-1M log lacks timestamps for some users, and the split is random anyway),
and a row keeps the first 20 positives (negatives) it may see. On a random split a user's other ratings are
the strongest collaborative signal (the reason SVD++ beats MF on ML-1M); ``hist_genre_sim`` and ``hist_cooc``
read these sequences.

Leak-freeness, three kinds of statistic:

* *out-of-fold* (OOF): label or rating statistics of the training split, a training row seeing only the
  other folds (:func:`.common.target_mean` through :class:`.common.SplitStats`, the same folds as the
  default set); eval rows the whole training split;
* *past-only*: events of the same key strictly before the row's timestamp, from the splits before the
  row's (train and valid rows read training events, test rows training and validation events), as the
  default ``hist_item_id``; the prior of a past rate is the training mean without the row's fold
  (:func:`.common.fold_prior`);
* *label-free*: counts and attributes of the training rows, which read no label.

(``paper``: the three sequences are out-of-fold, see above; ``hist_cooc`` stays leave-own-user-out.)

=====================  =======  ====  ==============================================================
name                   tower    type  meaning
=====================  =======  ====  ==============================================================
zip_region             user     I     first character of the zip code
age_gender             user     I     age group x gender (one id; 0 if either is unknown)
occupation_gender      user     I     occupation x gender
hour                   context  I     hour of the row's timestamp (UTC)
weekday                context  I     weekday of the row's timestamp (UTC)
decade                 item     II    release decade (1910s..2000s; 0 unknown)
first_genre            item     II    the movie's first genre (genres sorted by name)
n_genres               item     II    the movie's number of genres
hist_neg_item_id       user     III   last 20 negatively rated movies strictly before the row (past-only;
                                      ``paper``: 20 training negatives of the user, out-of-fold)
hist_genres            user     III   first genre of each ``hist_item_id`` movie (past-only; ``paper``: OOF)
user_past_count        user     III   log-scaled number of the user's ratings before the row (past-only)
user_past_rate         user     III   smoothed positive rate of those ratings (past-only)
user_since_last        user     III   log-scaled seconds since the user's previous rating; 1 if none
user_mean_rating       user     III   mean rating / 5 of the user's training rows (OOF)
user_rating_std        user     III   standard deviation of rating / 5 of the user's training rows (OOF)
user_n_genres          user     III   share of all genres present among the user's training movies
user_mean_year         user     III   mean release year of the user's training movies, (year - 1950) / 50
user_mean_item_pop     user     III   mean log-scaled training count of the user's training movies
item_mean_rating       item     IV    mean rating / 5 of the movie's training rows (OOF)
item_rating_std        item     IV    standard deviation of rating / 5 of the movie's training rows (OOF)
item_female_share      item     IV    share of the movie's training rows by the first gender id (F)
item_mean_age          item     IV    mean age-group id of the movie's training raters, in [0, 1]
item_past_count        cross    IV    log-scaled number of the movie's ratings before the row (past-only)
item_past_rate         cross    IV    smoothed positive rate of those ratings (past-only)
item_gender_rate       cross    IV    smoothed positive rate of the movie among the user's gender (OOF)
item_age_rate          cross    IV    ... among the user's age group (OOF)
item_occupation_rate   cross    IV    ... among the user's occupation (OOF)
user_year_rate         cross    IV    smoothed positive rate of the user in the movie's year bucket (OOF)
user_genre_rating      cross    IV    mean rating / 5 of the user's training rows in the movie's genres (OOF)
user_genre_past_count  cross    IV    log-scaled mean number of the user's ratings per movie genre, before
                                      the row (past-only)
user_genre_past_rate   cross    IV    smoothed positive rate of those ratings (past-only)
hist_genre_sim         cross    IV    share of ``hist_item_id`` movies sharing a genre with the movie
                                      (target-vs-history similarity)
hist_cooc              cross    IV    log-scaled mean co-occurrence of the movie with each ``hist_item_id``
                                      movie among *other* users' training positives
item_pop_gap           cross    IV    the movie's log-scaled training count minus ``user_mean_item_pop``
=====================  =======  ====  ==============================================================

``hist_cooc`` removes the user's own contribution (leave-own-user-out): for a training row, whether the user
liked the target movie is exactly its label, so counting the user would leak it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from prerank.data.recipes.common import (
    Entries,
    SplitStats,
    cooccurrence,
    count_before,
    fold_prior,
    fscd_cost,
    history,
    history_cooccurrence,
    last_before,
    list_to_padded,
    log_scale,
    out_of_fold_history,
    smoothed_rate,
)
from prerank.schema import FeatureSpec, Tower

if TYPE_CHECKING:
    from prerank.data.recipes.movielens import MovieLensConfig, _Encoded, _Rows

Splits = list[np.ndarray | pa.Array]


def _spec(name: str, tower: Tower, kind: str, description: str, *, complex_: bool, **kw: object) -> FeatureSpec:
    return FeatureSpec(name, tower, kind, cost_type=fscd_cost(tower, complex_=complex_), description=description, **kw)  # type: ignore[arg-type]


def _combo(a: np.ndarray, b: np.ndarray, n_b: int) -> np.ndarray:
    """One id per pair of ids (``a * n_b + b``), 0 when either is unknown (0)."""
    return np.where((a > 0) & (b > 0), a * n_b + b, 0)


def _std(mean: list[np.ndarray], mean_sq: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sqrt(np.maximum(sq - m * m, 0.0)).astype(np.float32) for m, sq in zip(mean, mean_sq, strict=True)]


class _Past:
    """Past-only counts and rates of one split's rows: events strictly before each row, from earlier splits."""

    def __init__(self, rows: _Rows, s: int, prior: np.ndarray | float, smoothing: float):
        self.p = rows.parts[s]
        self.allowed = rows.split <= max(s - 1, 0)
        self.ts, self.label = rows.ts, rows.label
        self.prior, self.smoothing = prior, smoothing

    def counts(self, query_key: np.ndarray, event_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(events, positives)`` of the same key before each of the split's rows (``event_key`` per row)."""
        ev = self.allowed
        pos = ev & (self.label == 1)
        n = count_before(query_key, self.ts[self.p], event_key[ev], self.ts[ev])
        k = count_before(query_key, self.ts[self.p], event_key[pos], self.ts[pos])
        return n.astype(np.float64), k.astype(np.float64)

    def rate(self, n: np.ndarray, k: np.ndarray) -> np.ndarray:
        return smoothed_rate(k, n, self.prior, self.smoothing)


def wide_features(
    rows: _Rows,
    enc: _Encoded,
    stats: SplitStats,
    cfg: MovieLensConfig,
    hist_item: list[pa.Array] | None,
    rng: np.random.Generator,
) -> tuple[dict[str, list[FeatureSpec]], dict[str, Splits], dict[str, np.ndarray]]:
    """The extra fields: specs per tower, values per split (train, valid, test) and catalogue columns.

    ``hist_item`` is the default ``hist_item_id`` per split (``temporal``), or None for the ``paper`` protocol:
    then the past-only fields and ``hour``/``weekday`` are left out and the three sequences are out-of-fold
    (:func:`_out_of_fold_sequences`, which draws their order from ``rng``; ``hist_item_id`` is returned among the
    fields). Categorical fields' per-row codes are added to ``enc.codes`` (and their vocabulary sizes to
    ``enc.vocab_sizes``).
    """
    timed = hist_item is not None
    c, v = enc.codes, enc.vocab_sizes
    parts = rows.parts
    n_items = enc.item_vocab.size
    u_code, i_code, genres = c["user_id"], c["item_id"], c["genres"]
    n_genres = v["genres"]
    first_genre_of = np.zeros(n_items, dtype=np.int64)  # per item code (0: unknown item)
    first_genre_of[i_code] = genres[:, 0]
    genre_mask = np.zeros(n_items, dtype=np.int64)  # bit g set when the item has genre id g
    genre_mask[i_code] = np.bitwise_or.reduce(np.where(genres > 0, np.left_shift(1, genres), 0), axis=1)
    genre_mask[0] = 0
    year = enc.row_year

    # ---- simple lookups (I, II): no statistics at all
    c["age_gender"] = _combo(c["age"], c["gender"], v["gender"])
    c["occupation_gender"] = _combo(c["occupation"], c["gender"], v["gender"])
    if timed:
        c["hour"] = (rows.ts % 86_400) // 3_600 + 1
        c["weekday"] = (rows.ts // 86_400 + 3) % 7 + 1  # 1970-01-01 was a Thursday: Monday = 1
    decade_of = lambda y: np.where(y > 0, np.clip(y // 10 - 190, 1, 11), 0)  # noqa: E731
    c["decade"] = decade_of(year)
    c["first_genre"] = genres[:, 0]
    c["n_genres"] = (genres > 0).sum(1)
    v |= {
        "age_gender": v["age"] * v["gender"],
        "occupation_gender": v["occupation"] * v["gender"],
        "hour": 25,
        "weekday": 8,
        "decade": 12,
        "first_genre": n_genres,
        "n_genres": genres.shape[1] + 1,
    }

    # ---- out-of-fold statistics (labels and ratings of the training split)
    r5 = rows.rating.astype(np.float64) / 5.0
    by_rating = replace(stats, train_label=r5[parts[0]])
    by_rating_sq = replace(stats, train_label=(r5 * r5)[parts[0]])
    user = lambda p: Entries.single(u_code[p])  # noqa: E731
    item = lambda p: Entries.single(i_code[p])  # noqa: E731
    user_genre = lambda p: Entries.padded(u_code[p], genres[p], n_genres)  # noqa: E731

    n_year = int(c["year_bucket"].max(initial=0)) + 1

    def item_by(name: str):
        return lambda p: Entries.single(i_code[p] * v[name] + c[name][p])

    feats: dict[str, Splits] = {
        "user_mean_rating": by_rating.mean(user),
        "item_mean_rating": by_rating.mean(item, catalogue=True),
        "item_gender_rate": stats.mean(item_by("gender")),
        "item_age_rate": stats.mean(item_by("age")),
        "item_occupation_rate": stats.mean(item_by("occupation")),
        "user_year_rate": stats.mean(lambda p: Entries.single(u_code[p] * n_year + c["year_bucket"][p])),
        "user_genre_rating": by_rating.mean(user_genre),
    }
    feats["user_rating_std"] = _std(feats["user_mean_rating"], by_rating_sq.mean(user))
    feats["item_rating_std"] = _std(feats["item_mean_rating"], by_rating_sq.mean(item, catalogue=True))

    # ---- label-free statistics of the training rows (every row, the catalogue included)
    tr = parts[0]
    n_users = v["user_id"]
    item_n = np.bincount(i_code[tr], minlength=n_items).astype(np.float64)
    item_pop = log_scale(item_n, float(item_n.max(initial=0)))
    user_n = np.maximum(np.bincount(u_code[tr], minlength=n_users), 1)
    user_pop = np.bincount(u_code[tr], weights=item_pop[i_code[tr]], minlength=n_users) / user_n
    known_year = tr[year[tr] > 0]
    user_year = np.bincount(u_code[known_year], weights=year[known_year], minlength=n_users)
    user_year = user_year / np.maximum(np.bincount(u_code[known_year], minlength=n_users), 1)
    has_genre = np.zeros((n_users, n_genres), dtype=bool)
    for g in range(genres.shape[1]):
        has_genre[u_code[tr], genres[tr, g]] = True
    has_genre[:, 0] = False
    female = np.bincount(i_code[tr], weights=(c["gender"][tr] == 1), minlength=n_items) / np.maximum(item_n, 1)
    age = np.bincount(i_code[tr], weights=c["age"][tr], minlength=n_items) / np.maximum(item_n, 1)
    age /= max(v["age"] - 1, 1)
    per_user = {
        "user_n_genres": has_genre.sum(1) / max(n_genres - 1, 1),
        "user_mean_year": np.where(user_year > 0, (user_year - 1950) / 50, 0.0),
        "user_mean_item_pop": user_pop,
    }
    for name, values in per_user.items():
        feats[name] = [values[u_code[p]].astype(np.float32) for p in parts]
    for name, values in (("item_female_share", female), ("item_mean_age", age)):
        feats[name] = [values[i_code[p]].astype(np.float32) for p in parts] + [values[1:].astype(np.float32)]
    feats["item_pop_gap"] = [(item_pop[i_code[p]] - user_pop[u_code[p]]).astype(np.float32) for p in parts]

    # ---- behaviour sequences and their similarity to the target (past-only or out-of-fold)
    b_ev = (rows.split == 0) & (rows.label == 1) & (i_code > 0)
    cooc, b, b_users = cooccurrence(rows.user[b_ev], i_code[b_ev], n_items)
    if not timed:
        hist_item = _out_of_fold_sequences(rows, stats, i_code, first_genre_of, cfg.hist_len, rng, feats)
    raw: dict[str, list[np.ndarray]] = {"cooc": []}
    for s, p in enumerate(parts):
        hist = list_to_padded(hist_item[s], cfg.hist_len)
        sim = (genre_mask[hist] & genre_mask[i_code[p]][:, None]) != 0
        feats.setdefault("hist_genre_sim", []).append(
            (sim.sum(1) / np.maximum((hist > 0).sum(1), 1)).astype(np.float32)
        )
        raw["cooc"].append(history_cooccurrence(cooc, b, b_users, rows.user[p], hist, i_code[p]))
    if timed:
        raw |= _past_only(rows, stats, cfg, i_code, genres, first_genre_of, n_genres, feats)
    scaled = (("user_past_count", "user_past_count"), ("item_past_count", "item_past_count"))
    scaled += (("user_genre_past_count", "ug_count"), ("hist_cooc", "cooc"))
    for name, key in scaled:
        if key in raw:  # scales fitted on the training rows
            reference = float(raw[key][0].max(initial=0))
            feats[name] = [log_scale(x, reference) for x in raw[key]]

    specs = _specs(v, cfg.hist_len, timed)
    catalogue = {
        "decade": decade_of(enc.catalogue_year),
        "first_genre": enc.catalogue_genres[:, 0],
        "n_genres": (enc.catalogue_genres > 0).sum(1),
        **{f.name: np.asarray(feats[f.name][3]) for f in specs["item"] if f.kind == "dense"},
    }
    return specs, {k: x[:3] for k, x in feats.items()}, catalogue


def _out_of_fold_sequences(
    rows: _Rows,
    stats: SplitStats,
    i_code: np.ndarray,
    first_genre_of: np.ndarray,
    hist_len: int,
    rng: np.random.Generator,
    feats: dict[str, Splits],
) -> list[pa.Array]:
    """``paper`` protocol: ``hist_item_id``, ``hist_genres`` and ``hist_neg_item_id`` from the training split,
    out-of-fold; adds them to ``feats`` and returns ``hist_item_id`` per split.

    A training row of fold ``k`` reads the user's training rows of the other folds (the folds of the
    out-of-fold statistics, so never its own row), valid and test rows every training row of the user; the rows
    are put in one random order drawn from ``rng`` whatever their labels (the log has no complete timestamps),
    and the first ``hist_len`` positives (negatives) of the user a row may see are kept.
    """
    row_fold = np.full(len(rows.split), -1, dtype=np.int64)
    row_fold[rows.parts[0]] = stats.folds
    events = (rows.split == 0) & (i_code > 0)
    positives = {"hist_item_id": i_code, "hist_genres": first_genre_of[i_code]}
    negatives = {"hist_neg_item_id": i_code}
    rank = rng.random(len(rows.split))  # one order of every row, drawn before any label is read
    for ev, columns in ((events & (rows.label == 1), positives), (events & (rows.label == 0), negatives)):
        for name, value in columns.items():
            feats[name] = [
                out_of_fold_history(
                    rows.user[p], row_fold[p], rows.user[ev], row_fold[ev], value[ev], rank[ev], hist_len
                )
                for p in rows.parts
            ]
    return feats["hist_item_id"]


def _past_only(
    rows: _Rows,
    stats: SplitStats,
    cfg: MovieLensConfig,
    i_code: np.ndarray,
    genres: np.ndarray,
    first_genre_of: np.ndarray,
    n_genres: int,
    feats: dict[str, Splits],
) -> dict[str, list[np.ndarray]]:
    """``temporal`` protocol: the past-only fields; rates and sequences go into ``feats``, unscaled counts are
    returned."""
    parts = rows.parts
    train_prior, prior = fold_prior(rows.label[parts[0]], stats.folds, stats.n_folds)
    user_genre_key = rows.user[:, None] * n_genres + genres  # [n, G]; genre 0 marks padding
    raw: dict[str, list[np.ndarray]] = {k: [] for k in ("user_past_count", "item_past_count", "ug_count")}
    raw["user_since_last"] = []
    for s, p in enumerate(parts):
        past = _Past(rows, s, train_prior if s == 0 else prior, cfg.smoothing)
        n, k = past.counts(rows.user[p], rows.user)
        raw["user_past_count"].append(n)
        feats.setdefault("user_past_rate", []).append(past.rate(n, k))
        n, k = past.counts(rows.item[p], rows.item)
        raw["item_past_count"].append(n)
        feats.setdefault("item_past_rate", []).append(past.rate(n, k))
        last = last_before(rows.user[p], rows.ts[p], rows.user[past.allowed], rows.ts[past.allowed])
        raw["user_since_last"].append(np.where(last >= 0, rows.ts[p] - last, -1).astype(np.float64))
        # user x genre: sum over the movie's genres of the user's earlier ratings in that genre
        ev_rows, ev_cols = np.nonzero(genres * past.allowed[:, None])
        keys, t, lab = user_genre_key[ev_rows, ev_cols], rows.ts[ev_rows], rows.label[ev_rows] == 1
        g_n, g_k = np.zeros(len(p)), np.zeros(len(p))
        for g in range(genres.shape[1]):
            q = np.nonzero(genres[p, g] > 0)[0]
            g_n[q] += count_before(user_genre_key[p[q], g], rows.ts[p[q]], keys, t)
            g_k[q] += count_before(user_genre_key[p[q], g], rows.ts[p[q]], keys[lab], t[lab])
        n_g = np.maximum((genres[p] > 0).sum(1), 1)
        raw["ug_count"].append(g_n / n_g)
        feats.setdefault("user_genre_past_rate", []).append(past.rate(g_n, g_k))
        neg = past.allowed & (rows.label == 0) & (i_code > 0)
        feats.setdefault("hist_neg_item_id", []).append(
            history(rows.user[p], rows.ts[p], rows.user[neg], rows.ts[neg], i_code[neg], cfg.hist_len)
        )
        pos = past.allowed & (rows.label == 1) & (i_code > 0)
        feats.setdefault("hist_genres", []).append(
            history(rows.user[p], rows.ts[p], rows.user[pos], rows.ts[pos], first_genre_of[i_code[pos]], cfg.hist_len)
        )
    # scales fitted on the training rows; a user without an earlier rating gets the largest gap, 1
    gap_ref = float(raw["user_since_last"][0].max(initial=0))
    feats["user_since_last"] = [
        np.where(g >= 0, log_scale(np.maximum(g, 0), gap_ref), 1.0).astype(np.float32) for g in raw["user_since_last"]
    ]
    return raw


#: fields that need a timestamp on every row, left out of the ``paper`` protocol's wide set
TIMED = frozenset(
    ("hour", "weekday", "user_past_count", "user_past_rate", "user_since_last", "item_past_count", "item_past_rate")
    + ("user_genre_past_count", "user_genre_past_rate")
)


def _specs(v: dict[str, int], hist_len: int, timed: bool) -> dict[str, list[FeatureSpec]]:
    def cat(name: str, tower: Tower, description: str) -> FeatureSpec:
        return _spec(name, tower, "categorical", description, complex_=False, vocab_size=max(v[name], 2))

    def dense(name: str, tower: Tower, description: str) -> FeatureSpec:
        return _spec(name, tower, "dense", description, complex_=True)

    def seq(name: str, shares: str, description: str) -> FeatureSpec:
        return _spec(
            name, "user", "sequence", description, complex_=True, max_len=hist_len, shares=shares, n_values=hist_len
        )

    neg = f"last {hist_len} negatively rated movies before the row"
    if not timed:
        neg = f"{hist_len} negatively rated training movies of the user outside the row's fold (random order)"
    specs = {
        "user": [
            cat("zip_region", "user", "first character of the zip code"),
            cat("age_gender", "user", "age group x gender"),
            cat("occupation_gender", "user", "occupation x gender"),
            seq("hist_neg_item_id", "item_id", neg),
            seq("hist_genres", "first_genre", "first genre of each hist_item_id movie"),
            dense("user_past_count", "user", "log-scaled number of the user's ratings before the row"),
            dense("user_past_rate", "user", "smoothed positive rate of the user's ratings before the row"),
            dense("user_since_last", "user", "log-scaled seconds since the user's previous rating (1: none)"),
            dense("user_mean_rating", "user", "mean rating / 5 of the user's training rows (out-of-fold)"),
            dense("user_rating_std", "user", "std of rating / 5 of the user's training rows (out-of-fold)"),
            dense("user_n_genres", "user", "share of genres among the user's training movies"),
            dense("user_mean_year", "user", "(mean release year of the user's training movies - 1950) / 50"),
            dense("user_mean_item_pop", "user", "mean log-scaled training count of the user's training movies"),
        ],
        "context": [
            cat("hour", "context", "hour of the row's timestamp (UTC)"),
            cat("weekday", "context", "weekday of the row's timestamp (UTC), Monday = 1"),
        ],
        "item": [
            cat("decade", "item", "release decade"),
            cat("first_genre", "item", "the movie's first genre"),
            cat("n_genres", "item", "the movie's number of genres"),
            dense("item_mean_rating", "item", "mean rating / 5 of the movie's training rows (out-of-fold)"),
            dense("item_rating_std", "item", "std of rating / 5 of the movie's training rows (out-of-fold)"),
            dense("item_female_share", "item", "share of the movie's training rows by the first gender id (F)"),
            dense("item_mean_age", "item", "mean age-group id of the movie's training raters, in [0, 1]"),
        ],
        "cross": [
            dense("item_past_count", "cross", "log-scaled number of the movie's ratings before the row"),
            dense("item_past_rate", "cross", "smoothed positive rate of the movie's ratings before the row"),
            dense("item_gender_rate", "cross", "smoothed positive rate of the movie among the user's gender (OOF)"),
            dense("item_age_rate", "cross", "smoothed positive rate of the movie among the user's age group (OOF)"),
            dense("item_occupation_rate", "cross", "smoothed positive rate of the movie in the user's occupation"),
            dense("user_year_rate", "cross", "smoothed positive rate of the user in the movie's year bucket (OOF)"),
            dense("user_genre_rating", "cross", "mean rating / 5 of the user's training rows in the movie's genres"),
            dense("user_genre_past_count", "cross", "log-scaled mean count of the user's earlier ratings per genre"),
            dense("user_genre_past_rate", "cross", "smoothed positive rate of the user's earlier ratings in genres"),
            dense("hist_genre_sim", "cross", "share of hist_item_id movies sharing a genre with the movie"),
            dense("hist_cooc", "cross", "log-scaled mean co-occurrence with hist_item_id among other users"),
            dense("item_pop_gap", "cross", "the movie's log-scaled training count minus user_mean_item_pop"),
        ],
    }
    return {tower: [f for f in fs if timed or f.name not in TIMED] for tower, fs in specs.items()}
