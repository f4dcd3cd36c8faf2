"""Dropout-FR and DFS: the shared scikit-learn-like interface and their rankings on the wide schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prerank.data.synthetic_wide import generate_wide
from prerank.models.base import ConfigError
from prerank.selection import DFS, SELECTORS, DropoutFR

FAST = {"hidden": (64, 32), "epochs": 2, "batch_size": 512, "lr": 0.01}


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_wide(tmp_path_factory.mktemp("wide") / "d", rows=20_000, seed=1)


@pytest.mark.parametrize("cls", [DropoutFR, DFS])
def test_baseline_ranks_noise_last_and_keeps_star(cls: type, wide: Path) -> None:
    sel = cls(k=4, **FAST)
    assert sel.fit(wide) is sel
    rank = dict(zip(sel.feature_names_, sel.ranking_, strict=True))
    noise = [r for n, r in rank.items() if "noise" in n]
    informative = [r for n, r in rank.items() if "noise" not in n]
    assert min(noise) > max(informative), rank
    assert sel.selected_features_[0] == "x_star"
    assert len(sel.selected_features_) == 4
    assert np.all(sel.importances_ >= 0)
    report = sel.field_report()
    assert [r["name"] for r in report] == sel.schema_.names
    assert {"complexity", "theta", "alpha", "importance", "rank"} <= set(report[0])


def test_dfs_importance_is_abs_weight(wide: Path) -> None:
    sel = DFS(k=3, max_steps=5, hidden=(8,)).fit(wide)
    np.testing.assert_allclose(sel.importances_, np.abs(sel.weights_))
    assert set(sel.field_scale()) == set(sel.feature_names_)


def test_registry_and_option_errors() -> None:
    assert set(SELECTORS) == {"fscd", "dropout_fr", "dfs"}
    with pytest.raises(ConfigError):
        DropoutFR(temperature=0)
    with pytest.raises(ConfigError):
        DFS(l1_ratio=2.0)
