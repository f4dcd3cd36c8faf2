"""The ``wide`` Taobao UserBehavior feature set (FSCD, issue 22): the default 13 columns plus 33 more, 46 fields.

``prepare taobao-user-behavior --features wide`` adds fields of every FSCD Table 1 cost type
(:func:`.common.fscd_cost`). The log has no user or item attributes beyond ids and categories, so the new
fields are nearly all computed (III, IV), as in the paper's industrial set, where most fields are statistics.
Leak-free in three ways, as :mod:`.movielens_wide`:

* *out-of-fold* (OOF): label statistics of the training split with the default set's request folds;
* *past-only*: events of days strictly before the request's day, from earlier splits (training rows read
  earlier training days), as the default ``user_cat_before``; rates are smoothed towards the training mean
  without the row's fold (:func:`.common.fold_prior`);
* *label-free*: counts of the training rows.

=======================  =======  ====  ============================================================
name                     tower    type  meaning
=======================  =======  ====  ============================================================
weekday                  context  I     weekday of the request's day (Monday = 1)
hist_pos_item_id         user     III   last 50 fav/cart/buy items on earlier days
hist_pos_category_id     user     III   their categories
user_past_rows           user     III   log-scaled number of the user's rows on earlier days
user_past_days           user     III   log-scaled number of earlier days the user was active
user_past_pos_rate       user     III   smoothed fav/cart/buy rate of the user's earlier rows
user_past_fav            user     III   log-scaled number of earlier rows whose strongest behaviour is fav
user_past_cart           user     III   ... cart
user_past_buy            user     III   ... buy
user_prev_day_rows       user     III   log-scaled number of the user's rows on the day before
user_days_since          user     III   days since the user's last earlier active day / 8 (1: none)
user_past_categories     user     III   log-scaled number of distinct categories on earlier days
user_mean_level          user     III   mean label_level / 4 of the user's training rows (OOF)
user_buy_rate            user     III   smoothed buy rate of the user's training rows (OOF)
user_hist_pop            user     III   mean log-scaled training count of the ``hist_item_id`` items
item_buy_rate            item     IV    smoothed buy rate of the item's training rows (OOF)
item_mean_level          item     IV    mean label_level / 4 of the item's training rows (OOF)
item_users               item     IV    log-scaled number of distinct training users of the item
category_mean_label      item     IV    smoothed positive rate of the category's training rows (OOF)
category_count           item     IV    log-scaled number of the category's training rows
item_category_share      item     IV    the item's share of its category's training rows
item_past_rows           cross    IV    log-scaled number of the item's rows (all users) on earlier days
item_past_pos_rate       cross    IV    smoothed positive rate of those rows
item_prev_day_rows       cross    IV    log-scaled number of the item's rows on the day before
category_past_rows       cross    IV    log-scaled number of the category's rows on earlier days
category_past_pos_rate   cross    IV    smoothed positive rate of those rows
user_cat_buy_before      cross    IV    log-scaled number of the user's buy rows in the category, earlier days
user_item_pos_before     cross    IV    log-scaled number of earlier days the user favs/carts/buys the item
user_cat_share_before    cross    IV    share of the user's earlier rows in the item's category
user_cat_days_since      cross    IV    days since the user last saw the category / 8 (1: never)
user_cat_level           cross    IV    mean label_level / 4 of the user's training rows in the category (OOF)
hist_cat_match           cross    IV    share of ``hist_category_id`` equal to the item's category
                                        (target-vs-history similarity)
hist_cat_cooc            cross    IV    log-scaled mean co-occurrence of the item's category with each
                                        ``hist_category_id`` among *other* users' training positives
=======================  =======  ====  ============================================================
"""

from __future__ import annotations

from dataclasses import replace

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
    smoothed_rate,
)
from prerank.schema import FeatureSpec, Tower

DAY = 86_400


def wide_features(
    r: dict[str, np.ndarray],
    label: np.ndarray,
    split: np.ndarray,
    codes: dict[str, np.ndarray],
    vocab: dict[str, int],
    stats: SplitStats,
    day_start: np.ndarray,
    hist: dict[str, list[pa.Array]],
    hist_len: int,
    smoothing: float,
    catalogue_category: np.ndarray,
) -> tuple[list[FeatureSpec], dict[str, list], dict[str, np.ndarray]]:
    """The extra fields: specs (schema order), values per split (train, valid, test) and catalogue columns.

    ``r`` holds the rows (``user, day, item, category, ts, level``), ``codes`` the vocabulary codes of
    ``user_id, item_id, category_id``, ``hist`` the default histories per split.
    """
    parts = stats.parts
    u, i, c = codes["user_id"], codes["item_id"], codes["category_id"]
    n_items, n_cats = vocab["item_id"], vocab["category_id"]
    level = r["level"].astype(np.float64)
    tr = parts[0]
    codes["weekday"] = (r["day"] + 5) % 7 + 1  # day 0, 2017-11-25, was a Saturday

    # ---- out-of-fold statistics
    by_level = replace(stats, train_label=(level / 4)[tr])
    by_buy = replace(stats, train_label=(level == 4)[tr].astype(np.float64))
    by_cat = replace(stats, catalogue=Entries.single(catalogue_category))
    user = lambda p: Entries.single(u[p])  # noqa: E731
    item = lambda p: Entries.single(i[p])  # noqa: E731
    feats: dict[str, list] = {
        "user_mean_level": by_level.mean(user),
        "user_buy_rate": by_buy.mean(user),
        "item_buy_rate": by_buy.mean(item, catalogue=True),
        "item_mean_level": by_level.mean(item, catalogue=True),
        "category_mean_label": by_cat.mean(lambda p: Entries.single(c[p]), catalogue=True),
        "user_cat_level": by_level.mean(lambda p: Entries.single(u[p] * n_cats + c[p])),
    }

    # ---- label-free statistics of the training rows
    item_n = np.bincount(i[tr], minlength=n_items).astype(np.float64)
    cat_n = np.bincount(c[tr], minlength=n_cats).astype(np.float64)
    pairs = np.unique(i[tr] * vocab["user_id"] + u[tr])
    item_users = np.bincount(pairs // vocab["user_id"], minlength=n_items).astype(np.float64)
    item_pop = log_scale(item_n, float(item_n.max(initial=0)))
    cat_item_n = np.zeros(n_items)
    cat_item_n[i[tr]] = cat_n[c[tr]]
    per_item = {
        "item_users": log_scale(item_users, float(item_users.max(initial=0))),
        "item_category_share": (item_n / np.maximum(cat_item_n, 1)).astype(np.float32),
    }
    for name, values in per_item.items():
        feats[name] = [values[i[p]] for p in parts] + [values[1:]]
    cat_count = log_scale(cat_n, float(cat_n.max(initial=0)))
    feats["category_count"] = [cat_count[c[p]] for p in parts] + [cat_count[catalogue_category]]

    # ---- past-only: earlier days of earlier splits
    train_prior, prior = fold_prior(label[tr], stats.folds, stats.n_folds)
    b_ev = (split == 0) & (label == 1) & (c > 0)
    cooc, b, b_users = cooccurrence(r["user"][b_ev], c[b_ev], n_cats)
    user_cat = r["user"] * (int(r["category"].max(initial=0)) + 1) + r["category"]
    user_item = r["user"] * (int(r["item"].max(initial=0)) + 1) + r["item"]
    raw: dict[str, list[np.ndarray]] = {}

    def add(name: str, values: np.ndarray) -> None:
        raw.setdefault(name, []).append(np.asarray(values, dtype=np.float64))

    for s, p in enumerate(parts):
        allowed = split <= max(s - 1, 0)
        pos = allowed & (label == 1)
        q_time = day_start[p]
        pr = train_prior if s == 0 else prior

        def before(key: np.ndarray, mask: np.ndarray, shift: int = 0, p=p, q_time=q_time) -> np.ndarray:
            return count_before(key[p], q_time - shift, key[mask], r["ts"][mask]).astype(np.float64)

        def rate(key: np.ndarray, pr=pr, allowed=allowed, pos=pos) -> np.ndarray:
            return smoothed_rate(before(key, pos), before(key, allowed), pr, smoothing)

        n_user = before(r["user"], allowed)
        add("user_past_rows", n_user)
        first_of_day = allowed & _first(r["user"] * 16 + r["day"], r["ts"])
        add("user_past_days", before(r["user"], first_of_day))
        add("user_past_categories", before(r["user"], allowed & _first(user_cat, r["ts"])))
        feats.setdefault("user_past_pos_rate", []).append(rate(r["user"]))
        for name, lv in (("user_past_fav", 2), ("user_past_cart", 3), ("user_past_buy", 4)):
            add(name, before(r["user"], allowed & (r["level"] == lv)))
        add("user_prev_day_rows", n_user - before(r["user"], allowed, DAY))
        add("item_past_rows", before(r["item"], allowed))
        feats.setdefault("item_past_pos_rate", []).append(rate(r["item"]))
        add("item_prev_day_rows", before(r["item"], allowed) - before(r["item"], allowed, DAY))
        add("category_past_rows", before(r["category"], allowed))
        feats.setdefault("category_past_pos_rate", []).append(rate(r["category"]))
        add("user_cat_buy_before", before(user_cat, allowed & (r["level"] == 4)))
        add("user_item_pos_before", before(user_item, pos))
        feats.setdefault("user_cat_share_before", []).append(
            (before(user_cat, allowed) / np.maximum(n_user, 1)).astype(np.float32)
        )
        for name, key in (("user_days_since", r["user"]), ("user_cat_days_since", user_cat)):
            last = last_before(key[p], q_time, key[allowed], r["ts"][allowed])
            days = np.where(last >= 0, (q_time - last) / DAY / 8, 1.0)
            feats.setdefault(name, []).append(np.clip(days, 0, 1).astype(np.float32))
        h_cat = list_to_padded(hist["hist_category_id"][s], hist_len)
        h_item = list_to_padded(hist["hist_item_id"][s], hist_len)
        feats.setdefault("hist_cat_match", []).append(
            (((h_cat == c[p][:, None]) & (h_cat > 0)).sum(1) / np.maximum((h_cat > 0).sum(1), 1)).astype(np.float32)
        )
        add("hist_cat_cooc", history_cooccurrence(cooc, b, b_users, r["user"][p], h_cat, c[p]))
        feats.setdefault("user_hist_pop", []).append(
            ((item_pop[h_item] * (h_item > 0)).sum(1) / np.maximum((h_item > 0).sum(1), 1)).astype(np.float32)
        )
        ev = pos & (i > 0)
        for name, code in (("hist_pos_item_id", i), ("hist_pos_category_id", c)):
            feats.setdefault(name, []).append(
                history(r["user"][p], q_time, r["user"][ev], r["ts"][ev], code[ev], hist_len)
            )
    for name, values in raw.items():
        reference = float(values[0].max(initial=0))  # scale fitted on the training rows
        feats[name] = [log_scale(v, reference) for v in values]

    specs = _specs(hist_len)
    catalogue = {f.name: np.asarray(feats[f.name][3], dtype=np.float32) for f in specs if f.tower == "item"}
    return specs, {k: v[:3] for k, v in feats.items()}, catalogue


def _first(key: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Mask of each key's earliest row (ties: the first in input order)."""
    order = np.lexsort((np.arange(len(key)), ts, key))
    first = np.zeros(len(key), dtype=bool)
    ks = key[order]
    first[order[np.r_[True, ks[1:] != ks[:-1]]] if len(ks) else order] = True
    return first


def _specs(hist_len: int) -> list[FeatureSpec]:
    def spec(name: str, tower: Tower, kind: str, description: str, **kw: object) -> FeatureSpec:
        cost = fscd_cost(tower, complex_=kind != "categorical")
        return FeatureSpec(name, tower, kind, cost_type=cost, description=description, **kw)  # type: ignore[arg-type]

    def dense(name: str, tower: Tower, description: str) -> FeatureSpec:
        return spec(name, tower, "dense", description)

    def seq(name: str, shares: str, description: str) -> FeatureSpec:
        return spec(name, "user", "sequence", description, max_len=hist_len, shares=shares, n_values=hist_len)

    return [
        spec("weekday", "context", "categorical", "weekday of the request's day, Monday = 1", vocab_size=8),
        seq("hist_pos_item_id", "item_id", f"last {hist_len} fav/cart/buy items on earlier days"),
        seq("hist_pos_category_id", "category_id", "categories of hist_pos_item_id"),
        dense("user_past_rows", "user", "log-scaled number of the user's rows on earlier days"),
        dense("user_past_days", "user", "log-scaled number of earlier days the user was active"),
        dense("user_past_pos_rate", "user", "smoothed fav/cart/buy rate of the user's earlier rows"),
        dense("user_past_fav", "user", "log-scaled number of the user's earlier fav rows"),
        dense("user_past_cart", "user", "log-scaled number of the user's earlier cart rows"),
        dense("user_past_buy", "user", "log-scaled number of the user's earlier buy rows"),
        dense("user_prev_day_rows", "user", "log-scaled number of the user's rows on the day before"),
        dense("user_days_since", "user", "days since the user's last earlier active day / 8 (1: none)"),
        dense("user_past_categories", "user", "log-scaled number of distinct categories on earlier days"),
        dense("user_mean_level", "user", "mean label_level / 4 of the user's training rows (out-of-fold)"),
        dense("user_buy_rate", "user", "smoothed buy rate of the user's training rows (out-of-fold)"),
        dense("user_hist_pop", "user", "mean log-scaled training count of the hist_item_id items"),
        dense("item_buy_rate", "item", "smoothed buy rate of the item's training rows (out-of-fold)"),
        dense("item_mean_level", "item", "mean label_level / 4 of the item's training rows (out-of-fold)"),
        dense("item_users", "item", "log-scaled number of distinct training users of the item"),
        dense("category_mean_label", "item", "smoothed positive rate of the category's training rows (OOF)"),
        dense("category_count", "item", "log-scaled number of the category's training rows"),
        dense("item_category_share", "item", "the item's share of its category's training rows"),
        dense("item_past_rows", "cross", "log-scaled number of the item's rows on earlier days"),
        dense("item_past_pos_rate", "cross", "smoothed positive rate of the item's rows on earlier days"),
        dense("item_prev_day_rows", "cross", "log-scaled number of the item's rows on the day before"),
        dense("category_past_rows", "cross", "log-scaled number of the category's rows on earlier days"),
        dense("category_past_pos_rate", "cross", "smoothed positive rate of the category's earlier rows"),
        dense("user_cat_buy_before", "cross", "log-scaled number of the user's earlier buy rows in the category"),
        dense("user_item_pos_before", "cross", "log-scaled number of earlier days the user favs/carts/buys it"),
        dense("user_cat_share_before", "cross", "share of the user's earlier rows in the item's category"),
        dense("user_cat_days_since", "cross", "days since the user last saw the category / 8 (1: never)"),
        dense("user_cat_level", "cross", "mean label_level / 4 of the user's training rows in the category"),
        dense("hist_cat_match", "cross", "share of hist_category_id equal to the item's category"),
        dense("hist_cat_cooc", "cross", "log-scaled mean co-occurrence with hist_category_id, other users"),
    ]
