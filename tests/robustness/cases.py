"""The robustness suite's case table: one row per bad input, what prerank promises for it, what the suite asserts.

Each :class:`Case` prepares its bad input inside a :class:`Workspace` (a fresh copy of a tiny dataset, a finished
training run and an exported artifact) and returns the ``prerank`` command line that meets it. The suite
(``test_cases.py``) runs every command in-process through typer's ``CliRunner`` and checks, for an error case: exit
status 2, one ``error:`` line naming the problem (:attr:`Case.match`), no traceback, every file that existed before
the command keeps its bytes, no temporary file is left behind, and no marker file was created by a malicious
pickle. An accepted case (:attr:`Case.ok`) must exit 0 and leave the existing files alone just the same.
:class:`HttpCase` rows are requests to a running service (status code and the field the error names).

``docs/robustness.md`` is generated from this table (``python -m tests.robustness.table``); a test keeps it current.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: Flags that make a training command take about a second on the tiny dataset.
FAST = ["--epochs", "1", "--batch-size", "128", "--threads", "1", "--no-progress"]
#: The row every data corruption hits: in the train split's last row group, so training has taken steps before.
BAD_ROW = 450


@dataclass(frozen=True)
class Workspace:
    """One case's folder: copies it may damage, plus read-only extras shared by all cases.

    ``data``: the tiny dataset (``schema.json``, ``train/valid/test``, ``items.parquet``); ``run``: a finished
    ``prerank train --model lr`` run on it (``best.pt``, ``last.pt``, ``metrics.jsonl``, ``test.json``); ``art``: the
    run's exported artifact; ``extras``: ``two_tower.pt`` (another model), ``other.pt`` (an LR of other weights),
    ``other-art`` (its artifact) and ``other-data`` (a dataset with another schema).
    """

    root: Path
    data: Path
    run: Path
    art: Path
    extras: Path

    @property
    def marker(self) -> Path:
        """The file a malicious pickle would create when loaded."""
        return self.root / "pwned"

    def part(self, split: str = "train") -> Path:
        if split == "items":
            return self.data / "items.parquet"
        return next(iter(sorted((self.data / split).glob("*.parquet"))))

    def edit(self, fn: Callable[[pa.Table], pa.Table], split: str = "train") -> None:
        """Rewrite one Parquet file of ``split`` with ``fn(table)``."""
        path = self.part(split)
        pq.write_table(fn(pq.read_table(path)), path, row_group_size=100)

    def schema(self, fn: Callable[[dict], Any]) -> None:
        """Rewrite ``schema.json`` with ``fn(dict)`` (in place, or return a replacement)."""
        path = self.data / "schema.json"
        d = json.loads(path.read_text())
        d = fn(d) or d
        path.write_text(d if isinstance(d, str) else json.dumps(d))

    def train(self, *extra: str, data: Path | None = None, out: Path | None = None, model: str = "lr") -> list[str]:
        return [
            "train",
            "--model",
            model,
            "--data",
            str(data or self.data),
            "--out",
            str(out or self.run),
            *FAST,
            *extra,
        ]

    def config(self, text: str) -> str:
        path = self.root / "run.yaml"
        path.write_text(text)
        return str(path)


# ----------------------------------------------------------------------------------- input makers


def put(table: pa.Table, name: str, value: Any, row: int = BAD_ROW) -> pa.Table:
    """``table`` with column ``name``'s value at ``row`` replaced (the column keeps its type)."""
    i = table.schema.get_field_index(name)
    values = table.column(name).to_pylist()
    values[row] = value
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def cast(table: pa.Table, name: str, type_: pa.DataType, fn: Callable[[Any], Any] = lambda v: v) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, pa.field(name, type_), pa.array([fn(v) for v in table.column(name).to_pylist()], type_))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_bytes(path: Path) -> None:
    """Overwrite the middle third of a file with garbage (the footer stays intact)."""
    data = bytearray(path.read_bytes())
    n = len(data)
    data[n // 3 : 2 * n // 3] = bytes((i * 37 + 11) % 256 for i in range(n // 3, 2 * n // 3))
    path.write_bytes(bytes(data))


class _Boom:
    """Unpickling this object opens (creates) the marker file: what any pickle may do when loaded unsafely."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def evil_pickle(path: Path, marker: Path, *, torch_format: bool = True) -> None:
    """A checkpoint-looking file whose loading with full pickle would create ``marker``."""
    payload = {"format": "prerank-checkpoint-v1", "model_name": "lr", "state_dict": {}, "hook": _Boom(marker)}
    if torch_format:
        import torch

        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


def rehash(art: Path) -> None:
    """Re-stamp the manifest's file and cache hashes for the files as they are now (a careless copy tool), so the
    checks behind the hashes are what the case meets."""
    from prerank.serve.export import _cache_sha256, file_sha256

    path = art / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = {rel: file_sha256(art / rel) for rel in manifest["files"]}
    cache = json.loads((art / "item_cache" / "cache.json").read_text())
    names = [cache["row_of_id"], *cache["states"].values()]
    manifest["cache_sha256"] = _cache_sha256({n: manifest["files"][f"item_cache/{n}"] for n in names})
    path.write_text(json.dumps(manifest))


def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _shrink_vocab(art: Path) -> None:
    np.save(art / "item_cache" / "row_of_id.npy", np.load(art / "item_cache" / "row_of_id.npy")[:-5])
    rehash(art)


def _export(ws: Workspace, checkpoint: Path | None = None, data: Path | None = None, *extra: str) -> list[str]:
    ckpt = checkpoint or ws.run / "best.pt"
    args = ["export", "--checkpoint", str(ckpt), "--data", str(data or ws.data), "--out", str(ws.art)]
    return [*args, "--formats", "torch", *extra]


def _serve(ws: Workspace, *extra: str) -> list[str]:
    """``prerank serve`` of the workspace's artifact (exported as torch.export graphs only: onnx export is slow)."""
    return ["serve", str(ws.art), *(extra or ("--runtime", "torch"))]


def _evaluate(ws: Workspace, checkpoint: Path) -> list[str]:
    return ["evaluate", "--checkpoint", str(checkpoint), "--data", str(ws.data)]


def _teacher(ws: Workspace, checkpoint: Path | None = None) -> list[str]:
    return ["teacher", "score", "--teacher", str(checkpoint or ws.run / "best.pt"), "--data", str(ws.data)]


def _write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _readonly(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o555)
    return path


def _bare_state_dict(ws: Workspace) -> Path:
    import torch

    path = ws.root / "weights.pt"
    torch.save(torch.load(ws.run / "best.pt", weights_only=True)["state_dict"], path)
    return path


def _relabel(ws: Workspace, name: str) -> Path:
    import torch

    ckpt = torch.load(ws.run / "best.pt", weights_only=True)
    ckpt["model_name"] = name
    path = ws.root / f"as-{name}.pt"
    torch.save(ckpt, path)
    return path


def _evil(ws: Workspace, path: Path, *, torch_format: bool = True) -> Path:
    evil_pickle(path, ws.marker, torch_format=torch_format)
    return path


def _evil_then(ws: Workspace, path: Path, argv: list[str]) -> list[str]:
    _evil(ws, path)
    return argv


def _swap_cache(ws: Workspace) -> None:
    shutil.rmtree(ws.art / "item_cache")
    shutil.copytree(ws.extras / "other-art" / "item_cache", ws.art / "item_cache")
    rehash(ws.art)


# ----------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    area: str
    input: str
    expected: str
    argv: Callable[[Workspace], list[str]] = field(repr=False)
    #: text the error must contain (compared with whitespace collapsed: rich wraps long lines)
    match: str = ""
    #: an accepted input: exit 0 (and still nothing existing damaged)
    ok: bool = False
    #: the command, as the docs table names it
    command: str = ""
    #: a chmod case: root writes anywhere, so it is skipped there
    needs_non_root: bool = False

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError(f"case {self.id} names no command")


def _c(id: str, area: str, command: str, input: str, expected: str, argv: Callable, match: str = "", **kw: Any) -> Case:
    return Case(id, area, input, expected, argv, match, command=command, **kw)


def _then(action: Callable[[Workspace], Any], argv: Callable[[Workspace], list[str]]) -> Callable:
    def run(ws: Workspace) -> list[str]:
        action(ws)
        return argv(ws)

    return run


_train = Workspace.train
NAMES_PROBLEM = "exit 2 with one line naming the problem"

CASES: tuple[Case, ...] = (
    # ------------------------------------------------------------------ data
    _c(
        "missing-feature-column",
        "data",
        "train",
        "a feature of schema.json is missing from a train file",
        NAMES_PROBLEM + " (the file and the column)",
        _then(lambda ws: ws.edit(lambda t: t.drop_columns(["age"])), _train),
        "columns ['age'] named by the schema are missing",
    ),
    _c(
        "missing-label-column",
        "data",
        "train",
        "the label column is missing",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: t.drop_columns(["label"])), _train),
        "['label']",
    ),
    _c(
        "missing-item-column",
        "data",
        "export",
        "the item catalogue lacks an item feature",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: t.drop_columns(["category_id"]), "items"), _export),
        "columns ['category_id'] named by the schema are missing",
    ),
    _c(
        "extra-column",
        "data",
        "train",
        "a column the schema does not name (e.g. a raw timestamp)",
        "accepted: columns outside the schema are not read",
        _then(
            lambda ws: ws.edit(lambda t: t.append_column("raw_ts", pa.array(np.arange(t.num_rows)))),
            lambda ws: ws.train(out=ws.root / "new-run"),
        ),
        ok=True,
    ),
    _c(
        "duplicated-rows",
        "data",
        "train",
        "the same rows twice in the train split",
        "accepted: a log may repeat an impression",
        _then(
            lambda ws: ws.edit(lambda t: pa.concat_tables([t, t.slice(0, 50)])),
            lambda ws: ws.train(out=ws.root / "new-run"),
        ),
        ok=True,
    ),
    _c(
        "duplicated-item-id",
        "data",
        "export",
        "an item id listed twice in items.parquet",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "item_id", 1, row=5), "items"), _export),
        "more than once",
    ),
    _c(
        "item-id-zero",
        "data",
        "export",
        "item id 0 (padding) in items.parquet",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "item_id", 0, row=5), "items"), _export),
        "reserved for unknown",
    ),
    _c(
        "string-ids",
        "data",
        "train",
        "a categorical column stored as strings",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: cast(t, "age", pa.string(), str)), _train),
        "column 'age' has type string, which does not fit kind 'categorical'",
    ),
    _c(
        "float-ids",
        "data",
        "train",
        "a categorical column stored as floats",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: cast(t, "item_id", pa.float64(), float)), _train),
        "column 'item_id' has type double",
    ),
    _c(
        "string-dense",
        "data",
        "train",
        "a dense column stored as strings",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: cast(t, "user_ctr", pa.string(), str)), _train),
        "column 'user_ctr' has type string",
    ),
    _c(
        "scalar-sequence",
        "data",
        "train",
        "a sequence column stored as a plain integer",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: cast(t, "genres", pa.int64(), len)), _train),
        "column 'genres' has type int64, which does not fit kind 'sequence'",
    ),
    _c(
        "string-label",
        "data",
        "train",
        "the label stored as strings",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: cast(t, "label", pa.string(), str)), _train),
        "reserved column 'label' must be numeric",
    ),
    _c(
        "nan-feature",
        "data",
        "train",
        "NaN in a dense feature",
        NAMES_PROBLEM + " (file, row group, column)",
        _then(lambda ws: ws.edit(lambda t: put(t, "user_ctr", float("nan"))), _train),
        "dense column 'user_ctr' has NaN or infinite values",
    ),
    _c(
        "inf-feature",
        "data",
        "train",
        "+inf in a dense feature",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "item_ctr", float("inf"))), _train),
        "dense column 'item_ctr' has NaN or infinite values",
    ),
    _c(
        "nan-feature-valid",
        "data",
        "train",
        "NaN in a dense feature of the valid split",
        NAMES_PROBLEM + "; the earlier run's checkpoints are kept",
        _then(lambda ws: ws.edit(lambda t: put(t, "user_ctr", float("nan"), row=3), "valid"), _train),
        "dense column 'user_ctr' has NaN or infinite values",
    ),
    _c(
        "null-id",
        "data",
        "train",
        "a null in a categorical column",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "hour", None)), _train),
        "column 'hour' has 1 null values",
    ),
    _c(
        "nan-label",
        "data",
        "train",
        "NaN label",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "label", float("nan"))), _train),
        "column 'label' has NaN or infinite values",
    ),
    _c(
        "inf-label",
        "data",
        "train",
        "-inf label",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "label", float("-inf"))), _train),
        "column 'label' has NaN or infinite values",
    ),
    _c(
        "label-two",
        "data",
        "train",
        "label 2 (a rating, not a click)",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "label", 2.0)), _train),
        "column 'label' must be 0 or 1",
    ),
    _c(
        "label-negative",
        "data",
        "train",
        "label -1",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "label", -1.0)), _train),
        "column 'label' must be 0 or 1",
    ),
    _c(
        "label-fraction",
        "data",
        "train",
        "label 0.5",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "label", 0.5)), _train),
        "column 'label' must be 0 or 1",
    ),
    _c(
        "nan-teacher-logit",
        "data",
        "train",
        "NaN in teacher_logit",
        NAMES_PROBLEM,
        _then(
            lambda ws: ws.edit(
                lambda t: t.append_column(
                    "teacher_logit",
                    pa.array([float("nan") if i == BAD_ROW else 0.0 for i in range(t.num_rows)], pa.float32()),
                )
            ),
            _train,
        ),
        "column 'teacher_logit' has NaN or infinite values",
    ),
    _c(
        "id-outside-vocab",
        "data",
        "train",
        "an id equal to the vocabulary size",
        NAMES_PROBLEM + " (the id range)",
        _then(lambda ws: ws.edit(lambda t: put(t, "item_id", 40)), _train),
        "column 'item_id' has ids in [1, 40] outside its vocabulary [0, 40)",
    ),
    _c(
        "negative-id",
        "data",
        "train",
        "a negative id",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "user_id", -3)), _train),
        "outside its vocabulary [0, 30)",
    ),
    _c(
        "huge-id",
        "data",
        "train",
        "an id of 2^62",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "category_id", 2**62)), _train),
        "outside its vocabulary [0, 8)",
    ),
    _c(
        "sequence-id-outside-vocab",
        "data",
        "train",
        "a behaviour-sequence id outside the item vocabulary",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "hist_item_id", [3, 99])), _train),
        "column 'hist_item_id' has ids in",
    ),
    _c(
        "negative-sequence-id",
        "data",
        "train",
        "a negative id inside a sequence",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: put(t, "genres", [-1])), _train),
        "column 'genres' has ids in [-1,",
    ),
    _c(
        "empty-file",
        "data",
        "train",
        "a zero-byte .parquet file in train/",
        NAMES_PROBLEM,
        _then(lambda ws: ws.part().write_bytes(b""), _train),
        "is not a readable Parquet file",
    ),
    _c(
        "empty-split",
        "data",
        "train",
        "a train split with zero rows",
        NAMES_PROBLEM,
        _then(lambda ws: ws.edit(lambda t: t.slice(0, 0)), _train),
        "split 'train' under",
    ),
    _c(
        "missing-split",
        "data",
        "train",
        "no valid/ folder",
        NAMES_PROBLEM,
        _then(lambda ws: shutil.rmtree(ws.data / "valid"), _train),
        "no Parquet files for split 'valid'",
    ),
    _c(
        "truncated-parquet",
        "data",
        "train",
        "a Parquet file cut in half",
        NAMES_PROBLEM,
        _then(lambda ws: truncate(ws.part()), _train),
        "is not a readable Parquet file",
    ),
    _c(
        "corrupt-parquet",
        "data",
        "train",
        "a Parquet file with garbage in its data pages (footer intact)",
        NAMES_PROBLEM + " (the file and row group)",
        _then(lambda ws: flip_bytes(ws.part()), _train),
        "is corrupt",
    ),
    _c(
        "csv-as-parquet",
        "data",
        "train",
        "a CSV file saved as train/part-00000.parquet",
        NAMES_PROBLEM,
        _then(lambda ws: ws.part().write_text("user_id,item_id,label\n1,2,0\n3,4,1\n"), _train),
        "is not a readable Parquet file",
    ),
    _c(
        "csv-as-dataset",
        "data",
        "train",
        "a CSV file given as --data",
        NAMES_PROBLEM,
        lambda ws: ws.train(data=_write(ws.root / "log.csv", "user_id,item_id,label\n1,2,0\n")),
        "is a file, not a dataset directory",
    ),
    _c(
        "missing-data-path",
        "data",
        "train",
        "--data that does not exist",
        NAMES_PROBLEM,
        lambda ws: ws.train(data=ws.root / "nope"),
        "no schema.json",
    ),
    _c(
        "missing-schema",
        "data",
        "train",
        "a dataset folder without schema.json",
        NAMES_PROBLEM,
        _then(lambda ws: (ws.data / "schema.json").unlink(), _train),
        "no schema.json",
    ),
    _c(
        "schema-not-json",
        "data",
        "train",
        "schema.json that is not JSON",
        NAMES_PROBLEM,
        _then(lambda ws: ws.schema(lambda d: "{features: [oops"), _train),
        "is not valid JSON",
    ),
    _c(
        "schema-not-object",
        "data",
        "train",
        "schema.json holding a list",
        NAMES_PROBLEM,
        _then(lambda ws: ws.schema(lambda d: json.dumps(d["features"])), _train),
        "schema must be an object with a 'features' list",
    ),
    _c(
        "schema-unknown-kind",
        "data",
        "train",
        "a feature of kind 'image'",
        NAMES_PROBLEM,
        _then(lambda ws: ws.schema(lambda d: d["features"][1].update(kind="image")), _train),
        "feature 'age': kind must be one of",
    ),
    _c(
        "schema-unknown-key",
        "data",
        "train",
        "a feature with a misspelt key (vocab instead of vocab_size)",
        NAMES_PROBLEM,
        _then(lambda ws: ws.schema(lambda d: d["features"][1].update(vocab=5)), _train),
        "has unknown keys ['vocab']",
    ),
    _c(
        "schema-zero-vocab",
        "data",
        "train",
        "a categorical feature with vocab_size 0",
        NAMES_PROBLEM,
        _then(lambda ws: ws.schema(lambda d: d["features"][1].update(vocab_size=0)), _train),
        "feature 'age': vocab_size must be >= 2",
    ),
    _c(
        "schema-duplicate-feature",
        "data",
        "train",
        "the same feature name twice",
        NAMES_PROBLEM,
        _then(lambda ws: ws.schema(lambda d: d["features"].append(d["features"][1])), _train),
        "duplicate feature names",
    ),
    _c(
        "schema-bad-shares",
        "data",
        "train",
        "a sequence sharing the table of a feature that does not exist",
        NAMES_PROBLEM,
        _then(lambda ws: ws.schema(lambda d: d["features"][3].update(shares="movie_id")), _train),
        "shares 'movie_id', which is not a categorical feature",
    ),
    _c(
        "schema-data-mismatch",
        "data",
        "train",
        "schema.json says dense where the data holds lists",
        NAMES_PROBLEM,
        _then(lambda ws: ws.schema(lambda d: d["features"][7].update(kind="dense")), _train),
        "column 'genres' has type list<",
    ),
    _c(
        "schema-vocab-too-small",
        "data",
        "train",
        "schema.json with a smaller vocabulary than the data's ids",
        NAMES_PROBLEM,
        _then(lambda ws: ws.schema(lambda d: d["features"][0].update(vocab_size=10)), _train),
        "column 'user_id' has ids in",
    ),
    _c(
        "unwritable-out-file-parent",
        "data",
        "train",
        "--out inside a path that is a regular file",
        NAMES_PROBLEM,
        lambda ws: ws.train(out=_write(ws.root / "file", "x") / "run"),
        "file/run",
    ),
    _c(
        "unwritable-out-readonly",
        "data",
        "train",
        "--out in a read-only folder",
        NAMES_PROBLEM,
        lambda ws: ws.train(out=_readonly(ws.root / "ro") / "run"),
        "Permission denied",
        needs_non_root=True,
    ),
    _c(
        "export-out-is-foreign",
        "data",
        "export",
        "export --out pointing at a folder that is not an artifact",
        NAMES_PROBLEM + "; the folder is not touched",
        lambda ws: [*_export(ws)[:-3], str(ws.run), "--formats", "torch"],
        "is not a prerank artifact; refusing to overwrite it",
    ),
    _c(
        "export-other-schema",
        "data",
        "export",
        "export with a dataset of another schema than the model's",
        NAMES_PROBLEM + " (which features differ)",
        lambda ws: _export(ws, data=ws.extras / "other-data"),
        "schema mismatch between model lr and data",
    ),
    _c(
        "teacher-score-nan-valid",
        "data",
        "teacher score",
        "teacher score on data with NaN in the valid split",
        NAMES_PROBLEM + "; no Parquet file of any split is rewritten",
        _then(lambda ws: ws.edit(lambda t: put(t, "item_ctr", float("nan"), row=3), "valid"), _teacher),
        "dense column 'item_ctr' has NaN or infinite values",
    ),
    _c(
        "yaml-malformed",
        "data",
        "train",
        "a --config file that is not YAML",
        NAMES_PROBLEM,
        lambda ws: ws.train("--config", ws.config("model: [lr\n")),
        "is not valid YAML",
    ),
    _c(
        "yaml-not-mapping",
        "data",
        "train",
        "a --config file holding a list",
        NAMES_PROBLEM,
        lambda ws: ws.train("--config", ws.config("- lr\n- two_tower\n")),
        "must hold a mapping",
    ),
    _c(
        "yaml-unknown-key",
        "data",
        "train",
        "a --config file with an unknown top-level key",
        NAMES_PROBLEM,
        lambda ws: ws.train("--config", ws.config("modle: lr\n")),
        "unknown keys ['modle']",
    ),
    _c(
        "yaml-unknown-train-option",
        "data",
        "train",
        "a --config file with an unknown train option",
        NAMES_PROBLEM + " (and lists the known ones)",
        lambda ws: ws.train("--config", ws.config("train: {learning_rate: 0.1}\n")),
        "unknown train options ['learning_rate']",
    ),
    _c(
        "yaml-wrong-type",
        "data",
        "train",
        "a --config file with lr: fast",
        NAMES_PROBLEM,
        lambda ws: ws.train("--config", ws.config("train: {lr: fast}\n")),
        "train option lr must be a number",
    ),
    _c(
        "yaml-train-not-mapping",
        "data",
        "train",
        "a --config file whose train: is a list",
        NAMES_PROBLEM,
        lambda ws: ws.train("--config", ws.config("train: [1, 2]\n")),
        "'train' must be a mapping",
    ),
    _c(
        "yaml-missing",
        "data",
        "train",
        "a --config path that does not exist",
        NAMES_PROBLEM,
        lambda ws: ws.train("--config", str(ws.root / "none.yaml")),
        "does not exist",
    ),
    # ------------------------------------------------------------------ training
    _c(
        "lr-zero",
        "training",
        "train",
        "--lr 0",
        NAMES_PROBLEM,
        lambda ws: ws.train("--lr", "0"),
        "train option lr must be > 0",
    ),
    _c(
        "lr-negative",
        "training",
        "train",
        "--lr -0.1",
        NAMES_PROBLEM,
        lambda ws: ws.train("--lr", "-0.1"),
        "train option lr must be > 0",
    ),
    _c(
        "lr-nan",
        "training",
        "train",
        "--lr nan",
        NAMES_PROBLEM,
        lambda ws: ws.train("--lr", "nan"),
        "train option lr must be > 0",
    ),
    _c(
        "batch-zero",
        "training",
        "train",
        "--batch-size 0",
        NAMES_PROBLEM,
        lambda ws: ws.train("--batch-size", "0"),
        "batch_size must be a positive integer",
    ),
    _c(
        "epochs-zero",
        "training",
        "train",
        "--epochs 0",
        NAMES_PROBLEM,
        lambda ws: ws.train("--epochs", "0"),
        "epochs must be a positive integer",
    ),
    _c(
        "threads-zero",
        "training",
        "train",
        "--threads 0",
        NAMES_PROBLEM,
        lambda ws: ws.train("--threads", "0"),
        "threads must be a positive integer",
    ),
    _c(
        "patience-zero",
        "training",
        "train",
        "--patience 0",
        NAMES_PROBLEM,
        lambda ws: ws.train("--patience", "0"),
        "patience must be >= 1",
    ),
    _c(
        "unknown-metric",
        "training",
        "train",
        "--metric accuracy",
        NAMES_PROBLEM,
        lambda ws: ws.train("--metric", "accuracy"),
        "metric must be one of",
    ),
    _c(
        "listwise-metric-pointwise-data",
        "training",
        "train",
        "--metric ndcg@10 on data without a stage column",
        NAMES_PROBLEM,
        lambda ws: ws.train("--metric", "ndcg@10"),
        "needs cascade data",
    ),
    _c(
        "unknown-model",
        "training",
        "train",
        "--model gbdt",
        NAMES_PROBLEM + " (and lists the registered ones)",
        lambda ws: ws.train(model="gbdt"),
        "unknown model 'gbdt'",
    ),
    _c(
        "unknown-loss",
        "training",
        "train",
        "--loss focal",
        NAMES_PROBLEM,
        lambda ws: ws.train("--loss", "focal"),
        "unknown loss 'focal'",
    ),
    _c(
        "unknown-loss-option",
        "training",
        "train",
        "--loss hybrid --loss-option tau=2 (no such option)",
        NAMES_PROBLEM,
        lambda ws: ws.train("--loss", "hybrid", "--loss-option", "tau=2"),
        "tau",
    ),
    _c(
        "unknown-model-option",
        "training",
        "train",
        "--model-option embeding_dim=8 (misspelt)",
        NAMES_PROBLEM,
        lambda ws: ws.train("--model-option", "embeding_dim=8"),
        "embeding_dim",
    ),
    _c(
        "model-option-wrong-type",
        "training",
        "train",
        "--model-option hidden=wide",
        NAMES_PROBLEM,
        lambda ws: ws.train("--model-option", "hidden=wide", model="two_tower"),
        "hidden",
    ),
    _c(
        "model-option-no-equals",
        "training",
        "train",
        "--model-option 8",
        NAMES_PROBLEM,
        lambda ws: ws.train("--model-option", "8"),
        "--model-option must look like key=value",
    ),
    _c(
        "resume-other-model",
        "training",
        "train",
        "--resume a run of lr with --model two_tower",
        NAMES_PROBLEM + "; the run's files are kept",
        lambda ws: ws.train("--resume", model="two_tower"),
        "was trained for another model or dataset; not resuming",
    ),
    _c(
        "resume-other-config",
        "training",
        "train",
        "--resume with another --lr",
        NAMES_PROBLEM + " (which options)",
        lambda ws: ws.train("--resume", "--lr", "0.5"),
        "was trained with other options (lr: 0.001 -> 0.5)",
    ),
    _c(
        "resume-other-data",
        "training",
        "train",
        "--resume on a dataset of another schema",
        NAMES_PROBLEM,
        lambda ws: ws.train("--resume", data=ws.extras / "other-data"),
        "another model or dataset",
    ),
    # ------------------------------------------------------------------ checkpoints
    _c(
        "resume-truncated-last",
        "checkpoint",
        "train",
        "--resume from a truncated last.pt",
        NAMES_PROBLEM,
        _then(lambda ws: truncate(ws.run / "last.pt"), lambda ws: ws.train("--resume")),
        "is corrupt or not a prerank checkpoint",
    ),
    _c(
        "evaluate-truncated",
        "checkpoint",
        "evaluate",
        "a checkpoint cut in half",
        NAMES_PROBLEM,
        _then(lambda ws: truncate(ws.run / "best.pt"), lambda ws: _evaluate(ws, ws.run / "best.pt")),
        "is corrupt or not a prerank checkpoint",
    ),
    _c(
        "evaluate-empty",
        "checkpoint",
        "evaluate",
        "a zero-byte checkpoint",
        NAMES_PROBLEM,
        lambda ws: _evaluate(ws, _write(ws.root / "empty.pt", b"")),
        "is corrupt or not a prerank checkpoint",
    ),
    _c(
        "evaluate-text",
        "checkpoint",
        "evaluate",
        "a text file given as checkpoint",
        NAMES_PROBLEM,
        lambda ws: _evaluate(ws, _write(ws.root / "notes.pt", "hello")),
        "is corrupt or not a prerank checkpoint",
    ),
    _c(
        "evaluate-missing",
        "checkpoint",
        "evaluate",
        "a checkpoint path that does not exist",
        NAMES_PROBLEM,
        lambda ws: _evaluate(ws, ws.root / "none.pt"),
        "does not exist",
    ),
    _c(
        "evaluate-state-dict",
        "checkpoint",
        "evaluate",
        "a bare state_dict (torch.save(model.state_dict()))",
        NAMES_PROBLEM,
        lambda ws: _evaluate(ws, _bare_state_dict(ws)),
        "is not a prerank checkpoint",
    ),
    _c(
        "evaluate-other-schema",
        "checkpoint",
        "evaluate",
        "a checkpoint trained on another dataset's schema",
        NAMES_PROBLEM,
        lambda ws: _evaluate(ws, ws.extras / "other-data-lr.pt"),
        "was trained on other features than",
    ),
    _c(
        "checkpoint-weights-of-another-model",
        "checkpoint",
        "evaluate",
        "a checkpoint naming two_tower that holds LR weights",
        NAMES_PROBLEM,
        lambda ws: _evaluate(ws, _relabel(ws, "two_tower")),
        "model 'two_tower' cannot be built from its stored config",
    ),
    _c(
        "checkpoint-unregistered-model",
        "checkpoint",
        "evaluate",
        "a checkpoint of a model this version lacks",
        NAMES_PROBLEM,
        lambda ws: _evaluate(ws, _relabel(ws, "deepfm")),
        "model 'deepfm' is not in this version",
    ),
    _c(
        "pickle-evaluate",
        "checkpoint",
        "evaluate",
        "a torch checkpoint whose unpickling would run code",
        NAMES_PROBLEM + "; the code never runs (weights_only=True)",
        lambda ws: _evaluate(ws, _evil(ws, ws.root / "evil.pt")),
        "is corrupt or not a prerank checkpoint",
    ),
    _c(
        "pickle-raw",
        "checkpoint",
        "evaluate",
        "a raw pickle (not torch's zip format) that would run code",
        NAMES_PROBLEM + "; the code never runs",
        lambda ws: _evaluate(ws, _evil(ws, ws.root / "evil.pkl", torch_format=False)),
        "is corrupt or not a prerank checkpoint",
    ),
    _c(
        "pickle-resume",
        "checkpoint",
        "train",
        "--resume from a last.pt that would run code",
        NAMES_PROBLEM + "; the code never runs",
        lambda ws: [*_evil_then(ws, ws.run / "last.pt", ws.train("--resume"))],
        "is corrupt or not a prerank checkpoint",
    ),
    _c(
        "pickle-teacher",
        "checkpoint",
        "teacher score",
        "a teacher checkpoint that would run code",
        NAMES_PROBLEM + "; the code never runs, the data is untouched",
        lambda ws: _teacher(ws, _evil(ws, ws.root / "t.pt")),
        "is corrupt or not a prerank checkpoint",
    ),
    _c(
        "pickle-export",
        "checkpoint",
        "export",
        "exporting a checkpoint that would run code",
        NAMES_PROBLEM + "; the code never runs, the old artifact stays",
        lambda ws: _export(ws, _evil(ws, ws.root / "e.pt")),
        "is corrupt or not a prerank checkpoint",
    ),
    _c(
        "teacher-other-schema",
        "checkpoint",
        "teacher score",
        "a teacher trained on another schema",
        NAMES_PROBLEM + "; the data is untouched",
        lambda ws: _teacher(ws, ws.extras / "other-data-lr.pt"),
        "the teacher's schema does not match",
    ),
    _c(
        "export-truncated-checkpoint",
        "checkpoint",
        "export",
        "exporting a truncated checkpoint",
        NAMES_PROBLEM + "; the old artifact stays",
        _then(lambda ws: truncate(ws.run / "best.pt"), lambda ws: _export(ws)),
        "is corrupt or not",
    ),
    # ------------------------------------------------------------------ artifacts
    _c(
        "artifact-missing",
        "artifact",
        "serve",
        "serve a folder that does not exist",
        NAMES_PROBLEM,
        lambda ws: ["serve", str(ws.root / "none")],
        "does not exist",
    ),
    _c(
        "artifact-missing-cache-file",
        "artifact",
        "serve",
        "an artifact without item_cache/row_of_id.npy",
        NAMES_PROBLEM + " (which file)",
        _then(lambda ws: (ws.art / "item_cache" / "row_of_id.npy").unlink(), _serve),
        "missing files ['item_cache/row_of_id.npy']",
    ),
    _c(
        "artifact-missing-graph",
        "artifact",
        "serve",
        "an artifact without graphs/score.pt2",
        NAMES_PROBLEM,
        _then(lambda ws: (ws.art / "graphs" / "score.pt2").unlink(), _serve),
        "missing files ['graphs/score.pt2']",
    ),
    _c(
        "artifact-missing-manifest",
        "artifact",
        "serve",
        "an artifact without manifest.json",
        NAMES_PROBLEM,
        _then(lambda ws: (ws.art / "manifest.json").unlink(), _serve),
        "missing file manifest.json",
    ),
    _c(
        "artifact-corrupt-manifest",
        "artifact",
        "serve",
        "manifest.json that is not JSON",
        NAMES_PROBLEM,
        _then(lambda ws: _write(ws.art / "manifest.json", "{"), _serve),
        "manifest.json is corrupt",
    ),
    _c(
        "artifact-truncated-weights",
        "artifact",
        "serve",
        "a truncated weights.pt",
        NAMES_PROBLEM,
        _then(lambda ws: truncate(ws.art / "weights.pt"), _serve),
        "weights.pt is corrupt or truncated",
    ),
    _c(
        "artifact-truncated-graph",
        "artifact",
        "serve",
        "a truncated graphs/user.pt2",
        NAMES_PROBLEM,
        _then(lambda ws: truncate(ws.art / "graphs" / "user.pt2"), _serve),
        "graphs/user.pt2 is corrupt",
    ),
    _c(
        "artifact-cache-bit-flip",
        "artifact",
        "serve",
        "bytes changed in an item-cache array",
        NAMES_PROBLEM,
        _then(lambda ws: flip_bytes(ws.art / "item_cache" / "state-000.npy"), _serve),
        "item_cache/state-000.npy is corrupt",
    ),
    _c(
        "artifact-cache-other-weights",
        "artifact",
        "serve",
        "the item cache of another model's export copied in",
        NAMES_PROBLEM,
        _then(_swap_cache, _serve),
        "the item cache was not written by this artifact's item graph",
    ),
    _c(
        "artifact-cache-other-vocab",
        "artifact",
        "serve",
        "an item cache for another item vocabulary (hashes re-stamped)",
        NAMES_PROBLEM + " (both sizes)",
        _then(lambda ws: _shrink_vocab(ws.art), _serve),
        "item cache has 35 ids but the schema's item_id vocabulary",
    ),
    _c(
        "artifact-pickle-weights",
        "artifact",
        "serve",
        "weights.pt replaced by a pickle that would run code (hashes re-stamped), eager runtime",
        NAMES_PROBLEM + "; the code never runs",
        _then(
            lambda ws: (_evil(ws, ws.art / "weights.pt"), rehash(ws.art)), lambda ws: _serve(ws, "--runtime", "eager")
        ),
        "is corrupt or not a prerank checkpoint",
    ),
    _c(
        "artifact-old-format",
        "artifact",
        "serve",
        "an artifact of an older format",
        NAMES_PROBLEM + " (asks for a re-export)",
        _then(
            lambda ws: _edit_json(ws.art / "manifest.json", lambda d: d.update(format="prerank-artifact-v1")), _serve
        ),
        "re-export it",
    ),
    _c(
        "artifact-lacks-runtime",
        "artifact",
        "serve",
        "--runtime onnx on an artifact exported with torch only",
        NAMES_PROBLEM,
        lambda ws: _serve(ws, "--runtime", "onnx"),
        "has no onnx graphs",
    ),
    _c(
        "serve-unknown-runtime",
        "artifact",
        "serve",
        "--runtime tensorrt",
        NAMES_PROBLEM,
        lambda ws: _serve(ws, "--runtime", "tensorrt"),
        "runtime must be one of",
    ),
    _c(
        "serve-public-without-token",
        "artifact",
        "serve",
        "--host 0.0.0.0 without --token or PRERANK_TOKEN",
        "refuses to start, exit 2 naming --token",
        lambda ws: _serve(ws, "--runtime", "torch", "--host", "0.0.0.0"),
        "--token",
    ),
)


@dataclass(frozen=True)
class HttpCase:
    """A request to ``prerank serve`` (the app on a free loopback port, token ``secret``)."""

    id: str
    input: str
    expected: str
    request: dict[str, Any]
    status: int
    #: the ``field`` the error body must name (None: no field check)
    field: str | None = None
    area: str = "service"


USER = {"user_id": 3, "age": 1, "user_ctr": 0.5, "hist_item_id": [4, 2, 9], "hour": 7}
CROSS = {"user_cat_affinity": [0.1, 0.9, 0.3], "user_cat_clicks": [1, 2, 0]}
BODY = {"user": USER, "candidates": [5, 1, 7], "cross": CROSS}
AUTH = {"authorization": "Bearer secret"}
#: The service under test answers 413 above this many candidates and this many body bytes.
MAX_CANDIDATES, MAX_BODY = 50, 8192


def _post(body: Any = None, *, content: bytes | None = None, headers: dict | None = None) -> dict[str, Any]:
    return {"method": "POST", "url": "/score", "json": body, "content": content, "headers": headers or AUTH}


HTTP_CASES: tuple[HttpCase, ...] = (
    HttpCase(
        "http-malformed-json",
        "a body that is not JSON",
        "422 naming the body",
        _post(content=b'{"user": ', headers={**AUTH, "content-type": "application/json"}),
        422,
        "body",
    ),
    HttpCase(
        "http-wrong-type-candidates",
        "candidates as a string",
        "422 naming candidates",
        _post({**BODY, "candidates": "5,1,7"}),
        422,
        "candidates",
    ),
    HttpCase(
        "http-wrong-type-id",
        "a candidate id that is a string",
        "422 naming candidates.1",
        _post({**BODY, "candidates": [5, "x", 7]}),
        422,
        "candidates.1",
    ),
    HttpCase(
        "http-bool-id",
        "a candidate id true",
        "422 naming candidates.1",
        _post({**BODY, "candidates": [5, True, 7]}),
        422,
        "candidates.1",
    ),
    HttpCase(
        "http-wrong-type-feature",
        "a user feature as a string",
        "422 naming user.age",
        _post({**BODY, "user": {**USER, "age": "old"}}),
        422,
        "user.age",
    ),
    HttpCase(
        "http-feature-out-of-vocab",
        "a user id outside its vocabulary",
        "422 naming user.user_id",
        _post({**BODY, "user": {**USER, "user_id": 10**6}}),
        422,
        "user.user_id",
    ),
    HttpCase("http-missing-user", "no user object", "422 naming user", _post({"candidates": [5]}), 422, "user"),
    HttpCase(
        "http-unknown-key", "an unknown top-level key", "422 naming it", _post({**BODY, "debug": True}), 422, "debug"
    ),
    HttpCase(
        "http-unknown-item",
        "a candidate id in the vocabulary but not in the catalogue",
        "422 naming candidates",
        _post({**BODY, "candidates": [5, 1, 39]}),
        422,
        "candidates",
    ),
    HttpCase(
        "http-negative-item",
        "a negative candidate id",
        "422 naming candidates",
        _post({**BODY, "candidates": [5, 1, -7]}),
        422,
        "candidates",
    ),
    HttpCase(
        "http-huge-item",
        "a candidate id of 2^70",
        "422 naming candidates",
        _post({**BODY, "candidates": [5, 1, 2**70]}),
        422,
        "candidates",
    ),
    HttpCase(
        "http-empty-candidates",
        "an empty candidate list",
        "422 naming candidates",
        _post({**BODY, "candidates": [], "cross": None}),
        422,
        "candidates",
    ),
    HttpCase(
        "http-cross-length",
        "cross features of another length than the candidates",
        "422 naming cross",
        _post({**BODY, "cross": {k: v[:2] for k, v in CROSS.items()}}),
        422,
        "cross.user_cat_affinity",
    ),
    HttpCase(
        "http-too-many-candidates",
        f"{MAX_CANDIDATES + 1} candidates (limit {MAX_CANDIDATES})",
        "413 naming candidates",
        _post({**BODY, "candidates": list(range(1, MAX_CANDIDATES + 2)), "cross": None}),
        413,
        "candidates",
    ),
    HttpCase(
        "http-body-too-big",
        f"a body over --max-body-bytes ({MAX_BODY})",
        "413 naming the body",
        _post({**BODY, "padding": "x" * (MAX_BODY + 1)}),
        413,
        "body",
    ),
    HttpCase(
        "http-no-token",
        "/score without the bearer token",
        "401",
        _post(BODY, headers={"content-type": "application/json"}),
        401,
        None,
    ),
    HttpCase(
        "http-wrong-token",
        "/score with a wrong bearer token",
        "401",
        _post(BODY, headers={"authorization": "Bearer guess"}),
        401,
        None,
    ),
    HttpCase(
        "http-metadata-no-token",
        "/metadata without the token",
        "401",
        {"method": "GET", "url": "/metadata", "headers": {}},
        401,
        None,
    ),
)
