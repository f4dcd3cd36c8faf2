"""FSCD (Ma et al., SIGIR 2021): Eqs. 2, 4, 5 against hand-computed values; the selection on the wide
synthetic schema with a known ground truth; Eq. 6's fine-tuning start."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prerank.data.parquet import make_loader
from prerank.data.synthetic_wide import generate_wide, wide_schema
from prerank.models.base import ConfigError
from prerank.models.fscd import FSCDConfig, FSCDNet
from prerank.schema import FeatureSpec, Schema
from prerank.selection import FSCD, DropoutFR, finetune_state
from prerank.selection.base import relaxed_bernoulli
from prerank.selection.fscd import complexity, complexity_terms, cost_table, penalty_weight, prior_keep

FAST = {"hidden": (64, 32), "epochs": 2, "batch_size": 512, "lr": 0.01}


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_wide(tmp_path_factory.mktemp("wide") / "d", rows=20_000, seed=0)


def test_eq2_complexity_and_prior_by_hand() -> None:
    # type I, e = 16, n = 1: c = 0.4 + 0.16 + 1e-7
    assert complexity(0.4, 16, 1) == pytest.approx(0.5600001, abs=1e-12)
    assert prior_keep(0.5600001) == pytest.approx(0.3635474365803635, rel=1e-12)
    # type IV, e = 32, n = 50: c = 3.0 + 0.32 + 5e-6
    assert complexity(3.0, 32, 50) == pytest.approx(3.320005, abs=1e-12)
    assert prior_keep(3.320005) == pytest.approx(0.03489124016213774, rel=1e-10)


def test_eq4_alpha_by_hand_and_equals_complexity() -> None:
    assert penalty_weight(0.3635474365803635) == pytest.approx(0.5600001, rel=1e-9)
    assert penalty_weight(0.5) == pytest.approx(0.0, abs=1e-12)
    assert penalty_weight(0.2) == pytest.approx(math.log(4.0))
    c = np.array([0.1, 1.0, 3.3])
    np.testing.assert_allclose(penalty_weight(prior_keep(c)), c, rtol=1e-9)


def test_eq5_relaxed_gate_by_hand() -> None:
    logit = torch.tensor([math.log(0.8 / 0.2), math.log(0.1 / 0.9)], dtype=torch.float64)
    u = torch.tensor([[0.3, 0.95]], dtype=torch.float64)
    z = relaxed_bernoulli(logit, u, 0.1)
    torch.testing.assert_close(z, torch.tensor([[0.9954585855623853, 0.9994316155754115]], dtype=torch.float64))
    # as t -> 0 the gate is the Bernoulli draw [u < delta]
    z0 = relaxed_bernoulli(logit, torch.tensor([[0.79, 0.11]], dtype=torch.float64), 1e-4)
    torch.testing.assert_close(z0, torch.tensor([[1.0, 0.0]], dtype=torch.float64))


def test_cost_table_reads_schema_cost_types() -> None:
    schema = Schema(
        features=(
            FeatureSpec("a", "user", "categorical", vocab_size=100, cost_type="I", embedding_dim=8),
            FeatureSpec("b", "item", "sequence", vocab_size=100, max_len=5, cost_type="IV", n_values=5),
        )
    )
    table = cost_table(schema)
    assert table["a"]["o"] == 0.4 and table["a"]["e"] == 8 and table["a"]["n"] == 1
    assert table["b"]["o"] == 3.0 and table["b"]["n"] == 5
    assert table["b"]["complexity"] == pytest.approx(3.0 + 0.16 + 5e-7)
    assert table["a"]["theta"] > table["b"]["theta"] and table["a"]["alpha"] < table["b"]["alpha"]
    assert complexity_terms(schema["a"], schema, "vocab") == (0.4, 8, 100)


def test_fscd_on_wide_schema_matches_ground_truth(wide: Path) -> None:
    sel = FSCD(k=5, prior_scale=0.01, **FAST).fit(wide)
    assert sel.selected_features_ == tuple(sel.top(5))
    rank = dict(zip(sel.feature_names_, sel.ranking_, strict=True))
    noise = [r for n, r in rank.items() if "noise" in n]
    informative = [r for n, r in rank.items() if "noise" not in n]
    assert min(noise) > max(informative), rank  # costly noise last
    assert "x_star" in sel.selected_features_  # the very informative costly field survives its cost
    cheap = [r for n, r in rank.items() if n.startswith("u_cheap")]  # type I, effect 0.6
    costly = [r for n, r in rank.items() if n.startswith("x_costly")]  # type IV, effect 0.6
    assert max(cheap) < min(costly), rank
    # Dropout-FR (uniform prior) does not order fields of equal value by their cost
    dfr = DropoutFR(k=5, reg=0.01, **FAST).fit(wide)
    drank = dict(zip(dfr.feature_names_, dfr.ranking_, strict=True))
    d_cheap = [r for n, r in drank.items() if n.startswith("u_cheap")]
    d_costly = [r for n, r in drank.items() if n.startswith("x_costly")]
    assert np.mean(costly) - np.mean(cheap) > np.mean(d_costly) - np.mean(d_cheap) + 2
    assert set(sel.importances_.shape) == {len(sel.feature_names_)}
    np.testing.assert_allclose(sel.alpha_, sel.complexity_, rtol=1e-9)


def test_fit_on_batches_and_errors(wide: Path) -> None:
    schema = wide_schema()
    batches = list(make_loader(wide, "train", 1024, schema=schema))[:4]
    sel = FSCD(k=3, schema=schema, max_steps=3, hidden=(8,)).fit(batches)
    assert sel is not None and len(sel.selected_features_) == 3 and sel.steps_ == 3
    assert sorted(sel.ranking_) == list(range(1, len(schema.names) + 1))
    with pytest.raises(ConfigError, match="schema="):
        FSCD(k=3, hidden=(8,)).fit(batches)
    with pytest.raises(ConfigError, match="number of fields"):
        FSCD(k=len(schema.names) + 1, schema=schema, hidden=(8,)).fit(batches)
    with pytest.raises(ConfigError, match="iterator"):
        FSCD(k=3, schema=schema, hidden=(8,)).fit(iter(batches))


def test_finetune_starts_from_the_selection_network(wide: Path) -> None:
    """Eq. 6: the pre-ranker on the kept fields, initialised by finetune_state, scores exactly as the
    selection network with the kept fields' gates at 1 and the others at 0."""
    schema = wide_schema()
    full = FSCDNet(schema, FSCDConfig(hidden=(32, 16))).eval()
    keep = ("x_star", "u_cheap_1", "i_cheap_0", "x_costly_0")
    pre = FSCDNet(schema, FSCDConfig(hidden=(32, 16), features=keep)).eval()
    state, copied = finetune_state(full.state_dict(), full.names, pre)
    assert set(copied) == set(pre.state_dict())
    pre.load_state_dict(state)
    batch = next(iter(make_loader(wide, "valid", 64, schema=schema)))
    z = torch.tensor([1.0 if n in keep else 0.0 for n in full.names])
    with torch.no_grad():
        torch.testing.assert_close(pre(batch), full.gated_logits(batch, z))
        # DFS: a per-field input weight folds into the first layer
        scale = {n: 0.5 + i for i, n in enumerate(full.names)}
        state, _ = finetune_state(full.state_dict(), full.names, pre, scale)
        pre.load_state_dict(state)
        zs = torch.tensor([scale[n] if n in keep else 0.0 for n in full.names])
        torch.testing.assert_close(pre(batch), full.gated_logits(batch, zs))
