"""Shared step of the pair-wise cross-field tests (MovieLens and Taobao): a small cascade built with
``--cross compute``, whose unexposed rows each test then checks against its provider's ``pairs``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prerank.data.cascade import CascadeConfig, build_cascade
from prerank.data.parquet import SPLITS
from prerank.data.recipes import cross_features
from prerank.models.registry import build_model
from prerank.schema import STAGES, Schema
from prerank.train.checkpoint import save_checkpoint


def cold_teacher(data: Path, path: Path) -> Path:
    """An untrained COLD checkpoint of ``data``'s schema at ``path``: a teacher for the cascade builder."""
    save_checkpoint(path, "cold", build_model("cold", Schema.load(data)))
    return path


def computed_cascade(data: Path, raw: Path, out: Path):
    """Build a small cascade of ``data`` with cross fields computed from ``raw``; returns the provider and, per
    split, the unexposed rows (at least one each), after checking that the output keeps every field."""
    teacher = cold_teacher(data, out.parent / f"{out.name}-teacher.pt")
    cross = cross_features(data, raw)
    config = CascadeConfig(retrieve=8, rank_candidates=3, prerank_candidates=4, random=5, cross="compute",
                           rank_cut="teacher_top", unknown_items="skip")  # fmt: skip
    summary = build_cascade(data, teacher, out, config, cross_features=cross)
    assert summary["cross_features"].startswith("computed")
    assert {f.name for f in Schema.load(out).features} == set(Schema.load(data).names)
    unexposed = {}
    for split in SPLITS:
        t = pa.concat_tables([pq.read_table(p) for p in sorted((out / split).glob("*.parquet"))])
        new = np.asarray(t["stage"]) != STAGES.index("impression")
        assert new.sum() > 0
        unexposed[split] = t.filter(pa.array(new))
    return cross, unexposed
