"""Recipe building blocks: vocabularies, out-of-fold target encoding, strictly-earlier histories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prerank.data.recipes.common import (
    Entries,
    RecipeError,
    Vocab,
    balanced_folds,
    count_before,
    fscd_cost,
    group_count,
    history,
    log_scale,
    padded_to_list,
    staging_dir,
    target_mean,
)


def test_vocab_maps_unseen_and_missing_to_zero() -> None:
    v = Vocab.fit(np.array(["b", "a", "b", ""]), missing="")
    assert v.size == 3
    np.testing.assert_array_equal(v.encode(np.array(["a", "b", "c", ""])), [1, 2, 0, 0])
    np.testing.assert_array_equal(Vocab.fit(np.array([30, 10])).encode(np.array([10, 20, 30, 40])), [1, 0, 2, 0])
    np.testing.assert_array_equal(Vocab.fit(np.array([], dtype=np.int64)).encode(np.array([5])), [0])


def test_balanced_folds() -> None:
    rng = np.random.default_rng(0)
    folds = balanced_folds(23, 5, rng)
    assert sorted(np.bincount(folds).tolist()) == [4, 4, 5, 5, 5]
    groups = np.repeat(np.arange(10), 3)
    by_group = balanced_folds(30, 5, rng, groups=groups)
    assert all(len(set(by_group[groups == g])) == 1 for g in range(10))
    with pytest.raises(RecipeError, match="n_folds"):
        balanced_folds(10, 1, rng)


def test_target_mean_by_hand() -> None:
    # rows: key, label, fold
    keys = np.array([7, 7, 7, 9])
    label = np.array([1.0, 0.0, 1.0, 1.0])
    fold = np.array([0, 1, 1, 0])
    m = 2.0
    tr, (ev,) = target_mean(
        Entries.single(keys), label, fold, [Entries.single(np.array([7, 9, 5]))], n_folds=2, smoothing=m
    )
    prior0 = 1 / 2  # labels of fold 1 (rows 1, 2)
    prior1 = 2 / 2  # labels of fold 0 (rows 0, 3)
    expected_train = [
        (1 + m * prior0) / (2 + m),  # row 0 (fold 0, key 7): rows 1, 2
        (1 + m * prior1) / (1 + m),  # row 1 (fold 1, key 7): row 0
        (1 + m * prior1) / (1 + m),  # row 2
        (0 + m * prior0) / (0 + m),  # row 3 (fold 0, key 9): nothing but the prior
    ]
    np.testing.assert_allclose(tr, expected_train, rtol=1e-6)
    prior = 3 / 4
    np.testing.assert_allclose(ev, [(2 + m * prior) / (3 + m), (1 + m * prior) / (1 + m), prior], rtol=1e-6)


def test_target_mean_never_sees_the_rows_own_label() -> None:
    rng = np.random.default_rng(1)
    n = 200
    keys, label = rng.integers(0, 6, n), rng.integers(0, 2, n).astype(float)
    folds = balanced_folds(n, 5, rng)
    base, _ = target_mean(Entries.single(keys), label, folds, [], n_folds=5, smoothing=3.0)
    for row in (0, 17, 123):
        flipped = label.copy()
        flipped[row] = 1 - flipped[row]
        again, _ = target_mean(Entries.single(keys), flipped, folds, [], n_folds=5, smoothing=3.0)
        assert again[row] == base[row]
        assert (again != base).sum() > 0  # rows of other folds do see it


def test_multi_valued_keys_pool_over_entries() -> None:
    # two training rows: row 0 has genres {1, 2}, row 1 genre {2}; query with genres {1, 2}
    train = Entries.padded(np.array([0, 0]), np.array([[1, 2], [2, 0]]), 3)
    query = Entries.padded(np.array([0]), np.array([[1, 2]]), 3)
    tr, (q,) = target_mean(train, np.array([1.0, 0.0]), np.array([0, 1]), [query], n_folds=2, smoothing=1.0)
    # groups: (0,1) -> row 0; (0,2) -> rows 0, 1. Query sums 1 + 1 positives over 1 + 2 entries.
    assert q[0] == pytest.approx((2 + 0.5) / (3 + 1))
    (c,) = group_count(train, [query])
    assert c[0] == 3
    assert tr[0] == pytest.approx((0 + 1 * 0.0) / (1 + 1))  # row 0 sees only row 1 (label 0; prior 0)


def test_history_is_strictly_before_and_keeps_the_last() -> None:
    ev_group = np.array([1, 1, 1, 1, 2, 1])
    ev_time = np.array([10, 20, 20, 30, 5, 5])
    ev_value = np.array([11, 12, 13, 14, 21, 15])
    q_group = np.array([1, 1, 1, 2, 3])
    q_time = np.array([20, 31, 5, 100, 100])
    h = history(q_group, q_time, ev_group, ev_time, ev_value, max_len=3).to_pylist()
    assert h == [[15, 11], [12, 13, 14], [], [21], []]  # ties keep input order; time 20 excludes 20
    np.testing.assert_array_equal(count_before(q_group, q_time, ev_group, ev_time), [2, 5, 0, 1, 0])
    empty = history(q_group, q_time, ev_group[:0], ev_time[:0], ev_value[:0], 3).to_pylist()
    assert empty == [[]] * 5


def test_padded_to_list_and_log_scale() -> None:
    assert padded_to_list(np.array([[3, 1, 0], [0, 0, 0]])).to_pylist() == [[3, 1], []]
    np.testing.assert_allclose(log_scale(np.array([0.0, 3.0, 15.0]), 15.0), [0.0, 0.5, 1.0], rtol=1e-6)


def test_staging_dir_swaps_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    with staging_dir(out) as tmp:
        (tmp / "schema.json").write_text("{}")
    assert (out / "schema.json").exists()
    with pytest.raises(RuntimeError), staging_dir(out) as tmp:
        (tmp / "schema.json").write_text("half")
        raise RuntimeError("crash")
    assert (out / "schema.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no leftovers


def test_fscd_cost_axes() -> None:
    simple = [fscd_cost(t, complex_=False) for t in ("user", "context", "item", "cross")]
    complex_ = [fscd_cost(t, complex_=True) for t in ("user", "context", "item", "cross")]
    assert simple == ["I", "I", "II", "II"] and complex_ == ["III", "III", "IV", "IV"]
