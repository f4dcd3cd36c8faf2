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


def _graphs(name: str, out: Path) -> tuple[torch.nn.Module, Signature]:
    torch.manual_seed(0)
    model = build_model(name, tiny_schema()).eval()
    save_graphs(model, out, ("onnx",))
    return model, Signature.from_dict(json.loads((out / "signature.json").read_text()))


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


@pytest.mark.parametrize("name", ["int_tower", "two_tower", "fit"])
def test_int8_scores_follow_float(name: str, tmp_path: Path) -> None:
    _, sig = _graphs(name, tmp_path)
    paths = quantize_graphs(tmp_path)
    assert sorted(paths) == ["score.int8", "user.int8"] and all(p.is_file() for p in paths.values())
    full = _logits(OnnxRuntime(tmp_path, sig))
    int8_rt = open_runtime("onnx-int8", tmp_path, sig)
    assert int8_rt.name == "onnx-int8" and "onnx-int8" in RUNTIMES
    low = _logits(int8_rt)
    assert np.isfinite(low).all()
    corr = np.corrcoef(full.ravel(), low.ravel())[0, 1]
    spread = full.max() - full.min()
    assert corr > 0.99 and np.abs(full - low).max() < 0.1 * spread, (corr, np.abs(full - low).max(), spread)


def test_report_sizes_and_weightless_score_graph(tmp_path: Path) -> None:
    """The user graph's weight matrices shrink to int8; a dot-product score graph has none and is copied."""
    _graphs("two_tower", tmp_path)
    report = quantize_report(tmp_path)
    assert report["user"].quantized > 0 and report["user"].int8_bytes < report["user"].float_bytes
    assert report["score"].quantized == 0
    assert report["score"].path.read_bytes() == (tmp_path / "score.onnx").read_bytes()


def test_missing_graphs_and_unknown_precision(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no ONNX graphs"):
        quantize_graphs(tmp_path)
    _, sig = _graphs("lr", tmp_path)
    with pytest.raises(ValueError, match="precision"):
        OnnxRuntime(tmp_path, sig, precision="int4")


def test_add_int8_lists_files_and_serves(tmp_path: Path) -> None:
    from test_artifact import write_serve_data

    data = write_serve_data(tmp_path / "data")
    torch.manual_seed(0)
    model = build_model("int_tower", tiny_schema()).eval()
    export_model("int_tower", model, data, tmp_path / "art", chunk_rows=8, formats=("onnx",))
    report = add_int8(tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    for r in report.values():
        assert manifest["graphs"][r.path.name] == manifest["files"][f"graphs/{r.path.name}"]
    full = Scorer.load(tmp_path / "art")
    low = Scorer.load(tmp_path / "art", runtime="onnx-int8")
    assert low.runtime.name == "onnx-int8"
    load_artifact(tmp_path / "art")  # every listed file still verifies
    schema = tiny_schema()
    rows = table_to_batch(tiny_table(8, 3, schema), schema)
    user = {f.name: _plain(rows.features[f.name][0], f.kind) for f in schema.tower("user", "context")}
    ids = pa.parquet.read_table(data / "items.parquet")["item_id"].to_pylist()
    cross = {f.name: [_plain(rows.features[f.name][i % 8], f.kind) for i in range(len(ids))] for f in schema.tower("cross")}
    a = np.array(full.score(user, ids, cross=cross).scores)
    b = np.array(low.score(user, ids, cross=cross).scores)
    assert np.corrcoef(a, b)[0, 1] > 0.99


def _plain(v: torch.Tensor, kind: str) -> object:
    if kind == "dense":
        return float(v)
    if kind == "sequence":
        return [int(x) for x in v if x > 0]
    return int(v)
