"""Per-tower graphs of a model: the user tower, the item tower and the scorer as flat-tensor modules, and their
export to torch.export programs (``.pt2``) and ONNX (``.onnx``) that load without prerank's model classes.

The contract of DESIGN.md splits every model into three functions; each becomes one graph with plain tensor inputs
and outputs, in the order :class:`Signature` records:

- ``user``:  user and context features of one request ``[1, ...]``        -> user state tensors ``[1, ...]``
- ``item``:  item features of N items ``[N, ...]``                        -> item state tensors ``[N, ...]``
- ``score``: user states ``[1, ...]``, item states ``[N, ...]`` and cross
  features ``[N, ...]``                                                    -> logits ``[N]``

N is a dynamic dimension of at least :data:`MIN_ROWS`: torch.export specialises a dimension of size 1, so a
runtime pads a single candidate to two rows and drops the copy (:func:`pad_rows`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.models.base import FeatureSelection, PreRanker
from prerank.schema import FeatureSpec, Schema

MIN_ROWS = 2
FORMATS = ("torch", "onnx")  # what export can write: torch.export programs and ONNX
SUFFIX = {"torch": ".pt2", "onnx": ".onnx"}
GRAPHS = ("user", "item", "score")
ONNX_OPSET = 18


@dataclass(frozen=True)
class Signature:
    """Names of each graph's inputs and outputs, in order.

    Attributes:
        user_features: user and context features the user graph reads.
        item_features: item features the item graph reads.
        cross_features: cross features the score graph reads per candidate.
        user_state: the user graph's outputs (keys of ``encode_user``), the score graph's first inputs.
        item_state: the item graph's outputs (keys of ``encode_item``), the score graph's next inputs.
    """

    user_features: tuple[str, ...]
    item_features: tuple[str, ...]
    cross_features: tuple[str, ...]
    user_state: tuple[str, ...]
    item_state: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, list[str]]) -> Signature:
        return cls(**{k: tuple(d[k]) for k in cls.__dataclass_fields__})

    def inputs(self, graph: str) -> tuple[str, ...]:
        """Input names of ``graph`` (state inputs of the score graph are prefixed ``user.`` and ``item.``)."""
        if graph == "user":
            return self.user_features
        if graph == "item":
            return self.item_features
        return (
            tuple(f"user.{k}" for k in self.user_state)
            + tuple(f"item.{k}" for k in self.item_state)
            + self.cross_features
        )

    def outputs(self, graph: str) -> tuple[str, ...]:
        return {"user": self.user_state, "item": self.item_state, "score": ("logits",)}[graph]


def features_read(model: PreRanker) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """User-side, item and cross features the model reads: its ``sel`` where it keeps one, else the schema's."""
    sel = getattr(model, "sel", None)
    if isinstance(sel, FeatureSelection):
        return sel.user, sel.item, sel.cross
    s = model.schema
    names = lambda *towers: tuple(f.name for f in s.tower(*towers))  # noqa: E731
    return names("user", "context"), names("item"), names("cross")


def unknown_rows(f: FeatureSpec, n: int) -> Tensor:
    """``n`` rows of feature ``f`` at padding/unknown: id 0, an empty sequence, 0.0."""
    if f.kind == "dense":
        return torch.zeros(n, dtype=torch.float32)
    return torch.zeros((n, f.max_len) if f.kind == "sequence" else (n,), dtype=torch.int64)


def example_features(schema: Schema, names: tuple[str, ...], n: int) -> tuple[Tensor, ...]:
    """Inputs to trace with: ``n`` rows of each feature, ids 1 where the vocabulary has them (not all padding, so a
    masked pooling sees a real row)."""
    out = []
    for name in names:
        t = unknown_rows(schema[name], n)
        if t.dtype == torch.int64 and schema.vocab(name) > 1:
            t = t + 1
        out.append(t)
    return tuple(out)


class TowerGraph(nn.Module):
    """One tower over flat feature tensors -> its state tensors in signature order: ``encode_user`` of one request's
    user-side features ``[1, ...]`` (``side="user"``) or ``encode_item`` of N items' features ``[N, ...]``."""

    def __init__(self, model: PreRanker, sig: Signature, side: str):
        super().__init__()
        self.model, self.side = model, side
        self.names, self.keys = (
            (sig.user_features, sig.user_state) if side == "user" else (sig.item_features, sig.item_state)
        )

    def forward(self, *features: Tensor) -> tuple[Tensor, ...]:
        batch = Batch(features=dict(zip(self.names, features, strict=True)))
        state = self.model.encode_user(batch) if self.side == "user" else self.model.encode_item(batch)
        return tuple(state[k] for k in self.keys)


class ScoreGraph(nn.Module):
    """``score(user, item, pair)``: user states ``[1, ...]``, item states ``[N, ...]``, cross features ``[N, ...]``
    (flat, in signature order) -> logits ``[N]``."""

    def __init__(self, model: PreRanker, sig: Signature):
        super().__init__()
        self.model, self.sig = model, sig

    def forward(self, *inputs: Tensor) -> Tensor:
        nu, ni = len(self.sig.user_state), len(self.sig.item_state)
        user = dict(zip(self.sig.user_state, inputs[:nu], strict=True))
        item = dict(zip(self.sig.item_state, inputs[nu : nu + ni], strict=True))
        cross = inputs[nu + ni :]
        pair = Batch(features=dict(zip(self.sig.cross_features, cross, strict=True))) if cross else None
        return self.model.score(user, item, pair)


def signature(model: PreRanker) -> Signature:
    """The graphs' signature of ``model`` (runs both encoders once on unknown rows to learn the state keys)."""
    user_f, item_f, cross_f = features_read(model)
    s = model.schema
    with torch.inference_mode():
        u = model.encode_user(Batch(features=dict(zip(user_f, example_features(s, user_f, 1), strict=True))))
        i = model.encode_item(Batch(features=dict(zip(item_f, example_features(s, item_f, MIN_ROWS), strict=True))))
    return Signature(user_f, item_f, cross_f, tuple(sorted(u)), tuple(sorted(i)))


def graph_module(model: PreRanker, sig: Signature, graph: str) -> tuple[nn.Module, tuple[Tensor, ...], tuple]:
    """The module of ``graph``, example inputs to trace it with, and the dynamic shapes of those inputs."""
    s, n = model.schema, MIN_ROWS + 1
    rows = torch.export.Dim("n", min=MIN_ROWS)
    if graph == "user":
        return (
            TowerGraph(model, sig, "user"),
            example_features(s, sig.user_features, 1),
            (None,) * len(sig.user_features),
        )
    item_args = example_features(s, sig.item_features, n)
    if graph == "item":
        return TowerGraph(model, sig, "item"), item_args, tuple({0: rows} for _ in item_args)
    with torch.no_grad():
        user = TowerGraph(model, sig, "user")(*example_features(s, sig.user_features, 1))
        item = TowerGraph(model, sig, "item")(*item_args)
    cross = example_features(s, sig.cross_features, n)
    dyn = (None,) * len(user) + tuple({0: rows} for _ in (*item, *cross))
    return ScoreGraph(model, sig), (*user, *item, *cross), dyn


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints and warnings (their errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_program(model: PreRanker, sig: Signature, graph: str) -> torch.export.ExportedProgram:
    """``graph`` of ``model`` (in eval mode) as a torch.export program with a dynamic row dimension.

    A program keeps every parameter of the module it was traced from, read or not; so the parameters this graph
    never reads (the item tower's in the user graph, the embedding tables in the score graph) are replaced by empty
    tensors on a copy of the model and the graph traced again, and each ``.pt2`` holds only its own weights.
    """
    module, args, dyn = graph_module(copy.deepcopy(model).eval(), sig, graph)
    shapes = {"inputs" if graph == "score" else "features": dyn}
    with _quiet():
        program = torch.export.export(module, args, dynamic_shapes=shapes)
        unused = _unused_weights(program)
        # a tensor shared by two modules (sync_distill's embedding tables) is listed under each name; keep it when
        # any of its names is read
        named = dict(module.named_parameters(remove_duplicate=False)) | dict(
            module.named_buffers(remove_duplicate=False)
        )
        read = {id(t) for n, t in named.items() if n not in set(unused)}
        unused = [n for n in unused if id(named.get(n)) not in read]
        if not unused:
            return program
        for name in unused:
            path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(path)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(torch.empty(0), requires_grad=False)
            else:
                owner._buffers[leaf] = torch.empty(0)
        return torch.export.export(module, args, dynamic_shapes=shapes)


def _unused_weights(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the parameters and buffers a program's graph never reads."""
    from torch.export.graph_signature import InputKind

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    return [
        spec.target
        for spec in program.graph_signature.input_specs
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER)
        and spec.target is not None
        and not placeholders[spec.arg.name].users
    ]


def save_graphs(model: PreRanker, out_dir: Path, formats: tuple[str, ...] = FORMATS) -> dict[str, Path]:
    """Write every graph of ``model`` in every format to ``out_dir`` (``user.pt2``, ``user.onnx``, ...) and the
    signature to ``signature.json``. Returns ``{"user.torch": path, ...}``.

    Raises ``ValueError`` for an unknown format and ``RuntimeError`` naming the graph that failed to export.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ValueError(f"graph formats must be among {list(FORMATS)}, got {list(formats)}")
    sig = signature(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "signature.json").write_text(json.dumps(sig.to_dict(), indent=2))
    written: dict[str, Path] = {}
    for graph in GRAPHS:
        try:
            program = export_program(model, sig, graph)
        except Exception as e:  # torch.export raises many types; name the graph
            raise RuntimeError(f"the {graph} graph of {type(model).__name__} cannot be exported: {e}") from e
        if "torch" in formats:
            written[f"{graph}.torch"] = path = out_dir / f"{graph}.pt2"
            torch.export.save(program, path)
        if "onnx" in formats:
            written[f"{graph}.onnx"] = path = out_dir / f"{graph}.onnx"
            _save_onnx(program, sig, graph, path)
    return written


def _save_onnx(program: torch.export.ExportedProgram, sig: Signature, graph: str, path: Path) -> None:
    """ONNX of an exported program, inputs and outputs named as :class:`Signature` says."""
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                program,
                input_names=list(sig.inputs(graph)),
                output_names=list(sig.outputs(graph)),
                opset_version=ONNX_OPSET,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
            onnx_program.save(str(path))
    except Exception as e:
        raise RuntimeError(f"the {graph} graph cannot be converted to ONNX: {e}") from e


def pad_rows(rows: list[Tensor]) -> list[Tensor]:
    """Per-row inputs (item states, cross features) of one row repeated to :data:`MIN_ROWS`, the graphs' smallest N;
    the caller keeps the first output."""
    return [t.expand(MIN_ROWS, *t.shape[1:]).contiguous() if t.shape[0] == 1 else t for t in rows]
