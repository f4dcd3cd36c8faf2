"""int8 copies of a model's ONNX graphs: dynamic quantization of the user and score graphs for onnxruntime.

:func:`quantize_graphs` writes ``user.int8.onnx`` and ``score.int8.onnx`` next to ``user.onnx`` and ``score.onnx``:
the weights of every matrix product (``MatMul``, and ``Gemm``, which is first rewritten as ``MatMul`` + ``Add``
since onnxruntime's dynamic quantizer only handles ``MatMul``) are stored as int8 (QInt8, one scale per tensor),
and activations are quantized to uint8 per call (``DynamicQuantizeLinear``), so the products run in integer
arithmetic. Embedding tables (``Gather``) and every other op stay float32, and so do the outputs. The item graph is
not quantized: it runs offline, to build the item cache. A graph with no weight to quantize (a dot product of the
states) is copied unchanged; :func:`quantize_graphs` says so in its result.

The ``onnx-int8`` runtime (:class:`prerank.serve.runtime.OnnxRuntime` with ``precision="int8"``) runs these files.
:func:`add_int8` adds them to an exported artifact and to its manifest.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUANTIZED = ("user", "score")  # graphs run per request; the item graph runs offline (the item cache)
INT8_SUFFIX = ".int8.onnx"
OP_TYPES = ("MatMul",)  # after Gemm -> MatMul + Add


def int8_name(graph: str) -> str:
    """File name of the int8 copy of ``graph`` (``user.int8.onnx``)."""
    return f"{graph}{INT8_SUFFIX}"


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_graphs` did to one graph.

    Attributes:
        path: the int8 file written.
        quantized: number of weight matrices stored as int8 (0: the file is a plain copy).
        float_bytes: size of the float32 graph file.
        int8_bytes: size of the int8 file.
    """

    path: Path
    quantized: int
    float_bytes: int
    int8_bytes: int


def _gemm_as_matmul(model: Any) -> int:
    """Rewrite every ``Gemm`` whose B is an initializer (alpha = beta = 1, A not transposed) as ``MatMul`` (B stored
    as ``[K, N]``) followed by ``Add`` of C, in place. Returns the number rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        b = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if b is None or not plain:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(b)
        if attrs.get("transB", 0):
            w = w.T.copy()
        base = node.name or node.output[0]
        w_name = f"{b.name}__matmul_{rewritten}"
        graph.initializer.append(numpy_helper.from_array(w, w_name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{base}__matmul_out" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [product], name=f"{base}__matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{base}__bias"))
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        used = {i for n in graph.node for i in n.input}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return rewritten


def _weight_matmuls(model: Any) -> int:
    """``MatMul`` nodes whose second input is an initializer: what dynamic quantization turns into int8."""
    inits = {t.name for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits)


def quantize_graph(src: Path, dst: Path, *, per_channel: bool = False) -> QuantizeReport:
    """The int8 copy ``dst`` of the ONNX graph ``src`` (see the module docstring); a plain copy where the graph has
    no weight matrix."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    _gemm_as_matmul(model)
    n = _weight_matmuls(model)
    if n == 0:
        shutil.copyfile(src, dst)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "float.onnx"
            onnx.save(model, str(staged))
            quiet = logging.getLogger().level
            logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs advice on pre-processing per call
            try:
                quantize_dynamic(
                    staged,
                    dst,
                    op_types_to_quantize=list(OP_TYPES),
                    per_channel=per_channel,
                    weight_type=QuantType.QInt8,
                    extra_options={"MatMulConstBOnly": True},
                )
            finally:
                logging.getLogger().setLevel(quiet)
    return QuantizeReport(path=dst, quantized=n, float_bytes=src.stat().st_size, int8_bytes=dst.stat().st_size)


def quantize_graphs(graph_dir: Path, *, per_channel: bool = False) -> dict[str, Path]:
    """Write ``user.int8.onnx`` and ``score.int8.onnx`` beside the float graphs of ``graph_dir`` (see the module
    docstring). Returns ``{"user.int8": path, "score.int8": path}``; :func:`quantize_report` says what each holds."""
    return {f"{g}.int8": r.path for g, r in quantize_report(graph_dir, per_channel=per_channel).items()}


def quantize_report(graph_dir: Path, *, per_channel: bool = False) -> dict[str, QuantizeReport]:
    """:func:`quantize_graphs` with what it did per graph (``quantized == 0``: copied, nothing to quantize)."""
    graph_dir = Path(graph_dir)
    missing = [g for g in QUANTIZED if not (graph_dir / f"{g}.onnx").is_file()]
    if missing:
        raise FileNotFoundError(f"{graph_dir} has no ONNX graphs {missing} to quantize (export with format onnx)")
    return {
        g: quantize_graph(graph_dir / f"{g}.onnx", graph_dir / int8_name(g), per_channel=per_channel) for g in QUANTIZED
    }


def add_int8(artifact_dir: str | Path, *, per_channel: bool = False) -> dict[str, QuantizeReport]:
    """Add int8 copies of the user and score graphs to an exported artifact (``graphs/user.int8.onnx``,
    ``graphs/score.int8.onnx``) and list them in its manifest, under ``graphs`` (file name -> sha256) and ``files``
    (the manifest is rewritten atomically). Returns what :func:`quantize_report` says."""
    from prerank.io import atomic_write_text
    from prerank.serve.export import MANIFEST, file_sha256

    root = Path(artifact_dir)
    manifest = json.loads((root / MANIFEST).read_text())
    report = quantize_report(root / "graphs", per_channel=per_channel)
    for r in report.values():
        digest = file_sha256(r.path)
        manifest["graphs"][r.path.name] = digest
        manifest["files"][f"graphs/{r.path.name}"] = digest
    manifest["files"] = dict(sorted(manifest["files"].items()))
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return report
