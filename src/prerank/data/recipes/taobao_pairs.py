"""Cross fields of a Taobao UserBehavior dataset for arbitrary (request, item) pairs (issue 22).

The Taobao analog of :mod:`.movielens_pairs`, for ``cascade build --cross compute``. A simulated candidate row
copies the user and context side of one logged row of its request, its *anchor*; its cross fields
(``tower="cross"``: the default set's 4, :mod:`.taobao`, and the wide set's 12 more, :mod:`.taobao_wide`) are
functions of the (user, item) pair at the request's day, which the recipe computes for logged rows only.
:class:`TaobaoCross` computes them for (anchor, any catalogue item) **from the sources the anchor could read**:

* *out-of-fold* (``user_cat_rate``, ``user_cat_level``): a training anchor's fold is left out (groups' sums,
  counts and prior, :func:`.common.target_mean_at`); an eval anchor reads the whole training split;
* *past-only* counts, rates and days-since: events of the days strictly before the anchor's day, from the splits
  before the anchor's (train and valid anchors read training events, test anchors training and validation
  events); rates are smoothed towards the training mean without the anchor's fold;
* ``hist_cat_match`` and ``hist_cat_cooc`` read the anchor's own ``hist_category_id`` (its earlier days), and
  ``hist_cat_cooc`` the training positives of other users only;
* log scales fitted on the logged training rows (the recipe's references).

In the Taobao recipe every one of these sources is a function of the request (user, day), not of the row: the
folds are drawn per request, "earlier" means before the request's day, and the histories are the request's. So
an anchor stands for its request, and a candidate sees nothing a logged row of that request could not. For a
logged pair (a request with one of its own items) every value equals the recipe's (tested). The candidate's
category is the catalogue's (``items.parquet``: the category of the item's first training row); a pair that *is*
a logged row of the request keeps that row's own category (the log gives a few items two categories). The cascade
builder copies a candidate's item side from a logged row of the item in the split (``item_side: logged``), so for
such an item the candidate's ``category_id`` column can differ from the category its cross fields were computed
with (on the 814-user sample: 12 of 625,500 simulated training rows, none in valid or test). Item id 0 (first
seen after training) has no catalogue category and is refused: build with ``--unknown-items skip``.

:meth:`TaobaoCross.from_raw` re-runs the recipe's deterministic steps (rows, split, vocabularies, folds) from the
raw file with the dataset's ``meta.json`` (seed, config) and refuses when they do not reproduce the dataset's row
counts; the cascade builder then checks the recomputed cross fields of every impression with a known item id
against the logged ones before it writes anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from prerank.data.recipes.common import (
    Entries,
    RecipeError,
    cooccurrence,
    count_before,
    fold_priors,
    history_cooccurrence,
    last_before,
    list_to_padded,
    log_scale,
    read_prepared_meta,
    smoothed_rate,
    target_mean_at,
)
from prerank.data.recipes.taobao import (
    DAY,
    DAY0,
    TaobaoConfig,
    aggregate,
    day_window,
    encode_rows,
    find_raw,
    label_and_split,
    past_only,
    read_events,
)

#: Cross fields of the default set (:mod:`.taobao`) and the ones the wide set adds (:mod:`.taobao_wide`).
DEFAULT_CROSS = ("user_cat_rate", "user_cat_before", "user_cat_pos_before", "user_item_before")
WIDE_CROSS = (
    "item_past_rows",
    "item_past_pos_rate",
    "item_prev_day_rows",
    "category_past_rows",
    "category_past_pos_rate",
    "user_cat_buy_before",
    "user_item_pos_before",
    "user_cat_share_before",
    "user_cat_days_since",
    "user_cat_level",
    "hist_cat_match",
    "hist_cat_cooc",
)
#: Counts log-scaled by the largest value over the logged training rows.
_COUNTS = (
    "user_cat_before",
    "user_cat_pos_before",
    "user_item_before",
    "item_past_rows",
    "item_prev_day_rows",
    "category_past_rows",
    "user_cat_buy_before",
    "user_item_pos_before",
    "hist_cat_cooc",
)
_SPLITS = {"train": 0, "valid": 1, "test": 2}


class TaobaoCross:
    """Cross fields for (request anchor, item) pairs; see the module docstring. Build with :meth:`from_raw`."""

    def __init__(self, r, label, split, vocabs, codes, stats, cfg: TaobaoConfig, *, wide: bool):
        self.r, self.label, self.split, self.cfg = r, label, split, cfg
        self.vocabs, self.stats = vocabs, stats
        self.names = DEFAULT_CROSS + (WIDE_CROSS if wide else ())
        self.u_code, self.i_code, self.c_code = codes
        n_rows, tr = len(label), stats.parts[0]
        self.fold = np.full(n_rows, -1, dtype=np.int64)
        self.fold[tr] = stats.folds
        self.prior_f, self.prior = fold_priors(
            np.bincount(stats.folds, weights=label[tr].astype(np.float64), minlength=stats.n_folds),
            np.bincount(stats.folds, minlength=stats.n_folds),
        )
        self.n_cats = vocabs["category_id"].size
        self.cat_base = int(r["category"].max(initial=0)) + 1  # the recipe's raw (user, category) and (user, item) keys
        self.item_base = int(r["item"].max(initial=0)) + 1
        self.day_start = DAY0 + r["day"] * DAY
        first_row = np.unique(self.i_code[tr], return_index=True)[1]
        self.catalogue_category = self.c_code[tr][first_row]  # items.parquet's category_id of items 1..
        hist, _ = past_only(r, split, label, self.i_code, self.c_code, cfg.hist_len)
        self.hist_cat = np.zeros((n_rows, cfg.hist_len), dtype=np.int64)
        for p, h in zip(stats.parts, hist["hist_category_id"], strict=True):
            self.hist_cat[p] = list_to_padded(h, cfg.hist_len)
        b_ev = (split == 0) & (label == 1) & (self.c_code > 0)
        self.cooc = cooccurrence(r["user"][b_ev], self.c_code[b_ev], self.n_cats)
        raw = self._raw(tr, self.i_code[tr], self.c_code[tr], r["category"][tr])
        self.references = {k: float(raw[k].max(initial=0)) for k in _COUNTS if k in raw}
        self._index()

    # ------------------------------------------------------------------ construction from the raw file

    @classmethod
    def from_raw(cls, raw: str | Path, data_dir: str | Path) -> TaobaoCross:
        """Re-run the recipe's deterministic steps for the dataset at ``data_dir`` (its ``meta.json``) on ``raw``."""
        meta = read_prepared_meta(data_dir)
        if meta.get("recipe") != "taobao-user-behavior":
            raise RecipeError(f"{data_dir} was not prepared by the taobao-user-behavior recipe")
        cfg = TaobaoConfig(**meta["config"])
        path = find_raw(Path(raw))
        ev, _ = day_window(read_events(path))
        r = aggregate(ev)
        label, split, parts = label_and_split(r, cfg, path)
        counts = [len(p) for p in parts]
        want = [meta.get("rows", {}).get(s) for s in _SPLITS]
        if counts != want or len(label) != meta["counts"]["rows"]:
            raise RecipeError(
                f"the raw file {path} does not reproduce {data_dir}: rows per split {counts}, the dataset has {want}"
            )
        vocabs, codes, stats = encode_rows(r, label, parts, cfg, meta["seed"])
        return cls(r, label, split, vocabs, codes, stats, cfg, wide=meta.get("features") == "wide")

    # ------------------------------------------------------------------ queries

    def catalogue(self, item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Category code and raw category of train-vocabulary item ids (items.parquet's ``category_id``)."""
        item = np.asarray(item, dtype=np.int64)
        size = self.vocabs["item_id"].size
        if len(item) and (item.min() < 1 or item.max() >= size):
            raise RecipeError(
                f"item ids must lie in [1, {size}), got {item.min()}..{item.max()}: the unknown id 0 has no "
                "catalogue category (build the cascade with --unknown-items skip)"
            )
        code = self.catalogue_category[item - 1] if len(item) else np.zeros(0, dtype=np.int64)
        return code, self.vocabs["category_id"].values[np.maximum(code - 1, 0)]

    def logged(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The cross fields of recipe rows ``rows`` with their own item (the recipe's values; for tests)."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._finish(self._raw(rows, self.i_code[rows], self.c_code[rows], self.r["category"][rows]))

    def pairs(self, rows: np.ndarray, item: np.ndarray) -> dict[str, np.ndarray]:
        """The cross fields of anchors ``rows`` (recipe row indices) paired with train-vocabulary item ids ``item``.

        A pair whose item is a logged row of the anchor's request takes that row's category; others the
        catalogue's."""
        rows, item = np.asarray(rows, dtype=np.int64), np.asarray(item, dtype=np.int64)
        c, raw_c = self.catalogue(item)
        own = self._logged_row(rows, item)
        hit = own >= 0
        c = np.where(hit, self.c_code[np.maximum(own, 0)], c)
        raw_c = np.where(hit, self.r["category"][np.maximum(own, 0)], raw_c)
        return self._finish(self._raw(rows, item, c, raw_c))

    def _finish(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: log_scale(v, self.references[k]) if k in _COUNTS else v for k, v in raw.items()}
        return {k: np.asarray(out[k], dtype=np.float32) for k in self.names}

    def _raw(self, a: np.ndarray, item: np.ndarray, c: np.ndarray, raw_c: np.ndarray) -> dict[str, np.ndarray]:
        """Unscaled values for anchors ``a`` with items ``item`` (codes) of category code ``c`` / raw ``raw_c``."""
        stats, r, tr = self.stats, self.r, self.stats.parts[0]
        user = r["user"][a]
        raw_item = self.vocabs["item_id"].values[np.maximum(item - 1, 0)]
        train_uc = Entries.single(self.u_code[tr] * self.n_cats + self.c_code[tr])
        query_uc = Entries.single(self.u_code[a] * self.n_cats + c)

        def oof(label: np.ndarray) -> np.ndarray:
            return target_mean_at(
                train_uc, label, stats.folds, query_uc, self.fold[a], n_folds=stats.n_folds, smoothing=stats.smoothing
            )

        out: dict[str, np.ndarray] = {"user_cat_rate": oof(stats.train_label)}
        keys = {
            "user": (user, r["user"]),
            "item": (raw_item, r["item"]),
            "category": (raw_c, r["category"]),
            "user_cat": (user * self.cat_base + raw_c, r["user"] * self.cat_base + r["category"]),
            "user_item": (user * self.item_base + raw_item, r["user"] * self.item_base + r["item"]),
        }
        past = {k: np.zeros(len(a)) for k in (*DEFAULT_CROSS[1:], *WIDE_CROSS[:9])}
        split = self.split[a]
        for s in np.unique(split):
            q = np.nonzero(split == s)[0]
            allowed = self.split <= max(int(s) - 1, 0)
            pos = allowed & (self.label == 1)
            buy = allowed & (r["level"] == 4)
            prior = self.prior_f[self.fold[a[q]]] if s == 0 else self.prior
            t = self.day_start[a[q]]

            def before(name: str, mask: np.ndarray, shift: int = 0, q=q, t=t) -> np.ndarray:
                query, events = keys[name]
                return count_before(query[q], t - shift, events[mask], r["ts"][mask]).astype(np.float64)

            def rate(name: str, q=q, prior=prior, allowed=allowed, pos=pos) -> np.ndarray:
                return smoothed_rate(before(name, pos), before(name, allowed), prior, self.cfg.smoothing)

            uc_n = before("user_cat", allowed)
            past["user_cat_before"][q] = uc_n
            past["user_cat_pos_before"][q] = before("user_cat", pos)
            past["user_item_before"][q] = before("user_item", allowed)
            if len(self.names) == len(DEFAULT_CROSS):
                continue
            item_n = before("item", allowed)
            past["item_past_rows"][q] = item_n
            past["item_past_pos_rate"][q] = rate("item")
            past["item_prev_day_rows"][q] = item_n - before("item", allowed, DAY)
            past["category_past_rows"][q] = before("category", allowed)
            past["category_past_pos_rate"][q] = rate("category")
            past["user_cat_buy_before"][q] = before("user_cat", buy)
            past["user_item_pos_before"][q] = before("user_item", pos)
            past["user_cat_share_before"][q] = uc_n / np.maximum(before("user", allowed), 1)
            query, events = keys["user_cat"]
            last = last_before(query[q], t, events[allowed], r["ts"][allowed])
            past["user_cat_days_since"][q] = np.clip(np.where(last >= 0, (t - last) / DAY / 8, 1.0), 0, 1)
        out |= past
        if len(self.names) == len(DEFAULT_CROSS):
            return out
        out["user_cat_level"] = oof((r["level"][tr] / 4).astype(np.float64))
        h_cat = self.hist_cat[a]
        filled = np.maximum((h_cat > 0).sum(1), 1)
        out["hist_cat_match"] = ((h_cat == c[:, None]) & (h_cat > 0)).sum(1) / filled
        out["hist_cat_cooc"] = history_cooccurrence(*self.cooc, user, h_cat, c)
        return out

    # ------------------------------------------------------------------ the cascade builder's provider

    def _index(self) -> None:
        """Requests (``request_id`` = user * 100 + day) and their logged (request, item code) rows, sorted."""
        request = self.r["user"] * 100 + self.r["day"]
        self._requests, first = np.unique(request, return_index=True)
        self._first = first  # a recipe row of each request: every cross-field source is the request's
        self._request_of_row = np.searchsorted(self._requests, request)
        size = self.vocabs["item_id"].size
        known = np.nonzero(self.i_code > 0)[0]
        key = self._request_of_row[known] * size + self.i_code[known]
        order = np.argsort(key, kind="stable")
        self._pair_key, self._pair_row = key[order], known[order]

    def _logged_row(self, rows: np.ndarray, item: np.ndarray) -> np.ndarray:
        """The recipe row of (the request of ``rows``, ``item``) when it is logged, else -1."""
        if len(self._pair_key) == 0:
            return np.full(len(rows), -1, dtype=np.int64)
        key = self._request_of_row[rows] * self.vocabs["item_id"].size + item
        pos = np.clip(np.searchsorted(self._pair_key, key), 0, len(self._pair_key) - 1)
        return np.where(self._pair_key[pos] == key, self._pair_row[pos], -1)

    def anchor_rows(self, split: str, anchors: pa.Table) -> np.ndarray:
        """A recipe row of the request of each row of ``anchors`` (dataset column ``request_id``) in ``split``."""
        s = _SPLITS.get(split)
        if s is None:
            raise RecipeError(f"unknown split {split!r}")
        request = np.asarray(anchors.column("request_id").to_numpy(), dtype=np.int64)
        pos = np.clip(np.searchsorted(self._requests, request), 0, max(len(self._requests) - 1, 0))
        rows = self._first[pos] if len(self._first) else np.zeros(len(request), dtype=np.int64)
        ok = (self._requests[pos] == request) & (self.split[rows] == s) if len(self._first) else rows < 0
        if not ok.all():
            bad = int(np.nonzero(~ok)[0][0])
            raise RecipeError(
                f"{split} request {request[bad]} is not a {split} request of the recipe re-run from the raw file: "
                "the raw file or the dataset differ from the ones it was prepared from"
            )
        return rows

    def __call__(self, split: str, anchors: pa.Table, items: np.ndarray) -> dict[str, np.ndarray]:
        """Cross fields of unlogged rows: the request of each of ``anchors`` (rows of ``split``) with ``items``."""
        return self.pairs(self.anchor_rows(split, anchors), items)
