"""Serving artifacts: a trained model as three exported graphs (user tower, item tower, scorer), the item cache that
the exported item tower wrote, and the weights for PyTorch eager; every file hashed in the manifest and checked on load.

Layout of an artifact directory::

    ARTIFACT/manifest.json            format, model name, schema and vocabulary sizes, the sha256 of each graph, of the
                                      weights and of the cache, versions, and the sha256 of every file
    ARTIFACT/model.json               registry name and model config (for the eager runtime)
    ARTIFACT/schema.json              the :class:`~prerank.schema.Schema` the model was built on
    ARTIFACT/vocab.json               the raw value of each id per feature, where the dataset has one (`prepare table`)
    ARTIFACT/weights.pt               the state_dict (torch.save, read back with ``weights_only=True``)
    ARTIFACT/graphs/signature.json    input and output names of every graph (:class:`~prerank.serve.graphs.Signature`)
    ARTIFACT/graphs/{user,item,score}.pt2   torch.export programs
    ARTIFACT/graphs/{user,item,score}.onnx  ONNX graphs (onnxruntime)
    ARTIFACT/item_cache/cache.json    the stamp (weights and item-graph sha256 the cache was built with), id feature,
                                      state keys, and the states stored as bfloat16
    ARTIFACT/item_cache/row_of_id.npy ``[V]`` int64: cache row of each item id, 0 = not in the catalogue
    ARTIFACT/item_cache/state-*.npy   one array per item state key, ``[M + 1, ...]``

Row 0 of every state array is the encoding of the all-padding item (every item feature 0), i.e. what the model
knows about an unknown item; rows ``1..M`` follow the catalogue (``items.parquet``). Arrays are ``.npy`` read with
``allow_pickle=False`` and written through memory maps chunk by chunk, so an export holds one chunk of items in
memory however large the catalogue is. With ``cache_dtype="bfloat16"`` the float32 states are stored rounded to
bfloat16 (as their int16 bits, which numpy can hold; ``cache.json`` lists them): half the bytes per item, read back
as float32 before scoring.

The graphs load without prerank's model classes (:mod:`prerank.serve.runtime`); the eager runtime rebuilds the model
from ``model.json`` and ``weights.pt``. The weights hash is a sha256 over the state_dict's names, dtypes, shapes and
bytes (not over the file), so it names the weights themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import prerank
from prerank.data.batch import Batch
from prerank.data.parquet import BatchStream, ParquetSplit, read_row_group
from prerank.io import CheckpointError, atomic_torch_save, atomic_write_text, safe_torch_load
from prerank.models.base import PreRanker, State, gather_rows
from prerank.schema import Schema
from prerank.serve.graphs import FORMATS, SUFFIX, Signature, save_graphs, signature
from prerank.serve.quantize import int8_name, quantize_graphs
from prerank.serve.runtime import DEFAULT_RUNTIME, RUNTIMES, EagerRuntime, Runtime, open_runtime
from prerank.train.checkpoint import load_model, model_from_payload

FORMAT = "prerank-artifact-v2"
CACHE_FORMAT = "prerank-item-cache-v2"
MANIFEST = "manifest.json"
ID_FEATURE = "item_id"

# numpy cannot hold bfloat16: a bfloat16 state is stored as its int16 bits (CACHE_DTYPES).
_NPY_DTYPES = {
    torch.float32,
    torch.float64,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.bool,
}
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # how an item cache stores float32 states


def _check_cache_dtype(cache_dtype: str) -> None:
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {cache_dtype!r}")


def weights_sha256(state_dict: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class ItemCache:
    """Cached ``encode_item`` states of a catalogue, gathered by item id.

    Attributes:
        row_of_id: ``[V]`` int64, the state row of each item id (0 = not cached).
        states: each key ``[M + 1, ...]``; row 0 is the unknown (all-padding) item.
        id_feature: the item feature whose values are the ids.
    """

    row_of_id: Tensor
    states: State
    id_feature: str = ID_FEATURE

    @property
    def num_items(self) -> int:
        return int(next(iter(self.states.values())).shape[0]) - 1

    @property
    def cache_dtype(self) -> str:
        """``"bfloat16"`` where the float states are stored rounded to bfloat16, else ``"float32"``."""
        return "bfloat16" if any(t.dtype == torch.bfloat16 for t in self.states.values()) else "float32"

    def rows(self, ids: Tensor) -> Tensor:
        """Cache rows ``[N]`` of item ids ``[N]`` (non-negative); 0 where an id is not cached."""
        vocab = self.row_of_id.shape[0]
        return torch.where(ids < vocab, self.row_of_id[ids.clamp_max(vocab - 1)], 0)

    def gather(self, rows: Tensor) -> State:
        """The item state of ``rows`` ``[N]``: every key ``[N, ...]`` (float32 where the cache holds bfloat16)."""
        return gather_rows(self.states, rows)

    def ids(self) -> Tensor:
        """Item ids in the cache, ``[M]``, in cache-row order."""
        ids = torch.nonzero(self.row_of_id).squeeze(-1)
        return ids[torch.argsort(self.row_of_id[ids])]


def unknown_item(schema: Schema) -> Batch:
    """One item row with every item feature at padding/unknown (0, empty sequence, 0.0)."""
    feats: dict[str, Tensor] = {}
    for f in schema.tower("item"):
        if f.kind == "dense":
            feats[f.name] = torch.zeros(1, dtype=torch.float32)
        elif f.kind == "sequence":
            feats[f.name] = torch.zeros(1, f.max_len, dtype=torch.int64)
        else:
            feats[f.name] = torch.zeros(1, dtype=torch.int64)
    return Batch(features=feats)


def _alloc_in_memory(specs: dict[str | None, tuple[tuple[int, ...], np.dtype]]) -> dict[str | None, np.ndarray]:
    return {k: np.zeros(shape, dtype=dtype) for k, (shape, dtype) in specs.items()}


def build_item_cache(
    encoder: PreRanker | Runtime,
    data_dir: str | Path,
    *,
    schema: Schema | None = None,
    chunk_rows: int = 8192,
    allocate: Any = _alloc_in_memory,
    id_feature: str = ID_FEATURE,
    cache_dtype: str = "float32",
) -> ItemCache:
    """Encode every item of ``data_dir/items.parquet`` with the item tower of ``encoder``, ``chunk_rows`` at a time.

    ``encoder`` is a runtime (:mod:`prerank.serve.runtime`; :func:`export` passes the exported item graph) or a model
    (run eagerly). ``schema`` defaults to the model's. ``allocate(specs)`` provides the output arrays given the
    ``(shape, dtype)`` of each (a state key, or None for the id -> row map): in memory by default, memory maps on disk
    in :func:`export`. ``cache_dtype`` (a key of :data:`CACHE_DTYPES`) is how float32 states are stored:
    ``"bfloat16"`` rounds them to nearest even (the arrays then hold int16 bits, the returned cache bfloat16 views).
    Raises ``ValueError`` for an unknown ``cache_dtype``, a catalogue without ``id_feature``, with id 0 or an id twice
    (:func:`check_catalogue`).
    """
    _check_cache_dtype(cache_dtype)
    if isinstance(encoder, PreRanker):
        schema = schema or encoder.schema
        encoder = EagerRuntime(encoder, signature(encoder))
    if schema is None:
        raise ValueError("build_item_cache needs the schema when it encodes with a runtime")
    sig = encoder.signature
    halve = CACHE_DTYPES[cache_dtype] == torch.bfloat16
    if id_feature not in schema or schema[id_feature].tower != "item" or schema[id_feature].kind != "categorical":
        raise ValueError(f"the item cache is keyed by {id_feature!r}, which must be a categorical item feature")

    def encode(batch: Batch) -> State:
        return dict(zip(sig.item_state, encoder.item([batch.features[n] for n in sig.item_features]), strict=True))

    split = check_catalogue(data_dir, schema, id_feature)
    m = split.num_rows
    unknown = encode(unknown_item(schema))
    rounded = {k for k, t in unknown.items() if halve and t.dtype == torch.float32}

    def stored(key: str, t: Tensor) -> np.ndarray:
        return (t.to(torch.bfloat16).view(torch.int16) if key in rounded else t).numpy()

    for key, t in unknown.items():
        if t.dtype not in _NPY_DTYPES:
            raise ValueError(f"item state {key!r} has dtype {t.dtype}, which the cache cannot store")
    first = {key: stored(key, t[0]) for key, t in unknown.items()}
    specs: dict[str | None, tuple[tuple[int, ...], np.dtype]] = {
        None: ((schema.vocab(id_feature),), np.dtype(np.int64))
    }
    specs |= {key: ((m + 1, *row.shape), row.dtype) for key, row in first.items()}
    arrays = allocate(specs)
    row_of_id = arrays.pop(None)
    row_of_id[:] = 0
    for key, row in first.items():
        arrays[key][0] = row
    start = 1
    for batch in BatchStream(split, chunk_rows, shuffle=False, buffer_rows=chunk_rows):
        ids = batch.features[id_feature].numpy()
        row_of_id[ids] = np.arange(start, start + len(ids))
        for key, t in encode(batch).items():
            if key not in arrays or tuple(t.shape[1:]) != arrays[key].shape[1:]:
                raise ValueError(f"item state {key!r} changed keys or shape between batches")
            arrays[key][start : start + len(ids)] = stored(key, t)
        start += len(ids)
    return ItemCache(
        row_of_id=torch.from_numpy(np.asarray(row_of_id)),
        states={k: _as_state(torch.from_numpy(np.asarray(v)), k in rounded) for k, v in arrays.items()},
        id_feature=id_feature,
    )


def check_catalogue(data_dir: str | Path, schema: Schema, id_feature: str = ID_FEATURE) -> ParquetSplit:
    """The catalogue ``data_dir/items.parquet`` checked before anything is encoded: every item feature present with
    a fitting type, and ``id_feature`` ids in the vocabulary, never 0 (reserved for unknown items) and each listed
    once. Reads only the id column, row group by row group (memory: one byte per id of the vocabulary).
    Raises ``ValueError`` (:class:`~prerank.data.parquet.DataError` / :class:`~prerank.schema.SchemaError`)."""
    split = ParquetSplit(data_dir, "items", schema)
    vocab = schema.vocab(id_feature)
    seen = np.zeros(vocab, dtype=bool)
    for g in split.row_groups:
        ids = read_row_group(g.path, g.index, [id_feature]).column(0).to_numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"items.parquet has {id_feature} ids outside its vocabulary [0, {vocab})")
        if (ids == 0).any():
            raise ValueError(f"items.parquet has {id_feature} 0, which is reserved for unknown items")
        uniq, counts = np.unique(ids, return_counts=True)
        dup = np.concatenate([uniq[seen[uniq]], uniq[counts > 1]])
        if dup.size:
            raise ValueError(f"items.parquet lists {id_feature} {int(dup[0])} more than once")
        seen[uniq] = True
    return split


def _as_state(t: Tensor, bfloat16: bool) -> Tensor:
    """A stored array as the cache state it holds: int16 bits viewed as bfloat16 where ``bfloat16``."""
    return t.view(torch.bfloat16) if bfloat16 else t


# ----------------------------------------------------------------------------------- export


@contextlib.contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on success it replaces ``out``.

    An existing artifact at ``out`` is kept until the new one is complete; a directory there that is
    not an artifact is never overwritten.
    """
    out = Path(out)
    if out.exists() and not (out / MANIFEST).exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a prerank artifact; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
            return
        # a directory cannot be swapped atomically: move the old one aside, put it back if the rename fails
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def _versions() -> dict[str, str]:
    out = {"prerank": prerank.__version__, "torch": torch.__version__}
    for name in ("onnx", "onnxruntime"):
        with contextlib.suppress(ImportError):
            out[name] = __import__(name).__version__
    return out


def _cache_sha256(file_hashes: dict[str, str]) -> str:
    """One sha256 over the cache's files, from each file's name and sha256, in name order."""
    h = hashlib.sha256()
    for name in sorted(file_hashes):
        h.update(f"{name}\0{file_hashes[name]}\0".encode())
    return h.hexdigest()


def export_model(
    name: str,
    model: PreRanker,
    data_dir: str | Path,
    out: str | Path,
    *,
    chunk_rows: int = 8192,
    cache_dtype: str = "float32",
    formats: tuple[str, ...] = FORMATS,
    int8: bool = False,
    source: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``model`` (registered as ``name``) and the item cache of ``data_dir``'s catalogue to the artifact
    directory ``out`` (replaced atomically): weights, the user/item/score graphs in every format of ``formats``
    (``"torch"``: torch.export ``.pt2``; ``"onnx"``), and the cache written by the exported item graph. ``int8`` adds
    int8 copies of the ONNX user and score graphs (:mod:`prerank.serve.quantize`, the ``onnx-int8`` runtime). Refuses
    data whose features differ from the model's schema (its ids would mean other things). Returns the manifest."""
    _check_cache_dtype(cache_dtype)
    if int8 and "onnx" not in formats:
        raise ValueError("int8 graphs are quantized ONNX graphs: export with the onnx format too")
    data_schema = Schema.load(data_dir)
    if data_schema.features != model.schema.features:
        raise ValueError(_schema_diff(model.schema, data_schema, f"model {name}", f"data {data_dir}"))
    check_catalogue(data_dir, model.schema)  # before the graphs, which take a while to export
    model.eval()
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    digest = weights_sha256(state_dict)
    with _atomic_dir(Path(out)) as tmp:
        atomic_torch_save(state_dict, tmp / "weights.pt")
        _write_json(tmp / "model.json", {"model_name": name, "model_config": asdict(model.config)})  # type: ignore[arg-type]
        model.schema.save(tmp / "schema.json")
        raw_values = (
            Path(data_dir) / "vocab.json"
        )  # raw value of each id, where the recipe wrote them (`prepare table`)
        if raw_values.is_file():
            shutil.copyfile(raw_values, tmp / "vocab.json")
        graph_dir = tmp / "graphs"
        written = save_graphs(model, graph_dir, formats)
        if int8:
            written |= quantize_graphs(graph_dir)
        sig = Signature.from_dict(json.loads((graph_dir / "signature.json").read_text()))
        graph_hashes = {p.name: file_sha256(p) for p in written.values()}
        writer = "torch" if "torch" in formats else "onnx"  # the exported item graph that writes the cache
        item_graph = f"item{SUFFIX[writer]}"
        cache_dir = tmp / "item_cache"
        cache_dir.mkdir()
        state_files: dict[str, str] = {}
        maps: list[np.memmap] = []

        def allocate(specs: dict[str | None, tuple[tuple[int, ...], np.dtype]]) -> dict[str | None, np.ndarray]:
            arrays = {}
            for key, (shape, dtype) in specs.items():
                fname = "row_of_id.npy"
                if key is not None:
                    fname = state_files[key] = f"state-{len(state_files):03d}.npy"
                maps.append(np.lib.format.open_memmap(cache_dir / fname, mode="w+", dtype=dtype, shape=shape))
                arrays[key] = maps[-1]
            return arrays

        runtime = open_runtime(writer, graph_dir, sig)
        cache = build_item_cache(
            runtime, data_dir, schema=model.schema, chunk_rows=chunk_rows, allocate=allocate, cache_dtype=cache_dtype
        )
        num_items = cache.num_items
        bfloat16_states = sorted(k for k, t in cache.states.items() if t.dtype == torch.bfloat16)
        del cache
        for mm in maps:
            mm.flush()
        maps.clear()
        cache_sha = _cache_sha256({p.name: file_sha256(p) for p in cache_dir.glob("*.npy")})
        _write_json(
            cache_dir / "cache.json",
            {
                "format": CACHE_FORMAT,
                "weights_sha256": digest,
                "written_by": item_graph,
                "item_graph_sha256": graph_hashes[item_graph],
                "cache_sha256": cache_sha,
                "id_feature": ID_FEATURE,
                "row_of_id": "row_of_id.npy",
                "states": state_files,
                "bfloat16_states": bfloat16_states,
            },
        )
        manifest = {
            "format": FORMAT,
            "model_name": name,
            "weights_sha256": digest,
            "graphs": graph_hashes,
            "graph_formats": list(formats),
            "signature": sig.to_dict(),
            "cache_sha256": cache_sha,
            "schema_sha256": file_sha256(tmp / "schema.json"),
            "vocabularies": {f.name: model.schema.vocab(f.name) for f in model.schema.features if f.kind != "dense"},
            "raw_vocabularies": "vocab.json" if raw_values.is_file() else None,
            "num_items": num_items,
            "cache_dtype": cache_dtype,
            "prerank_version": prerank.__version__,
            "versions": _versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source or {},
            "files": {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        _write_json(tmp / MANIFEST, manifest)
    return manifest


def export(
    checkpoint: str | Path,
    data_dir: str | Path,
    out: str | Path,
    *,
    chunk_rows: int = 8192,
    cache_dtype: str = "float32",
    formats: tuple[str, ...] = FORMATS,
    int8: bool = False,
) -> dict[str, Any]:
    """Export a checkpoint (:func:`export_model` of the model it holds). Returns the manifest."""
    _check_cache_dtype(cache_dtype)  # before the checkpoint is read
    name, model, _ = load_model(checkpoint)
    return export_model(
        name,
        model,
        data_dir,
        out,
        chunk_rows=chunk_rows,
        cache_dtype=cache_dtype,
        formats=formats,
        int8=int8,
        source={"checkpoint": str(checkpoint), "data": str(data_dir)},
    )


def _schema_diff(a: Schema, b: Schema, a_name: str, b_name: str) -> str:
    fa = {f.name: f for f in a.features}
    fb = {f.name: f for f in b.features}
    only_a, only_b = sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa))
    changed = sorted(n for n in set(fa) & set(fb) if fa[n] != fb[n])
    parts = [f"only in {a_name}: {only_a}"] if only_a else []
    parts += [f"only in {b_name}: {only_b}"] if only_b else []
    parts += [f"features that differ: {changed}"] if changed else []
    if not parts:
        parts = ["the features are in another order"]
    return f"schema mismatch between {a_name} and {b_name}: " + "; ".join(parts)


# ----------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Artifact:
    """A loaded, verified artifact: the runtime that runs its graphs, its item cache, schema and manifest; ``model``
    is the rebuilt prerank model for the eager (and native) runtime, else None."""

    name: str
    runtime: Runtime
    cache: ItemCache
    schema: Schema
    manifest: dict[str, Any]
    model: PreRanker | None = None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{what}: missing file {path.name} ({path})")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what}: {path.name} is corrupt (not valid JSON: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: {path.name} is corrupt (not a JSON object)")
    return obj


def load_artifact(
    path: str | Path,
    *,
    runtime: str = DEFAULT_RUNTIME,
    threads: int = 1,
    expected_schema: Schema | None = None,
    with_model: bool = False,
) -> Artifact:
    """Load and verify an artifact (see the module docstring) and open its graphs on ``runtime`` (one of
    :data:`~prerank.serve.runtime.RUNTIMES`, or ``"native"``: the optional C backend where the model has one, else
    eager). ``with_model`` also rebuilds the prerank model (always done for ``eager`` and ``native``).

    Raises :class:`~prerank.io.CheckpointError` naming the problem: a missing file, a file whose sha256 differs from
    the manifest (corrupt or truncated), a graph or cache whose hash is not the one the manifest names, a cache built
    by another item graph or other weights, a graph format the artifact lacks, weights that do not fit the schema, a
    cache whose shape does not fit the schema or graphs, or (with ``expected_schema``) other features than expected.
    """
    if runtime not in (*RUNTIMES, "native"):
        raise ValueError(f"runtime must be one of {[*RUNTIMES, 'native']}, got {runtime!r}")
    root = Path(path)
    what = f"artifact {root}"
    if not root.is_dir():
        raise CheckpointError(f"{what} does not exist or is not a directory")
    manifest = _read_json(root / MANIFEST, what)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{what}: manifest format is {manifest.get('format')!r}, expected {FORMAT!r}; re-export it with this "
            "version of prerank (`prerank export`)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{what}: manifest lists no files")
    missing = sorted(f for f in files if not (root / f).is_file())
    if missing:
        raise CheckpointError(f"{what}: missing files {missing}")
    for rel, expected in files.items():
        if file_sha256(root / rel) != expected:
            raise CheckpointError(f"{what}: {rel} is corrupt or truncated (sha256 differs from the manifest)")
    graphs = manifest.get("graphs", {})
    for fname, expected in graphs.items():
        if files.get(f"graphs/{fname}") != expected:
            raise CheckpointError(f"{what}: graph {fname} does not have the content hash the manifest names")
    cache_info = _read_json(root / "item_cache" / "cache.json", what)
    if cache_info.get("format") != CACHE_FORMAT:
        raise CheckpointError(f"{what}: item cache format is {cache_info.get('format')!r}, expected {CACHE_FORMAT!r}")
    if cache_info.get("item_graph_sha256") != graphs.get(str(cache_info.get("written_by"))):
        raise CheckpointError(f"{what}: the item cache was not written by this artifact's item graph; re-export it")
    if cache_info.get("weights_sha256") != manifest.get("weights_sha256"):
        raise CheckpointError(f"{what}: the item cache was built for other weights than the manifest names")
    cache_names = [str(cache_info.get("row_of_id")), *map(str, dict(cache_info.get("states", {})).values())]
    if _cache_sha256({n: str(files.get(f"item_cache/{n}")) for n in cache_names}) != manifest.get("cache_sha256"):
        raise CheckpointError(f"{what}: the item cache's content hash differs from the manifest's")
    try:
        schema = Schema.from_dict(_read_json(root / "schema.json", what))
        sig = Signature.from_dict(_read_json(root / "graphs" / "signature.json", what))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: schema.json or graphs/signature.json is not valid: {e}") from e
    if expected_schema is not None and schema.features != expected_schema.features:
        raise CheckpointError(_schema_diff(schema, expected_schema, what, "the expected schema"))
    unknown = [n for n in (*sig.user_features, *sig.item_features, *sig.cross_features) if n not in schema]
    if unknown:
        raise CheckpointError(f"{what}: the graphs read features {unknown} that its schema lacks")

    model = None
    if with_model or runtime in ("eager", "native"):
        model = _load_model(root, schema, manifest, what)
    needed = {
        "torch": [f"{g}{SUFFIX['torch']}" for g in ("user", "item", "score")],
        "onnx": [f"{g}{SUFFIX['onnx']}" for g in ("user", "item", "score")],
        "onnx-int8": [int8_name("user"), "item.onnx", int8_name("score")],
    }.get(runtime, [])
    lacking = [f for f in needed if f not in graphs]
    if lacking:
        raise CheckpointError(f"{what} has no {runtime} graphs {lacking} (exported graphs: {sorted(graphs)})")
    run = _open(runtime, root / "graphs", sig, model, threads, what)
    cache = _load_cache(root, cache_info, schema, run, what)
    return Artifact(
        name=str(manifest.get("model_name")), runtime=run, cache=cache, schema=schema, manifest=manifest, model=model
    )


def _load_model(root: Path, schema: Schema, manifest: dict[str, Any], what: str) -> PreRanker:
    state_dict = safe_torch_load(root / "weights.pt")
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{what}: weights.pt is not a state_dict")
    digest = weights_sha256(state_dict)
    if manifest.get("weights_sha256") != digest:
        raise CheckpointError(f"{what}: weights.pt (sha256 {digest}) is not the weights the manifest names")
    model_info = _read_json(root / "model.json", what)
    payload = {**model_info, "schema": schema.to_dict(), "state_dict": state_dict}
    try:
        _, model = model_from_payload(payload, what)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: model.json does not describe a buildable model: {e}") from e
    return model.eval()


def _open(kind: str, graph_dir: Path, sig: Signature, model: PreRanker | None, threads: int, what: str) -> Runtime:
    if kind == "native":
        from prerank.serve.native import open_native

        assert model is not None
        return open_native(model, sig, threads=threads) or EagerRuntime(model, sig)
    try:
        return open_runtime(kind, graph_dir, sig, model=model, threads=threads)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{what}: its {kind} graphs cannot be loaded: {e}") from e


def _load_cache(root: Path, info: dict[str, Any], schema: Schema, runtime: Runtime, what: str) -> ItemCache:
    cache_dir = root / "item_cache"
    id_feature = info.get("id_feature", ID_FEATURE)
    if id_feature not in schema:
        raise CheckpointError(f"{what}: the cache's id feature {id_feature!r} is not in the schema")
    files = {k: cache_dir / str(f) for k, f in dict(info.get("states", {})).items()}
    arrays = {}
    for key, p in {None: cache_dir / str(info.get("row_of_id")), **files}.items():
        try:
            arrays[key] = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{what}: item_cache/{p.name} is corrupt: {e}") from e
    row_of_id = torch.from_numpy(arrays.pop(None))
    vocab = schema.vocab(id_feature)
    if row_of_id.shape != (vocab,) or row_of_id.dtype != torch.int64:
        raise CheckpointError(
            f"{what}: item cache has {row_of_id.shape[0]} ids but the schema's {id_feature} vocabulary is {vocab}"
        )
    states = {k: torch.from_numpy(a) for k, a in arrays.items()}
    rounded = info.get("bfloat16_states", [])
    if not isinstance(rounded, list) or not set(rounded) <= set(states):
        raise CheckpointError(f"{what}: cache.json's bfloat16_states {rounded!r} are not among its states")
    for k in rounded:
        if states[k].dtype != torch.int16:
            raise CheckpointError(f"{what}: item cache state {k!r} holds {states[k].dtype}, not bfloat16 bits (int16)")
        states[k] = states[k].view(torch.bfloat16)
    sig = runtime.signature
    if set(states) != set(sig.item_state):
        raise CheckpointError(
            f"{what}: item cache keys {sorted(states)} differ from the graphs' {list(sig.item_state)}"
        )
    rows = {int(v.shape[0]) for v in states.values()}
    if len(rows) != 1 or int(row_of_id.max()) >= rows.pop() or int(row_of_id.min()) < 0:
        raise CheckpointError(f"{what}: item cache arrays disagree on the number of items")
    unknown = unknown_item(schema)
    expected = runtime.item([unknown.features[n] for n in sig.item_features])
    for k, t in zip(sig.item_state, expected, strict=True):
        row = t[0].to(states[k].dtype).to(t.dtype)  # as stored: rounded to bfloat16 in a bfloat16 cache
        if states[k].shape[1:] != t.shape[1:] or not torch.allclose(states[k][0].to(t.dtype), row, atol=1e-5):
            raise CheckpointError(f"{what}: item cache state {k!r} was not built by these graphs (row 0 differs)")
    return ItemCache(row_of_id=row_of_id, states=states, id_feature=id_feature)
