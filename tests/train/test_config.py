from __future__ import annotations

from pathlib import Path

import pytest

from prerank.models.base import ConfigError
from prerank.train.config import TrainConfig, auto_schedule, load_run_config, train_config


def test_defaults_are_valid() -> None:
    cfg = TrainConfig()
    assert cfg.epochs is None and cfg.batch_size is None  # chosen from the training rows by auto_schedule
    assert cfg.patience >= 3 and cfg.min_delta == 0.0


@pytest.mark.parametrize(
    "rows, expected",
    [(500, (64, 30)), (12_000, (64, 11)), (100_000, (256, 6)), (200_000, (512, 6)), (10_000_000, (2048, 5))],
)
def test_auto_schedule_gives_small_data_enough_steps(rows: int, expected: tuple[int, int]) -> None:
    batch, epochs = auto_schedule(rows)
    assert (batch, epochs) == expected
    assert batch & (batch - 1) == 0  # a power of two
    steps = epochs * -(-rows // batch)
    assert steps >= 2000 or epochs == 30


def test_auto_schedule_rejects_an_empty_split() -> None:
    with pytest.raises(ConfigError, match="empty"):
        auto_schedule(0)


def test_min_delta_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="min_delta"):
        train_config({"min_delta": -0.1})


@pytest.mark.parametrize(
    "values, field",
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"metric": "acc"}, "metric"),
    ],
)
def test_invalid_values_name_the_option(values: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        train_config(values)


def test_unknown_option_is_an_error() -> None:
    with pytest.raises(ConfigError, match="learning_rate"):
        train_config({"learning_rate": 0.1})


def test_yaml_run_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: two_tower\nmodel_config: {similarity: cosine}\ntrain: {epochs: 2, lr: 1e-2}\n")
    run = load_run_config(path)
    assert run.model == "two_tower" and run.model_config == {"similarity": "cosine"}
    assert run.train.epochs == 2 and run.train.lr == pytest.approx(0.01)


def test_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: lr\nepochs: 3\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_run_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_run_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")


def test_stage_mix_is_checked_and_parsed_from_the_command_line() -> None:
    from prerank.cli.common import run_config

    with pytest.raises(ConfigError, match="unknown tiers"):
        TrainConfig(stage_mix={"clicks": 1.0})
    with pytest.raises(ConfigError, match="not all 0"):
        TrainConfig(stage_mix={"clicked": 0.0})
    _, cfg = run_config(None, stage_mix="clicked=1,unclicked=1,random=2")
    assert cfg.stage_mix == {"clicked": 1.0, "unclicked": 1.0, "random": 2.0}
    _, cfg = run_config(None, stage_mix="even")  # a named mix stays a name (grid labels and checkpoints show it)
    assert cfg.stage_mix == "even"
    with pytest.raises(ConfigError, match="not a named mix"):
        TrainConfig(stage_mix="evens")
