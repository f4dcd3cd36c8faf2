"""The robustness suite's shared inputs: built once per session, copied into each case's folder."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_schema, tiny_table
from prerank.cli import app
from prerank.cli import serve as _serve  # noqa: F401  (registers the commands)
from prerank.cli import teacher as _teacher  # noqa: F401
from prerank.cli import train as _train  # noqa: F401
from prerank.data.parquet import write_dataset
from prerank.models.registry import build_model
from prerank.schema import Schema
from prerank.serve.export import export
from prerank.train.checkpoint import save_checkpoint

from .cases import FAST, Workspace


def write_tiny(root: Path, schema: Schema | None = None, rows: tuple[int, int, int] = (512, 128, 128)) -> Path:
    """The tiny dataset of ``tests/conftest.py`` (train / valid / test rows, row groups of 100); the catalogue lists
    items 1..35 of the 40 ids, so 36..39 are valid ids that no item cache holds."""
    schema = schema or tiny_schema()
    items = tiny_table(35, 9, schema).select([f.name for f in schema.tower("item")])
    items = items.set_column(items.column_names.index("item_id"), "item_id", pa.array(np.arange(1, 36), pa.int64()))
    splits = {
        name: tiny_table(n, seed, schema)
        for seed, (name, n) in enumerate(zip(("train", "valid", "test"), rows, strict=True), 1)
    }
    write_dataset(root, schema, splits, items=items, row_group_size=100)
    return root


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data``, ``run`` (lr, one epoch), ``art`` (its artifact: torch.export graphs) and ``extras`` (see
    :class:`Workspace`)."""
    root = tmp_path_factory.mktemp("robustness")
    data = write_tiny(root / "data")
    res = CliRunner().invoke(app, ["train", "--model", "lr", "--data", str(data), "--out", str(root / "run"), *FAST])
    assert res.exit_code == 0, res.output
    export(root / "run" / "best.pt", data, root / "art", formats=("torch",))
    extras = root / "extras"
    torch.manual_seed(1)
    save_checkpoint(extras / "other.pt", "lr", build_model("lr", tiny_schema()))
    export(extras / "other.pt", data, extras / "other-art", formats=("torch",))
    schema = tiny_schema()
    other = replace(schema, features=tuple(f for f in schema.features if f.name != "user_cat_clicks"))
    write_tiny(extras / "other-data", other)
    save_checkpoint(extras / "other-data-lr.pt", "lr", build_model("lr", other))
    return root


@pytest.fixture
def workspace(base: Path, tmp_path: Path) -> Workspace:
    """Fresh copies of the base dataset, run and artifact in this test's folder."""
    for name in ("data", "run", "art"):
        shutil.copytree(base / name, tmp_path / name)
    return Workspace(tmp_path, tmp_path / "data", tmp_path / "run", tmp_path / "art", base / "extras")


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }
