"""Cross fields of a MovieLens ``temporal`` dataset for arbitrary (request row, movie) pairs (issue 22).

The cascade simulator (:mod:`prerank.data.cascade`) gives a request unlogged candidates, and each candidate
row copies the user and context side (and ``ts``) of one logged row of its request, its *anchor*. The cross
fields (``tower="cross"``: the default set's 4 and the wide set's 12 more, :mod:`.movielens_wide`) are
functions of the (user, movie) pair at the row's time, which the recipe computes for logged rows only.
:class:`MovieLensCross` computes them for a pair (anchor row, any movie) **from the same sources the anchor
could read**: the anchor's user, timestamp, split and out-of-fold fold, with the candidate movie in place of
the logged one:

* *out-of-fold* statistics: a training anchor's fold is left out (groups' sums, counts and prior,
  :func:`.common.target_mean_at`), an eval anchor reads the whole training split;
* *past-only* statistics and ``hist_item_id``: events strictly before the anchor's time from the splits before
  the anchor's (train and valid anchors read training events, test anchors training and validation events);
* *label-free* statistics: the training rows; ``hist_cooc`` leaves the anchor's own user out;
* log scales fitted on the logged training rows (the recipe's references).

So a candidate sees nothing a logged row at that request time could not, and for a logged pair (the anchor
with its own movie) every value equals the recipe's (tested). The movie's attributes (genres, release year,
year bucket, raw id) come from the catalogue, i.e. the training vocabulary. **The unknown id 0** (a movie first
seen after training) has no attributes there: its cross fields are computed as for a movie with no genres, no
known year and no past events (a logged row with id 0 also has ``hist_genre_sim`` and ``hist_cooc`` 0, but its
genre and past-count fields read the real movie), so prefer ``cascade build --unknown-items skip`` with
``--cross compute``.

:meth:`MovieLensCross.from_raw` re-runs the recipe's deterministic steps (rows, split, vocabularies, folds) from
the raw files with the dataset's ``meta.json`` (seed, config); it refuses when they do not reproduce the
dataset's row counts, and the cascade builder also checks the recomputed cross fields of
every impression with a known movie id against the logged ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from prerank.data.recipes.common import (
    Entries,
    RecipeError,
    cooccurrence,
    count_before,
    fold_priors,
    group_count,
    history_cooccurrence,
    list_to_padded,
    log_scale,
    read_prepared_meta,
    smoothed_rate,
    target_mean_at,
)
from prerank.data.recipes.movielens import (
    MovieLensConfig,
    encode,
    histories,
    read_movielens,
    select_rows,
    split_stats,
)

#: Cross fields of the default set (:func:`.movielens.statistics`) and the ones the wide set adds.
DEFAULT_CROSS = ("user_genre_affinity", "user_genre_count", "item_group_rate", "year_gap")
WIDE_CROSS = (
    "item_past_count",
    "item_past_rate",
    "item_gender_rate",
    "item_age_rate",
    "item_occupation_rate",
    "user_year_rate",
    "user_genre_rating",
    "user_genre_past_count",
    "user_genre_past_rate",
    "hist_genre_sim",
    "hist_cooc",
    "item_pop_gap",
)
_COUNTS = ("item_past_count", "user_genre_past_count", "hist_cooc")  # log-scaled by the training rows' largest


@dataclass(frozen=True)
class _Movies:
    """Attributes of the queried movies: train-vocabulary code, raw id (-1 unknown), genre codes ``[n, G]``,
    release year (0 unknown) and year bucket."""

    code: np.ndarray
    raw: np.ndarray
    genres: np.ndarray
    year: np.ndarray
    year_bucket: np.ndarray


class MovieLensCross:
    """Cross fields for (anchor row, movie) pairs; see the module docstring. Build with :meth:`from_raw`."""

    def __init__(self, rows, enc, stats, cfg: MovieLensConfig, *, wide: bool):
        self.rows, self.enc, self.stats, self.cfg = rows, enc, stats, cfg
        self.names = DEFAULT_CROSS + (WIDE_CROSS if wide else ())
        c, v = enc.codes, enc.vocab_sizes
        n_rows = len(rows.user)
        self.fold = np.full(n_rows, -1, dtype=np.int64)
        self.fold[stats.parts[0]] = stats.folds
        tr = stats.parts[0]
        self.prior_f, self.prior = fold_priors(
            np.bincount(stats.folds, weights=rows.label[tr].astype(np.float64), minlength=stats.n_folds),
            np.bincount(stats.folds, minlength=stats.n_folds),
        )
        self.n_genres = v["genres"]
        self.n_year = int(c["year_bucket"].max(initial=0)) + 1
        n_items, n_users = enc.item_vocab.size, v["user_id"]
        i_code, u_code = c["item_id"], c["user_id"]
        self.genre_mask = np.zeros(n_items, dtype=np.int64)
        self.genre_mask[i_code] = np.bitwise_or.reduce(
            np.where(c["genres"] > 0, np.left_shift(1, c["genres"]), 0), axis=1
        )
        self.genre_mask[0] = 0
        self.hist = np.zeros((n_rows, cfg.hist_len), dtype=np.int64)
        for p, h in zip(stats.parts, histories(rows, i_code, cfg.hist_len), strict=True):
            self.hist[p] = list_to_padded(h, cfg.hist_len)
        year = enc.row_year
        known = (rows.split == 0) & (year > 0)
        self.user_year_n = np.bincount(u_code[known], minlength=n_users)
        self.user_year = np.bincount(u_code[known], weights=year[known], minlength=n_users) / np.maximum(
            self.user_year_n, 1
        )
        item_n = np.bincount(i_code[tr], minlength=n_items).astype(np.float64)
        self.item_pop = log_scale(item_n, float(item_n.max(initial=0)))
        user_n = np.maximum(np.bincount(u_code[tr], minlength=n_users), 1)
        self.user_pop = np.bincount(u_code[tr], weights=self.item_pop[i_code[tr]], minlength=n_users) / user_n
        b_ev = (rows.split == 0) & (rows.label == 1) & (i_code > 0)
        self.cooc = cooccurrence(rows.user[b_ev], i_code[b_ev], n_items)
        self.references: dict[str, float] = {}
        if wide:  # the log scales: largest raw value over the logged training rows
            raw = self._raw(tr, self._logged_movies(tr))
            self.references = {k: float(raw[k].max(initial=0)) for k in _COUNTS}
        self._anchor_index()

    # ------------------------------------------------------------------ construction from the raw files

    @classmethod
    def from_raw(cls, raw: str | Path, data_dir: str | Path) -> MovieLensCross:
        """Re-run the recipe's deterministic steps for the dataset at ``data_dir`` (its ``meta.json``) on ``raw``."""
        meta = read_prepared_meta(data_dir)
        name = meta.get("recipe")
        if name not in ("ml-1m", "ml-100k") or meta.get("protocol") != "temporal":
            raise RecipeError(
                f"{data_dir}: cross fields of unlogged pairs are implemented for the MovieLens recipes' temporal "
                f"protocol only (this dataset: recipe {name!r}, protocol {meta.get('protocol')!r})"
            )
        cfg = MovieLensConfig(**meta["config"])
        data = read_movielens(Path(raw), name)
        rng = np.random.default_rng(meta["seed"])
        rows = select_rows(data, "temporal", cfg, rng)
        enc = encode(data, rows)
        stats = split_stats(rows, enc, cfg, rng)
        counts = [len(p) for p in stats.parts]
        want = [meta.get("rows", {}).get(s) for s in ("train", "valid", "test")]
        if counts != want or rows.counts["rows_kept"] != meta["counts"]["rows_kept"]:
            raise RecipeError(
                f"the raw files at {raw} do not reproduce {data_dir}: rows per split {counts}, the dataset has {want}"
            )
        return cls(rows, enc, stats, cfg, wide=meta.get("features") == "wide")

    # ------------------------------------------------------------------ queries

    def _logged_movies(self, r: np.ndarray) -> _Movies:
        c = self.enc.codes
        return _Movies(c["item_id"][r], self.rows.item[r], c["genres"][r], self.enc.row_year[r], c["year_bucket"][r])

    def catalogue_movies(self, code: np.ndarray) -> _Movies:
        """Attributes of train-vocabulary movie ids (0: unknown, no attributes)."""
        enc = self.enc
        code = np.asarray(code, dtype=np.int64)
        if len(code) and (code.min() < 0 or code.max() >= enc.item_vocab.size):
            raise RecipeError(f"movie ids must lie in [0, {enc.item_vocab.size}), got {code.min()}..{code.max()}")
        at, known = np.maximum(code - 1, 0), code > 0

        def pick(values: np.ndarray, missing: int) -> np.ndarray:
            out = values[at] if len(values) else np.zeros((len(code), *values.shape[1:]), dtype=np.int64)
            return np.where(known.reshape(-1, *([1] * (out.ndim - 1))), out, missing)

        return _Movies(
            code, pick(enc.item_vocab.values, -1), pick(enc.catalogue_genres, 0), pick(enc.catalogue_year, 0),
            pick(enc.catalogue_year_bucket, 0),
        )  # fmt: skip

    def logged(self, r: np.ndarray) -> dict[str, np.ndarray]:
        """The cross fields of logged rows ``r`` with their own movie (the recipe's values; for tests)."""
        r = np.asarray(r, dtype=np.int64)
        return self._finish(self._raw(r, self._logged_movies(r)))

    def pairs(self, r: np.ndarray, movie: np.ndarray) -> dict[str, np.ndarray]:
        """The cross fields of anchors ``r`` (recipe row indices) paired with train-vocabulary movie ids ``movie``."""
        r = np.asarray(r, dtype=np.int64)
        return self._finish(self._raw(r, self.catalogue_movies(movie)))

    def _finish(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(raw)
        for k in _COUNTS:
            if k in out:
                out[k] = log_scale(raw[k], self.references[k])
        return {k: np.asarray(out[k], dtype=np.float32) for k in self.names}

    def _raw(self, r: np.ndarray, m: _Movies) -> dict[str, np.ndarray]:
        rows, stats, c, v = self.rows, self.stats, self.enc.codes, self.enc.vocab_sizes
        tr = stats.parts[0]
        u_code = c["user_id"][r]
        qfold = self.fold[r]
        n = len(r)
        query = Entries.padded(u_code, m.genres, self.n_genres)  # user x the movie's genres
        train_ug = Entries.padded(c["user_id"][tr], c["genres"][tr], self.n_genres)

        def oof(train: Entries, q: Entries, label: np.ndarray | None = None) -> np.ndarray:
            y = stats.train_label if label is None else label
            return target_mean_at(train, y, stats.folds, q, qfold, n_folds=stats.n_folds, smoothing=stats.smoothing)

        n_gender = v["gender"]
        group = lambda idx: c["age"][idx] * n_gender + c["gender"][idx]  # noqa: E731
        n_groups = v["age"] * n_gender
        ug_count = group_count(train_ug, [query])[0] / np.maximum(np.bincount(query.row, minlength=n), 1)
        ug_ref = float(np.unique(train_ug.key, return_counts=True)[1].max(initial=0))
        gap = np.where((self.user_year_n[u_code] > 0) & (m.year > 0), (m.year - self.user_year[u_code]) / 10.0, 0.0)
        out: dict[str, np.ndarray] = {
            "user_genre_affinity": oof(train_ug, query),
            "user_genre_count": log_scale(ug_count, ug_ref),
            "item_group_rate": oof(
                Entries.single(c["item_id"][tr] * n_groups + group(tr)), Entries.single(m.code * n_groups + group(r))
            ),
            "year_gap": np.clip(gap, -5, 5).astype(np.float32),
        }
        if len(self.names) == len(DEFAULT_CROSS):
            return out

        r5 = rows.rating[tr].astype(np.float64) / 5.0
        for name in ("gender", "age", "occupation"):
            out[f"item_{name}_rate"] = oof(
                Entries.single(c["item_id"][tr] * v[name] + c[name][tr]), Entries.single(m.code * v[name] + c[name][r])
            )
        out["user_year_rate"] = oof(
            Entries.single(c["user_id"][tr] * self.n_year + c["year_bucket"][tr]),
            Entries.single(u_code * self.n_year + m.year_bucket),
        )
        out["user_genre_rating"] = oof(train_ug, query, r5)
        out |= self._past(r, m)
        hist = self.hist[r]
        sim = (self.genre_mask[hist] & self.genre_mask[m.code][:, None]) != 0
        out["hist_genre_sim"] = (sim.sum(1) / np.maximum((hist > 0).sum(1), 1)).astype(np.float32)
        out["hist_cooc"] = history_cooccurrence(*self.cooc, rows.user[r], hist, m.code)
        out["item_pop_gap"] = (self.item_pop[m.code] - self.user_pop[u_code]).astype(np.float32)
        return out

    def _past(self, r: np.ndarray, m: _Movies) -> dict[str, np.ndarray]:
        """Past-only counts and rates of the movie and of the user in its genres, per anchor split."""
        rows, cfg, n_genres = self.rows, self.cfg, self.n_genres
        genres = self.enc.codes["genres"]
        ug_key = rows.user[:, None] * n_genres + genres
        out = {k: np.zeros(len(r)) for k in ("item_past_count", "item_past_rate", "user_genre_past_count")}
        out["user_genre_past_rate"] = np.zeros(len(r))
        split = rows.split[r]
        for s in np.unique(split):
            q = np.nonzero(split == s)[0]
            allowed = rows.split <= max(int(s) - 1, 0)
            pos = allowed & (rows.label == 1)
            prior = self.prior_f[self.fold[r[q]]] if s == 0 else self.prior
            ts = rows.ts[r[q]]
            n = count_before(m.raw[q], ts, rows.item[allowed], rows.ts[allowed]).astype(np.float64)
            k = count_before(m.raw[q], ts, rows.item[pos], rows.ts[pos]).astype(np.float64)
            out["item_past_count"][q] = n
            out["item_past_rate"][q] = smoothed_rate(k, n, prior, cfg.smoothing)
            ev_rows, ev_cols = np.nonzero(genres * allowed[:, None])
            keys, t, lab = ug_key[ev_rows, ev_cols], rows.ts[ev_rows], rows.label[ev_rows] == 1
            g_n, g_k = np.zeros(len(q)), np.zeros(len(q))
            mg = m.genres[q]
            for g in range(mg.shape[1]):
                h = np.nonzero(mg[:, g] > 0)[0]
                key = rows.user[r[q[h]]] * n_genres + mg[h, g]
                g_n[h] += count_before(key, ts[h], keys, t)
                g_k[h] += count_before(key, ts[h], keys[lab], t[lab])
            out["user_genre_past_count"][q] = g_n / np.maximum((mg > 0).sum(1), 1)
            out["user_genre_past_rate"][q] = smoothed_rate(g_k, g_n, prior, cfg.smoothing)
        return out

    # ------------------------------------------------------------------ the cascade builder's provider

    def _anchor_index(self) -> None:
        rows, c = self.rows, self.enc.codes
        users, self._user_idx = np.unique(rows.user, return_inverse=True)
        self._users = users
        self._t0 = int(rows.ts.min(initial=0))
        self._t_span = int(rows.ts.max(initial=0)) - self._t0 + 1
        self._n_items = self.enc.item_vocab.size
        if 3 * (len(users) + 1) * self._t_span * self._n_items >= 2**62:
            raise RecipeError("anchor keys (split, user, time, movie) overflow int64")
        key = self._key(rows.split.astype(np.int64), self._user_idx.reshape(-1), rows.ts, c["item_id"])
        self._order = np.argsort(key, kind="stable")
        self._sorted = key[self._order]

    def _key(self, split: np.ndarray, user_idx: np.ndarray, ts: np.ndarray, item: np.ndarray) -> np.ndarray:
        u = (split * (len(self._users) + 1) + user_idx) * self._t_span + (np.asarray(ts, dtype=np.int64) - self._t0)
        return u * self._n_items + item

    def anchor_rows(self, split: str, anchors: pa.Table, item_field: str = "item_id") -> np.ndarray:
        """Recipe row of each logged row of ``anchors`` (dataset columns ``request_id`` = user, ``ts``, item id).

        Rows of one user with the same time and movie id in the same split differ in no field the cross fields
        read (only training rows have a fold, and a training movie id is never 0), so the first match is taken.
        """
        s = {"train": 0, "valid": 1, "test": 2}.get(split)
        if s is None:
            raise RecipeError(f"unknown split {split!r}")
        user = np.asarray(anchors.column("request_id").to_numpy(), dtype=np.int64)
        ts = np.asarray(anchors.column("ts").fill_null(-1).to_numpy(), dtype=np.int64)
        item = np.asarray(anchors.column(item_field).to_numpy(), dtype=np.int64)
        at = np.clip(np.searchsorted(self._users, user), 0, len(self._users) - 1)
        ok = (self._users[at] == user) & (ts >= self._t0) & (ts < self._t0 + self._t_span) & (item < self._n_items)
        key = self._key(np.full(len(user), s), at, np.where(ok, ts, self._t0), np.where(ok, item, 0))
        pos = np.clip(np.searchsorted(self._sorted, key), 0, len(self._sorted) - 1)
        ok &= self._sorted[pos] == key
        if not ok.all():
            bad = int(np.nonzero(~ok)[0][0])
            raise RecipeError(
                f"{split} row (user {user[bad]}, ts {ts[bad]}, {item_field} {item[bad]}) is not a row of the recipe "
                "re-run from the raw files: the raw files or the dataset differ from the ones it was prepared from"
            )
        return self._order[pos]

    def __call__(self, split: str, anchors: pa.Table, movies: np.ndarray) -> dict[str, np.ndarray]:
        """Cross fields of unlogged rows: the user side of ``anchors`` (logged rows of ``split``) with ``movies``."""
        return self.pairs(self.anchor_rows(split, anchors), movies)
