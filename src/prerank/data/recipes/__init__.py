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

Engines: ``memory`` (numpy/pyarrow, the whole log in memory) and ``duckdb`` (out of core, for logs larger
than memory: :mod:`.taobao_ooc`; Taobao's default feature set, the same dataset as ``memory``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from prerank.data.recipes.common import (
    FEATURE_SETS,
    Progress,
    RecipeError,
    check_feature_set,
    no_progress,
    read_prepared_meta,
)
from prerank.data.recipes.movielens import PROTOCOLS as MOVIELENS_PROTOCOLS
from prerank.data.recipes.movielens import prepare_movielens
from prerank.data.recipes.taobao import PROTOCOLS as TAOBAO_PROTOCOLS
from prerank.data.recipes.taobao import prepare_taobao
from prerank.data.recipes.taobao_ooc import OutOfCore, prepare_taobao_duckdb

#: Preparation engines; ``duckdb`` is the out-of-core path (:mod:`.taobao_ooc`).
ENGINES: tuple[str, ...] = ("memory", "duckdb")


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
    engine: str = "memory",
    out_of_core: OutOfCore | None = None,
    progress: Progress = no_progress,
) -> Path:
    """Run recipe ``name`` on the raw files at ``raw`` and write the dataset to ``out``.

    ``protocol=None`` picks the recipe's first protocol; ``features`` is ``default`` or ``wide`` (40+ fields of
    all four FSCD cost types, for feature selection). ``engine="duckdb"`` prepares out of core
    (``taobao-user-behavior``, default features; ``out_of_core`` sets its memory limit and temporary folder).
    Raises :class:`RecipeError` for an unknown name, protocol, feature set or engine and for missing or
    malformed raw files.
    """
    check_feature_set(features)
    recipe = RECIPES.get(name)
    if recipe is None:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    protocol = protocol or recipe.protocols[0]
    if protocol not in recipe.protocols:
        raise RecipeError(f"recipe {name!r} has no protocol {protocol!r}; choose one of {recipe.protocols}")
    if engine not in ENGINES:
        raise RecipeError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if engine == "duckdb":
        if name != "taobao-user-behavior":
            raise RecipeError(f"--engine duckdb is implemented for taobao-user-behavior only, not {name!r}")
        run = partial(prepare_taobao_duckdb, out_of_core=out_of_core)
        return run(Path(raw), Path(out), protocol, seed, features=features, progress=progress)
    if out_of_core is not None:
        raise RecipeError("--memory-limit and --temp-dir apply to --engine duckdb")
    return recipe.run(Path(raw), Path(out), protocol, seed, features=features, progress=progress)


def cross_features(data_dir: str | Path, raw: str | Path):
    """The cross-feature provider of a prepared dataset for ``cascade build --cross compute`` (issue 22).

    Rebuilds what the dataset's recipe needs from the raw files at ``raw`` (``meta.json`` says which recipe,
    seed and config); implemented for the MovieLens ``temporal`` recipes (:mod:`.movielens_pairs`) and
    Taobao UserBehavior (:mod:`.taobao_pairs`). Raises :class:`RecipeError` for other recipes or raw files that
    do not reproduce the dataset.
    """
    meta = read_prepared_meta(data_dir)
    name, protocol = meta.get("recipe"), meta.get("protocol")
    if name == "taobao-user-behavior":
        from prerank.data.recipes.taobao_pairs import TaobaoCross

        return TaobaoCross.from_raw(raw, data_dir)
    if name in ("ml-1m", "ml-100k") and protocol == "temporal":
        from prerank.data.recipes.movielens_pairs import MovieLensCross

        return MovieLensCross.from_raw(raw, data_dir)
    raise RecipeError(
        f"{data_dir}: cross fields of unlogged pairs are implemented for the MovieLens recipes' temporal protocol and "
        f"for taobao-user-behavior only (this dataset: recipe {name!r}, protocol {protocol!r})"
    )


__all__ = [
    "ENGINES",
    "FEATURE_SETS",
    "RECIPES",
    "OutOfCore",
    "Progress",
    "Recipe",
    "RecipeError",
    "cross_features",
    "prepare",
]
