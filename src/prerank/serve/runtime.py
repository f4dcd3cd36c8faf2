"""Runtimes that run a model's three graphs (:mod:`prerank.serve.graphs`): the user tower, the item tower and the
scorer, each on flat tensors in :class:`~prerank.serve.graphs.Signature` order.

- ``eager``: the prerank model itself in PyTorch eager mode (needs prerank's model classes and the weights);
- ``torch``: the torch.export programs (``*.pt2``), loaded with :func:`torch.export.load`;
- ``onnx``:  the ONNX graphs (``*.onnx``) run by onnxruntime's CPU provider;
- ``onnx-int8``: as ``onnx``, with the int8 copies of the user and score graphs (``user.int8.onnx``,
  ``score.int8.onnx``, written by :func:`prerank.serve.quantize.quantize_graphs`) and the float item graph.

All but ``eager`` load without prerank's model classes. Every runtime returns float32 tensors; N = 1 rows are padded
to the graphs' smallest N (:func:`~prerank.serve.graphs.pad_rows`) and the copy dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from prerank.models.base import PreRanker, State, gather_rows
from prerank.serve.graphs import MIN_ROWS, SUFFIX, ScoreGraph, Signature, TowerGraph, pad_rows

RUNTIMES = ("eager", "torch", "onnx", "onnx-int8")
PRECISIONS = ("float32", "int8")  # of OnnxRuntime's user and score graphs
DEFAULT_RUNTIME = "onnx"


class Runtime(Protocol):
    """What the scorer and the item-cache builder call. Inputs and outputs are in signature order."""

    name: str
    signature: Signature

    def user(self, features: list[Tensor]) -> list[Tensor]:
        """User state tensors ``[1, ...]`` of one request's user-side features ``[1, ...]``."""
        ...

    def item(self, features: list[Tensor]) -> list[Tensor]:
        """Item state tensors ``[N, ...]`` of N items' features ``[N, ...]``."""
        ...

    def score(self, user: list[Tensor], item: list[Tensor], cross: list[Tensor]) -> Tensor:
        """Logits ``[N]``: user states ``[1, ...]``, item states and cross features ``[N, ...]``."""
        ...

    def request(self, user: list[Tensor], cache: State, rows: Tensor, cross: list[Tensor]) -> Tensor:
        """One served request: logits ``[N]`` of item-cache ``rows`` ``[N]`` (``cache``: every item state key
        ``[M + 1, ...]``) for one user's features ``[1, ...]`` and the candidates' cross features ``[N, ...]``."""
        ...


def _rows(tensors: list[Tensor]) -> int:
    return int(tensors[0].shape[0]) if tensors else 0


class _Graphs:
    """Shared padding of one-row inputs around three callables ``user``, ``item``, ``score`` on tensor lists."""

    name: str
    signature: Signature

    def _run(self, graph: str, inputs: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def user(self, features: list[Tensor]) -> list[Tensor]:
        return self._run("user", features)

    def item(self, features: list[Tensor]) -> list[Tensor]:
        n = _rows(features)
        out = self._run("item", pad_rows(features) if n < MIN_ROWS else features)
        return [t[:n] for t in out]

    def score(self, user: list[Tensor], item: list[Tensor], cross: list[Tensor]) -> Tensor:
        n = _rows(item)
        rows = [*item, *cross]
        if n < MIN_ROWS:
            rows = pad_rows(rows)
        return self._run("score", [*user, *rows])[0][:n]

    def request(self, user: list[Tensor], cache: State, rows: Tensor, cross: list[Tensor]) -> Tensor:
        item = gather_rows(cache, rows)
        return self.score(self.user(user), [item[k] for k in self.signature.item_state], cross)


class EagerRuntime(_Graphs):
    """The prerank model in eager mode (no export): the reference the exported graphs are checked against."""

    name = "eager"

    def __init__(self, model: PreRanker, signature: Signature):
        self.signature = signature
        model.eval()
        self.graphs = {
            "user": TowerGraph(model, signature, "user"),
            "item": TowerGraph(model, signature, "item"),
            "score": ScoreGraph(model, signature),
        }

    def _run(self, graph: str, inputs: list[Tensor]) -> list[Tensor]:
        with torch.inference_mode():
            out = self.graphs[graph](*inputs)
        return list(out) if isinstance(out, tuple) else [out]


class TorchExportRuntime(_Graphs):
    """torch.export programs ``user.pt2``, ``item.pt2``, ``score.pt2`` of ``graph_dir``."""

    name = "torch"

    def __init__(self, graph_dir: Path, signature: Signature):
        self.signature = signature
        self.graphs = {
            g: torch.export.load(graph_dir / f"{g}{SUFFIX['torch']}").module() for g in ("user", "item", "score")
        }

    def _run(self, graph: str, inputs: list[Tensor]) -> list[Tensor]:
        with torch.inference_mode():
            out = self.graphs[graph](*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]


class OnnxRuntime(_Graphs):
    """ONNX graphs ``user.onnx``, ``item.onnx``, ``score.onnx`` of ``graph_dir`` on onnxruntime's CPU provider, with
    ``threads`` intra-op threads (fixed per session) and full graph optimisation. ``precision="int8"`` runs the int8
    copies ``user.int8.onnx`` and ``score.int8.onnx`` instead (:mod:`prerank.serve.quantize`; the item graph stays
    float32) and names the runtime ``onnx-int8``."""

    name = "onnx"

    def __init__(self, graph_dir: Path, signature: Signature, threads: int = 1, precision: str = "float32"):
        import onnxruntime as ort

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.signature = signature
        self.precision = precision
        if precision == "int8":
            self.name = "onnx-int8"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # the three sessions run one after another: threads that spin between runs only take the cores from the
        # next session (2 threads on 2 cores were up to 2x slower than 1 with spinning on)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # errors only: shape-inference notes on dynamic N are not problems
        self.sessions = {}
        self.inputs: dict[str, list[str | None]] = {}
        for g in ("user", "item", "score"):
            suffix = ".int8.onnx" if precision == "int8" and g != "item" else SUFFIX["onnx"]
            sess = ort.InferenceSession(
                str(graph_dir / f"{g}{suffix}"), sess_options=opts, providers=["CPUExecutionProvider"]
            )
            self.sessions[g] = sess
            # the exporter drops inputs a graph never reads; feed only the ones it kept
            kept = {i.name for i in sess.get_inputs()}
            self.inputs[g] = [n if n in kept else None for n in signature.inputs(g)]

    def _run(self, graph: str, inputs: list[Tensor]) -> list[Tensor]:
        feed = {
            name: np.ascontiguousarray(t.numpy())
            for name, t in zip(self.inputs[graph], inputs, strict=True)
            if name is not None
        }
        return [torch.from_numpy(a) for a in self.sessions[graph].run(None, feed)]


def open_runtime(
    kind: str, graph_dir: Path, signature: Signature, *, model: PreRanker | None = None, threads: int = 1
) -> Runtime:
    """The runtime ``kind`` (one of :data:`RUNTIMES`) over ``graph_dir``; ``eager`` needs ``model``."""
    if kind == "eager":
        if model is None:
            raise ValueError("the eager runtime needs the model")
        return EagerRuntime(model, signature)
    if kind == "torch":
        return TorchExportRuntime(graph_dir, signature)
    if kind == "onnx":
        return OnnxRuntime(graph_dir, signature, threads=threads)
    if kind == "onnx-int8":
        return OnnxRuntime(graph_dir, signature, threads=threads, precision="int8")
    raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {kind!r}")
