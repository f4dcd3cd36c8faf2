"""``compare``'s tuning grid over loss options (``loss.NAME``): each point trains with its own loss."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from prerank.models.base import ConfigError
from prerank.train import compare


def test_loss_options_in_the_grid_build_one_loss_per_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[float, float]] = []

    def fake_train(name, data_dir, run_dir, overrides, config, loss, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append((config.lr, loss.config.distillation_weight))
        # the valid metric peaks at distillation_weight 2 with lr 1e-3
        return SimpleNamespace(best_metric=-abs(loss.config.distillation_weight - 2) - config.lr, epochs=1)

    monkeypatch.setattr(compare, "train_model", fake_train)
    grid = {"lr": [1e-3, 1e-2], "loss.distillation_weight": [0.5, 2.0]}
    chosen = compare.tune(
        "two_tower", tmp_path, tmp_path, grid, compare.TrainConfig(), None, "hybrid", {"sorting_weight": 0.0}
    )
    assert sorted(seen) == [(1e-3, 0.5), (1e-3, 2.0), (1e-2, 0.5), (1e-2, 2.0)]
    assert chosen == {"loss.distillation_weight": 2.0, "lr": 1e-3}
    tuning = json.loads((tmp_path / "tuning.json").read_text())
    assert tuning["two_tower"]["chosen"] == "loss.distillation_weight=2, lr=0.001"
    assert compare._train_part(chosen) == {"lr": 1e-3} and compare._loss_part(chosen) == {"distillation_weight": 2.0}


STAGE_2_WINS = (2.0, {"lr": 1e-3, "loss.distillation_weight": 2.0})


@pytest.mark.parametrize(("peak", "expected"), [STAGE_2_WINS, (1.0, {"lr": 1e-3})])
def test_a_second_stage_tunes_on_top_of_the_first_stages_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peak: float, expected: dict
) -> None:
    seen: list[tuple[float, float]] = []

    def fake_train(name, data_dir, run_dir, overrides, config, loss, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append((config.lr, loss.config.distillation_weight))
        return SimpleNamespace(best_metric=-abs(loss.config.distillation_weight - peak) - config.lr, epochs=1)

    monkeypatch.setattr(compare, "train_model", fake_train)
    chosen = compare.tune(
        "two_tower",
        tmp_path,
        tmp_path,
        {"lr": [1e-3, 1e-2]},
        compare.TrainConfig(),
        None,
        "hybrid",
        then_grid={"loss.distillation_weight": [0.5, 2.0]},
    )
    # stage 1 at the loss's default weight 1, stage 2 at stage 1's best lr: 2 + 2 runs, not 2 x 2
    assert seen == [(1e-3, 1.0), (1e-2, 1.0), (1e-3, 0.5), (1e-3, 2.0)]
    assert chosen == expected  # stage 1's best stays a candidate
    assert json.loads((tmp_path / "tuning.json").read_text())["two_tower"]["chosen"] == compare.grid_label(expected)


def test_a_second_stage_needs_a_first_and_other_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a first"):
        compare.run_compare(tmp_path, ["lr"], 1, tmp_path / "out", then_grid={"lr": [1e-3]})
    with pytest.raises(ConfigError, match="both stages"):
        compare.run_compare(tmp_path, ["lr"], 1, tmp_path / "out", grid={"lr": [1e-3]}, then_grid={"lr": [1e-2]})


def test_an_unknown_loss_option_in_the_grid_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        compare.run_compare(tmp_path, ["lr"], 1, tmp_path / "out", loss="hybrid", grid={"loss.nope": [1]})


def test_named_stage_mixes_are_grid_values_checked_before_training(tmp_path: Path) -> None:
    points = compare.grid_points({"stage_mix": ["own", "even"], "lr": [1e-3]})
    assert [compare.grid_label(p) for p in points] == ["lr=0.001, stage_mix=own", "lr=0.001, stage_mix=even"]
    with pytest.raises(ConfigError, match="not a named mix"):
        compare.run_compare(tmp_path, ["lr"], 1, tmp_path / "out", grid={"stage_mix": ["own", "uneven"]})
