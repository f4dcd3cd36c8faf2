"""Serving artifacts: a trained model's weights, config and schema plus its item cache, checked on load.

Layout of an artifact directory::

    ARTIFACT/manifest.json            format, model name, weights sha256, cache size, versions, created,
                                      and the sha256 of every other file
    ARTIFACT/model.json               registry name and model config
    ARTIFACT/schema.json              the :class:`~prerank.schema.Schema` the model was built on
    ARTIFACT/weights.pt               the state_dict (torch.save, read back with ``weights_only=True``)
    ARTIFACT/item_cache/cache.json    the stamp (weights sha256 the cache was built with), id feature, state keys,
                                      and the states stored as bfloat16
    ARTIFACT/item_cache/row_of_id.npy ``[V]`` int64: cache row of each item id, 0 = not in the catalogue
    ARTIFACT/item_cache/state-*.npy   one array per ``encode_item`` state key, ``[M + 1, ...]``

Row 0 of every state array is the encoding of the all-padding item (every item feature 0), i.e. what
the model knows about an unknown item; rows ``1..M`` follow the catalogue (``items.parquet``). Arrays
are ``.npy`` read with ``allow_pickle=False`` and written through memory maps chunk by chunk, so an
export holds one chunk of items in memory however large the catalogue is. With ``cache_dtype="bfloat16"`` the
float32 states are stored rounded to bfloat16 (as their int16 bits, which numpy can hold; ``cache.json`` lists
them): half the bytes per item, and the models read them back as float32.

The weights hash is a sha256 over the state_dict's names, dtypes, shapes and bytes (not over the file),
so it names the weights themselves; the cache carries it as its stamp and loading recomputes it from the
loaded weights, refusing a cache built for other weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import prerank
from prerank.data.batch import Batch
from prerank.data.parquet import BatchStream, ParquetSplit
from prerank.io import CheckpointError, atomic_torch_save, atomic_write_text, safe_torch_load
from prerank.models.base import PreRanker, State, gather_rows
from prerank.schema import Schema
from prerank.serve import pages
from prerank.train.checkpoint import load_model, model_from_payload

FORMAT = "prerank-artifact-v1"
CACHE_FORMAT = "prerank-item-cache-v1"
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


Allocate = Callable[[dict[str | None, pages.Spec]], dict[str | None, np.ndarray]]  # (shape, dtype) -> array per key


def _in_memory(specs: dict[str | None, pages.Spec]) -> dict[str | None, np.ndarray]:
    return dict(zip(specs, pages.zeros_many(list(specs.values())), strict=True))


def build_item_cache(
    model: PreRanker,
    data_dir: str | Path,
    *,
    chunk_rows: int = 8192,
    allocate: Allocate = _in_memory,
    id_feature: str = ID_FEATURE,
    cache_dtype: str = "float32",
) -> ItemCache:
    """Encode every item of ``data_dir/items.parquet`` with ``model.encode_item``, ``chunk_rows`` at a time.

    ``allocate(specs)`` provides the output arrays, given the ``(shape, dtype)`` of each (a state key, or None for
    the id -> row map): the default keeps them in memory (:func:`prerank.serve.pages.zeros_many`: one block, in huge
    pages where the OS grants them), :func:`export` passes memory maps on disk. ``cache_dtype`` (a key of
    :data:`CACHE_DTYPES`) is how float32 states are stored: ``"bfloat16"`` rounds them to nearest even (the
    allocated arrays then hold int16 bits, the returned cache bfloat16 views). Raises ``ValueError`` for an unknown
    ``cache_dtype``, a catalogue without ``id_feature``, with id 0 or with an id twice.
    """
    _check_cache_dtype(cache_dtype)
    halve = CACHE_DTYPES[cache_dtype] == torch.bfloat16
    schema = model.schema
    if id_feature not in schema or schema[id_feature].tower != "item" or schema[id_feature].kind != "categorical":
        raise ValueError(f"the item cache is keyed by {id_feature!r}, which must be a categorical item feature")
    split = ParquetSplit(data_dir, "items", schema)
    m = split.num_rows
    model.eval()
    with torch.inference_mode():
        unknown = model.encode_item(unknown_item(schema))
        rounded = {k for k, t in unknown.items() if halve and t.dtype == torch.float32}

        def stored(key: str, t: Tensor) -> np.ndarray:
            return (t.to(torch.bfloat16).view(torch.int16) if key in rounded else t).numpy()

        for key, t in unknown.items():
            if t.dtype not in _NPY_DTYPES:
                raise ValueError(f"item state {key!r} has dtype {t.dtype}, which the cache cannot store")
        first = {key: stored(key, t[0]) for key, t in unknown.items()}
        specs: dict[str | None, pages.Spec] = {None: ((schema.vocab(id_feature),), np.dtype(np.int64))}
        specs |= {key: ((m + 1, *row.shape), row.dtype) for key, row in first.items()}
        arrays = allocate(specs)
        row_of_id = arrays.pop(None)
        row_of_id[:] = 0
        for key, row in first.items():
            arrays[key][0] = row
        start = 1
        for batch in BatchStream(split, chunk_rows, shuffle=False, buffer_rows=chunk_rows):
            ids = batch.features[id_feature].numpy()
            if (ids == 0).any():
                raise ValueError(f"items.parquet has {id_feature} 0, which is reserved for unknown items")
            rows = np.arange(start, start + len(ids))
            uniq, counts = np.unique(ids, return_counts=True)
            dup = np.concatenate([ids[row_of_id[ids] != 0], uniq[counts > 1]])
            if dup.size:
                raise ValueError(f"items.parquet lists {id_feature} {int(dup[0])} more than once")
            row_of_id[ids] = rows
            for key, t in model.encode_item(batch).items():
                if key not in arrays or tuple(t.shape[1:]) != arrays[key].shape[1:]:
                    raise ValueError(f"encode_item state {key!r} changed keys or shape between batches")
                arrays[key][start : start + len(ids)] = stored(key, t)
            start += len(ids)
    return ItemCache(
        row_of_id=torch.from_numpy(np.asarray(row_of_id)),
        states={k: _as_state(torch.from_numpy(np.asarray(v)), k in rounded) for k, v in arrays.items()},
        id_feature=id_feature,
    )


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


def export(
    checkpoint: str | Path,
    data_dir: str | Path,
    out: str | Path,
    *,
    chunk_rows: int = 8192,
    cache_dtype: str = "float32",
) -> dict[str, Any]:
    """Export a checkpoint and the item cache of ``data_dir``'s catalogue to the artifact directory ``out``.

    ``cache_dtype``: how the cache stores float32 states (:func:`build_item_cache`). Refuses data whose features
    differ from the checkpoint's schema (its ids would mean other things). Returns the manifest.
    """
    _check_cache_dtype(cache_dtype)  # before the checkpoint is read
    name, model, _ = load_model(checkpoint)
    data_schema = Schema.load(data_dir)
    if data_schema.features != model.schema.features:
        raise ValueError(_schema_diff(model.schema, data_schema, f"checkpoint {checkpoint}", f"data {data_dir}"))
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    digest = weights_sha256(state_dict)
    with _atomic_dir(Path(out)) as tmp:
        atomic_torch_save(state_dict, tmp / "weights.pt")
        _write_json(tmp / "model.json", {"model_name": name, "model_config": asdict(model.config)})  # type: ignore[arg-type]
        model.schema.save(tmp / "schema.json")
        cache_dir = tmp / "item_cache"
        cache_dir.mkdir()
        state_files: dict[str, str] = {}
        maps: list[np.memmap] = []

        def allocate(specs: dict[str | None, pages.Spec]) -> dict[str | None, np.ndarray]:
            arrays = {}
            for key, (shape, dtype) in specs.items():
                fname = "row_of_id.npy"
                if key is not None:
                    fname = state_files[key] = f"state-{len(state_files):03d}.npy"
                maps.append(np.lib.format.open_memmap(cache_dir / fname, mode="w+", dtype=dtype, shape=shape))
                arrays[key] = maps[-1]
            return arrays

        cache = build_item_cache(model, data_dir, chunk_rows=chunk_rows, allocate=allocate, cache_dtype=cache_dtype)
        num_items = cache.num_items
        bfloat16_states = sorted(k for k, t in cache.states.items() if t.dtype == torch.bfloat16)
        del cache
        for mm in maps:
            mm.flush()
        maps.clear()
        _write_json(
            cache_dir / "cache.json",
            {
                "format": CACHE_FORMAT,
                "weights_sha256": digest,
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
            "num_items": num_items,
            "cache_dtype": cache_dtype,
            "prerank_version": prerank.__version__,
            "torch_version": torch.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {"checkpoint": str(checkpoint), "data": str(data_dir)},
            "files": {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        _write_json(tmp / MANIFEST, manifest)
    return manifest


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
    """A loaded, verified artifact: the model in eval mode, its item cache and its manifest."""

    name: str
    model: PreRanker
    cache: ItemCache
    manifest: dict[str, Any]


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


def load_artifact(path: str | Path, *, expected_schema: Schema | None = None) -> Artifact:
    """Load and verify an artifact (see the module docstring).

    Raises :class:`~prerank.io.CheckpointError` naming the problem: a missing file, a file whose sha256
    differs from the manifest (corrupt or truncated), an item cache whose stamp is not the hash of the
    loaded weights, weights that do not fit the schema, a cache whose shape does not fit the schema or
    model, or (with ``expected_schema``) an artifact whose features differ from it.
    """
    root = Path(path)
    what = f"artifact {root}"
    if not root.is_dir():
        raise CheckpointError(f"{what} does not exist or is not a directory")
    manifest = _read_json(root / MANIFEST, what)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{what}: manifest format is {manifest.get('format')!r}, expected {FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{what}: manifest lists no files")
    missing = sorted(f for f in files if not (root / f).is_file())
    if missing:
        raise CheckpointError(f"{what}: missing files {missing}")
    cache_info = _read_json(root / "item_cache" / "cache.json", what)
    state_dict = safe_torch_load(root / "weights.pt")
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{what}: weights.pt is not a state_dict")
    digest = weights_sha256(state_dict)
    if cache_info.get("weights_sha256") != digest:
        raise CheckpointError(
            f"{what}: item cache stamp {cache_info.get('weights_sha256')!r} does not match the model's weights "
            f"(sha256 {digest}); the cache was built for other weights, re-export the artifact"
        )
    if manifest.get("weights_sha256") != digest:
        raise CheckpointError(f"{what}: weights.pt (sha256 {digest}) is not the weights the manifest names")
    for rel, expected in files.items():
        if file_sha256(root / rel) != expected:
            raise CheckpointError(f"{what}: {rel} is corrupt or truncated (sha256 differs from the manifest)")

    model_info = _read_json(root / "model.json", what)
    try:
        schema = Schema.from_dict(_read_json(root / "schema.json", what))
    except ValueError as e:
        raise CheckpointError(f"{what}: schema.json is not a valid schema: {e}") from e
    if expected_schema is not None and schema.features != expected_schema.features:
        raise CheckpointError(_schema_diff(schema, expected_schema, what, "the expected schema"))
    payload = {**model_info, "schema": schema.to_dict(), "state_dict": state_dict}
    try:
        name, model = model_from_payload(payload, what)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: model.json does not describe a buildable model: {e}") from e
    cache = _load_cache(root, cache_info, model, what)
    return Artifact(name=name, model=model, cache=cache, manifest=manifest)


def _load_cache(root: Path, info: dict[str, Any], model: PreRanker, what: str) -> ItemCache:
    cache_dir = root / "item_cache"
    id_feature = info.get("id_feature", ID_FEATURE)
    if id_feature not in model.schema:
        raise CheckpointError(f"{what}: the cache's id feature {id_feature!r} is not in the schema")

    files = {k: cache_dir / str(f) for k, f in dict(info.get("states", {})).items()}
    try:  # one block for the whole cache, in huge pages where the OS grants them
        row_of_id, *arrays = pages.load_npys([cache_dir / str(info.get("row_of_id")), *files.values()])
    except pages.NpyError as e:
        raise CheckpointError(f"{what}: item_cache/{e.path.name} is corrupt: {e.reason}") from e
    row_of_id = torch.from_numpy(row_of_id)
    vocab = model.schema.vocab(id_feature)
    if row_of_id.shape != (vocab,):
        raise CheckpointError(
            f"{what}: item cache has {row_of_id.shape[0]} ids but the schema's {id_feature} vocabulary is {vocab}"
        )
    states = {k: torch.from_numpy(a) for k, a in zip(files, arrays, strict=True)}
    rounded = info.get("bfloat16_states", [])
    if not isinstance(rounded, list) or not set(rounded) <= set(states):
        raise CheckpointError(f"{what}: cache.json's bfloat16_states {rounded!r} are not among its states")
    for k in rounded:
        if states[k].dtype != torch.int16:
            raise CheckpointError(f"{what}: item cache state {k!r} holds {states[k].dtype}, not bfloat16 bits (int16)")
        states[k] = states[k].view(torch.bfloat16)
    with torch.inference_mode():
        expected = model.encode_item(unknown_item(model.schema))
    if set(states) != set(expected):
        raise CheckpointError(f"{what}: item cache keys {sorted(states)} differ from the model's {sorted(expected)}")
    rows = {int(v.shape[0]) for v in states.values()}
    if len(rows) != 1 or int(row_of_id.max()) >= rows.pop():
        raise CheckpointError(f"{what}: item cache arrays disagree on the number of items")
    for k, t in expected.items():
        row = t[0].to(states[k].dtype).to(t.dtype)  # as stored: rounded to bfloat16 in a bfloat16 cache
        if k in rounded and t.dtype != torch.float32:
            raise CheckpointError(f"{what}: item cache state {k!r} is bfloat16 but the model encodes it as {t.dtype}")
        if states[k].shape[1:] != t.shape[1:] or not torch.allclose(states[k][0].to(t.dtype), row, atol=1e-5):
            raise CheckpointError(f"{what}: item cache state {k!r} was not built by this model (row 0 differs)")
    return ItemCache(row_of_id=row_of_id, states=states, id_feature=id_feature)
