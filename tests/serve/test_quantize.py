"""int8 copies of the user and score graphs (prerank.serve.quantize) and the onnx-int8 runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import tiny_schema, tiny_table
from prerank.data.parquet import table_to_batch
from prerank.models.registry import build_model
from prerank.serve.export import export_model, load_artifact
from prerank.serve.graphs import Signature, save_graphs
from prerank.serve.quantize import add_int8, quantize_graphs, quantize_report
from prerank.serve.runtime import RUNTIMES, OnnxRuntime, open_runtime
from prerank.serve.scorer import Scorer

pytest.importorskip("onnxruntime.quantization")


def _signature(graph_dir: Path) -> Signature:
    return Signature.from_dict(json.loads((graph_dir / "signature.json").read_text()))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_artifact import write_serve_data

    return write_serve_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def int_tower_artifact(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """An exported int_tower artifact (ONNX graphs only) with its int8 graphs added."""
    out = tmp_path_factory.mktemp("int_tower") / "art"
    torch.manual_seed(0)
    export_model("int_tower", build_model("int_tower", tiny_schema()), data, out, chunk_rows=8, formats=("onnx",))
    add_int8(out)
    return out


@pytest.fixture(scope="module")
def two_tower_graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two_tower")
    torch.manual_seed(0)
    save_graphs(build_model("two_tower", tiny_schema()).eval(), out, ("onnx",))
    return out


def _logits(runtime: OnnxRuntime, rows: int = 16) -> np.ndarray:
    """Logits of every catalogue item (ids 1..39) for each of ``rows`` users of a random table."""
    schema = tiny_schema()
    batch = table_to_batch(tiny_table(64, 3, schema), schema)
    items = table_to_batch(tiny_table(39, 9, schema), schema).features
    items["item_id"] = torch.arange(1, 40)
    sig = runtime.signature
    item_state = runtime.item([items[n] for n in sig.item_features])
    out = []
    for r in range(rows):
        user = runtime.user([batch.features[n][r : r + 1] for n in sig.user_features])
        cross = [batch.features[n][:39] for n in sig.cross_features]
        out.append(runtime.score(user, item_state, cross).numpy())
    return np.stack(out)


@pytest.mark.parametrize("name", ["int_tower", "two_tower"])
def test_int8_scores_follow_float(name: str, request: pytest.FixtureRequest) -> None:
    graph_dir = (
        request.getfixturevalue("int_tower_artifact") / "graphs"
        if name == "int_tower"
        else request.getfixturevalue("two_tower_graphs")
    )
    paths = quantize_graphs(graph_dir)
    assert sorted(paths) == ["score.int8", "user.int8"] and all(p.is_file() for p in paths.values())
    sig = _signature(graph_dir)
    full = _logits(OnnxRuntime(graph_dir, sig))
    int8_rt = open_runtime("onnx-int8", graph_dir, sig)
    assert int8_rt.name == "onnx-int8" and "onnx-int8" in RUNTIMES
    low = _logits(int8_rt)
    assert np.isfinite(low).all()
    corr = np.corrcoef(full.ravel(), low.ravel())[0, 1]
    spread = full.max() - full.min()
    assert corr > 0.99 and np.abs(full - low).max() < 0.1 * spread, (corr, np.abs(full - low).max(), spread)


def test_report_sizes_and_weightless_score_graph(two_tower_graphs: Path) -> None:
    """The user graph's weight matrices shrink to int8; a dot-product score graph has none and is copied."""
    report = quantize_report(two_tower_graphs)
    assert report["user"].quantized > 0 and report["user"].int8_bytes < report["user"].float_bytes
    assert report["score"].quantized == 0
    assert report["score"].path.read_bytes() == (two_tower_graphs / "score.onnx").read_bytes()


def test_missing_graphs_and_unknown_precision(tmp_path: Path, two_tower_graphs: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no ONNX graphs"):
        quantize_graphs(tmp_path)
    with pytest.raises(ValueError, match="precision"):
        OnnxRuntime(two_tower_graphs, _signature(two_tower_graphs), precision="int4")


def test_add_int8_lists_files_and_serves(int_tower_artifact: Path, data: Path) -> None:
    manifest = json.loads((int_tower_artifact / "manifest.json").read_text())
    for g in ("user", "score"):
        name = f"{g}.int8.onnx"
        assert manifest["graphs"][name] == manifest["files"][f"graphs/{name}"]
    load_artifact(int_tower_artifact)  # every listed file verifies, the int8 ones included
    full = Scorer.load(int_tower_artifact)
    low = Scorer.load(int_tower_artifact, runtime="onnx-int8")
    assert low.runtime.name == "onnx-int8" and full.runtime.name == "onnx"
    schema = tiny_schema()
    rows = table_to_batch(tiny_table(8, 3, schema), schema)
    ids = pa.parquet.read_table(data / "items.parquet")["item_id"].to_pylist()
    cross = {
        f.name: [_plain(rows.features[f.name][i % 8], f.kind) for i in range(len(ids))] for f in schema.tower("cross")
    }
    for r in range(4):
        user = {f.name: _plain(rows.features[f.name][r], f.kind) for f in schema.tower("user", "context")}
        a = np.array(full.score(user, ids, cross=cross).scores)
        b = np.array(low.score(user, ids, cross=cross).scores)
        assert np.corrcoef(a, b)[0, 1] > 0.99


def _plain(v: torch.Tensor, kind: str) -> object:
    if kind == "dense":
        return float(v)
    if kind == "sequence":
        return [int(x) for x in v if x > 0]
    return int(v)
