"""The model registry: one literal dict, name -> (model class, default config)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prerank.models.base import ConfigError, PreRanker, config_from_dict
from prerank.models.cold import COLD, COLDConfig
from prerank.models.dat import DAT, DATConfig
from prerank.models.distilled_dssm import DistilledDSSM, DistilledDSSMConfig
from prerank.models.ensemble import Ensemble, EnsembleConfig
from prerank.models.fit import FIT, FITConfig
from prerank.models.fscd import FSCDConfig, FSCDNet
from prerank.models.int_tower import IntTower, IntTowerConfig
from prerank.models.lr import LR, LRConfig
from prerank.models.rank_tower import RankTower, RankTowerConfig
from prerank.models.ranker import Ranker, RankerConfig
from prerank.models.sync_distill import SyncDistill, SyncDistillConfig
from prerank.models.two_tower import TwoTower, TwoTowerConfig
from prerank.schema import Schema

MODELS: dict[str, tuple[type[PreRanker], Any]] = {
    "lr": (LR, LRConfig()),
    "two_tower": (TwoTower, TwoTowerConfig()),
    "dat": (DAT, DATConfig()),
    "cold": (COLD, COLDConfig()),
    "int_tower": (IntTower, IntTowerConfig()),
    "ranker": (Ranker, RankerConfig()),
    # K rankers' logits averaged; `prerank teacher fit --ensemble K` trains the members independently
    "ensemble": (Ensemble, EnsembleConfig()),
    "fit": (FIT, FITConfig()),
    "fit_no_mqm": (FIT, FITConfig(use_mqm=False)),
    "fit_no_lss": (FIT, FITConfig(scorer="dot")),
    "fit_summax": (FIT, FITConfig(scorer="summax")),
    "fit_fc": (FIT, FITConfig(scorer="fc")),
    "rank_tower": (RankTower, RankTowerConfig()),
    # Taobao distilled DSSM and the rows of its report's ablation; further rows are config overrides
    # of distilled_dssm (--model-option use_nova=false, use_senet=false, use_bilinear=false, ...)
    "distilled_dssm": (DistilledDSSM, DistilledDSSMConfig()),
    "dssm_plain": (
        DistilledDSSM,
        DistilledDSSMConfig(head="dot", use_fm=False, use_nova=False, use_senet=False, use_bilinear=False),
    ),
    "dssm_mlp": (DistilledDSSM, DistilledDSSMConfig(use_fm=False, use_nova=False, use_senet=False, use_bilinear=False)),
    "dssm_mlp_fm": (DistilledDSSM, DistilledDSSMConfig(use_nova=False, use_senet=False, use_bilinear=False)),
    # the distilled DSSM trained jointly with a ranker teacher on shared embeddings (serves as the student)
    "sync_distill": (SyncDistill, SyncDistillConfig()),
    "fscd_ranker": (FSCDNet, FSCDConfig(hidden=(1024, 512, 256))),
    "fscd_preranker": (FSCDNet, FSCDConfig(hidden=(1024, 256))),
}


def model_config(name: str, overrides: dict | None = None) -> Any:
    """The registered default config of ``name`` with ``overrides`` applied (validated)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(MODELS)}")
    _, default = MODELS[name]
    if not overrides:
        return default
    merged = {**asdict(default), **overrides}
    return config_from_dict(type(default), merged)


def build_model(name: str, schema: Schema, overrides: dict | None = None) -> PreRanker:
    """Instantiate a registered model for ``schema``."""
    config = model_config(name, overrides)  # raises ConfigError for unknown names
    cls, _ = MODELS[name]
    return cls(schema, config)


def describe(name: str) -> dict:
    cls, default = MODELS[name]
    return {"name": name, "class": cls.__name__, "config": asdict(default)}


__all__ = ["MODELS", "build_model", "model_config", "describe"]
