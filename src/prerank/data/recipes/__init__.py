"""Recipes: public raw datasets -> prerank dataset folders (DESIGN.md "Data").

``prepare(name, raw, out, protocol, seed)`` detects the raw layout, builds leak-free features
(vocabularies and statistics fitted on the training split only, out-of-fold for training rows)
and writes ``schema.json``, ``meta.json``, ``train/ valid/ test/`` and ``items.parquet``.

=====================  =====================  ====================================================
name                   protocols (default 1st) raw files
=====================  =====================  ====================================================
ml-1m                  paper, temporal        ratings.dat/users.dat/movies.dat, ml-1m.zip, or the
                                              staged ratings_all_uir_with_partial_ts.csv.gz
ml-100k                paper, temporal        u.data/u.user/u.item, ml-100k.zip, or RecBole
                                              ml-100k.inter[.gz]/.user/.item
taobao-user-behavior   temporal               UserBehavior*.csv[.gz]
=====================  =====================  ====================================================

Feature sets: ``default`` (each recipe's documented columns) and ``wide`` (40+ fields of all four FSCD
cost types for feature selection: :mod:`.movielens_wide`, temporal protocol only; :mod:`.taobao_wide`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from prerank.data.recipes.common import FEATURE_SETS, Progress, RecipeError, check_feature_set, no_progress
from prerank.data.recipes.movielens import PROTOCOLS as MOVIELENS_PROTOCOLS
from prerank.data.recipes.movielens import prepare_movielens
from prerank.data.recipes.taobao import PROTOCOLS as TAOBAO_PROTOCOLS
from prerank.data.recipes.taobao import prepare_taobao


@dataclass(frozen=True)
class Recipe:
    """A registered recipe: ``run(raw, out, protocol, seed, progress=...) -> out``."""

    run: Callable[..., Path]
    protocols: tuple[str, ...]
    description: str


RECIPES: dict[str, Recipe] = {
    "ml-1m": Recipe(partial(prepare_movielens, "ml-1m"), MOVIELENS_PROTOCOLS, "MovieLens-1M ratings"),
    "ml-100k": Recipe(partial(prepare_movielens, "ml-100k"), MOVIELENS_PROTOCOLS, "MovieLens-100K ratings"),
    "taobao-user-behavior": Recipe(prepare_taobao, TAOBAO_PROTOCOLS, "Taobao UserBehavior (pv/fav/cart/buy)"),
}


def prepare(
    name: str,
    raw: str | Path,
    out: str | Path,
    protocol: str | None = None,
    seed: int = 0,
    *,
    features: str = "default",
    progress: Progress = no_progress,
) -> Path:
    """Run recipe ``name`` on the raw files at ``raw`` and write the dataset to ``out``.

    ``protocol=None`` picks the recipe's first protocol; ``features`` is ``default`` or ``wide`` (40+ fields of
    all four FSCD cost types, for feature selection). Raises :class:`RecipeError` for an unknown name,
    protocol or feature set and for missing or malformed raw files.
    """
    check_feature_set(features)
    recipe = RECIPES.get(name)
    if recipe is None:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    protocol = protocol or recipe.protocols[0]
    if protocol not in recipe.protocols:
        raise RecipeError(f"recipe {name!r} has no protocol {protocol!r}; choose one of {recipe.protocols}")
    return recipe.run(Path(raw), Path(out), protocol, seed, features=features, progress=progress)


__all__ = ["FEATURE_SETS", "RECIPES", "Progress", "Recipe", "RecipeError", "prepare"]
