"""Export and load of serving artifacts: round trip, stamp, corruption, schema and atomicity checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import prerank.cli.serve  # noqa: F401  (registers the commands)
import prerank.serve.export as export_module
from conftest import tiny_schema, tiny_table
from prerank.cli import app
from prerank.data.batch import Batch
from prerank.data.parquet import table_to_batch, write_dataset
from prerank.io import CheckpointError
from prerank.models.registry import MODELS, build_model
from prerank.schema import FeatureSpec, Schema
from prerank.serve.export import build_item_cache, export, load_artifact
from prerank.serve.scorer import Scorer
from prerank.train.checkpoint import save_checkpoint

NUM_ITEMS = 30  # item ids 1..30 of the tiny schema's 40; 31..39 are valid ids outside the catalogue


def write_serve_data(root: Path, schema: Schema | None = None) -> Path:
    """A tiny dataset whose catalogue lists each item id once (ids 1..NUM_ITEMS), in shuffled order."""
    schema = schema or tiny_schema()
    items = tiny_table(NUM_ITEMS, 9, schema).select([f.name for f in schema.tower("item")])
    ids = np.random.default_rng(0).permutation(np.arange(1, NUM_ITEMS + 1))
    items = items.set_column(items.schema.get_field_index("item_id"), "item_id", pa.array(ids, pa.int64()))
    splits = {"train": tiny_table(64, 1, schema), "test": tiny_table(64, 3, schema)}
    write_dataset(root, schema, splits, items=items, row_group_size=7)
    return root


def make_checkpoint(path: Path, name: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(path, name, build_model(name, tiny_schema()))
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_serve_data(tmp_path / "data")


@pytest.fixture
def artifact(tmp_path: Path, data_dir: Path) -> Path:
    export(make_checkpoint(tmp_path / "lr.pt", "lr"), data_dir, tmp_path / "art", chunk_rows=4)
    return tmp_path / "art"


def one_request(rows: Batch, schema: Schema, item_rows: Batch, row: int = 0) -> Batch:
    """Row ``row``'s user/context features against every catalogue item, cross features from the rows."""
    n = len(item_rows)
    feats = {
        f.name: rows.features[f.name][row : row + 1].expand(n, *rows.features[f.name].shape[1:]).clone()
        for f in schema.tower("user", "context")
    }
    feats.update(item_rows.features)
    feats.update({f.name: rows.features[f.name][:n] for f in schema.tower("cross")})
    return Batch(features=feats)


def user_dict(rows: Batch, schema: Schema, row: int = 0) -> dict:
    out = {}
    for f in schema.tower("user", "context"):
        v = rows.features[f.name][row]
        out[f.name] = (
            float(v) if f.kind == "dense" else ([int(x) for x in v if x > 0] if f.kind == "sequence" else int(v))
        )
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_scores_equal_the_model_on_raw_features(name: str, tmp_path: Path, data_dir: Path) -> None:
    ckpt = make_checkpoint(tmp_path / f"{name}.pt", name)
    manifest = export(ckpt, data_dir, tmp_path / "art", chunk_rows=4)
    assert manifest["num_items"] == NUM_ITEMS and manifest["model_name"] == name

    schema = tiny_schema()
    torch.manual_seed(0)
    model = build_model(name, schema).eval()
    rows = table_to_batch(tiny_table(64, 3, schema), schema)
    items = table_to_batch(pa.parquet.read_table(data_dir / "items.parquet"), schema)
    with torch.no_grad():
        expected = model(one_request(rows, schema, items))

    scorer = Scorer.load(tmp_path / "art")
    cross = {f.name: rows.features[f.name][:NUM_ITEMS].tolist() for f in schema.tower("cross")}
    ids = items.features["item_id"].tolist()
    result = scorer.score(user_dict(rows, schema), ids, cross=cross)
    assert result.ids == ids and result.skipped == []
    torch.testing.assert_close(torch.tensor(result.scores), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bfloat16_cache_round_trip(name: str, tmp_path: Path, data_dir: Path) -> None:
    """A bfloat16 cache holds every float state in half the bytes, and serves scores of the states as rounded."""
    ckpt = make_checkpoint(tmp_path / f"{name}.pt", name)
    export(ckpt, data_dir, tmp_path / "f32", chunk_rows=4)
    manifest = export(ckpt, data_dir, tmp_path / "bf16", chunk_rows=4, cache_dtype="bfloat16")
    assert manifest["cache_dtype"] == "bfloat16"
    full, half = load_artifact(tmp_path / "f32"), load_artifact(tmp_path / "bf16")
    assert half.cache.cache_dtype == "bfloat16" and full.cache.cache_dtype == "float32"
    for key, t in full.cache.states.items():
        want = torch.bfloat16 if t.dtype == torch.float32 else t.dtype
        assert half.cache.states[key].dtype == want, key
        torch.testing.assert_close(half.cache.states[key], t.to(want), rtol=0, atol=0)
    ids = torch.arange(1, NUM_ITEMS + 1)
    rows = half.cache.rows(ids)
    schema = tiny_schema()
    user_rows = table_to_batch(tiny_table(64, 3, schema), schema)
    scorer, reference = Scorer.load(tmp_path / "bf16"), Scorer.load(tmp_path / "f32")
    cross = {f.name: user_rows.features[f.name][:NUM_ITEMS].tolist() for f in schema.tower("cross")}
    got = scorer.score(user_dict(user_rows, schema), ids.tolist(), cross=cross)
    with torch.inference_mode():
        user = half.model.encode_user(scorer.user_batch(user_dict(user_rows, schema)))
        pair = scorer.pair_batch(cross, NUM_ITEMS)
        expected = half.model.score(user, half.cache.gather(rows), pair)  # the rounded states, read as float32
    torch.testing.assert_close(torch.tensor(got.scores), expected, rtol=1e-4, atol=1e-4)
    exact = reference.score(user_dict(user_rows, schema), ids.tolist(), cross=cross).scores
    torch.testing.assert_close(torch.tensor(got.scores), torch.tensor(exact), rtol=0.05, atol=0.05)
    assert scorer.metadata()["cache_dtype"] == "bfloat16"


def test_bfloat16_cache_listing_is_checked(tmp_path: Path, data_dir: Path) -> None:
    export(make_checkpoint(tmp_path / "tt.pt", "two_tower"), data_dir, tmp_path / "art", cache_dtype="bfloat16")
    info_path = tmp_path / "art" / "item_cache" / "cache.json"
    info = json.loads(info_path.read_text())
    assert info["bfloat16_states"] == ["i"]

    def rewrite(**changes: object) -> None:
        info_path.write_text(json.dumps({**info, **changes}))
        manifest_path = tmp_path / "art" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["files"]["item_cache/cache.json"] = export_module.file_sha256(info_path)
        manifest_path.write_text(json.dumps(manifest))

    rewrite(bfloat16_states=["i", "nope"])
    with pytest.raises(CheckpointError, match="bfloat16_states .* are not among its states"):
        load_artifact(tmp_path / "art")
    rewrite(bfloat16_states=[])  # int16 bits read as numbers
    with pytest.raises(CheckpointError, match="state 'i' was not built by this model"):
        load_artifact(tmp_path / "art")
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        export(tmp_path / "tt.pt", data_dir, tmp_path / "x", cache_dtype="float16")


def test_item_cache_is_built_in_bounded_chunks_and_keyed_by_id(data_dir: Path) -> None:
    schema = tiny_schema()
    model = build_model("two_tower", schema).eval()
    sizes: list[int] = []
    encode = model.encode_item
    model.encode_item = lambda b: (sizes.append(len(b)), encode(b))[1]  # type: ignore[method-assign]
    cache = build_item_cache(model, data_dir, chunk_rows=4)
    assert max(sizes) <= 4 and sum(sizes) == NUM_ITEMS + 1  # + the unknown item of row 0
    items = table_to_batch(pa.parquet.read_table(data_dir / "items.parquet"), schema)
    ids = items.features["item_id"]
    with torch.no_grad():
        torch.testing.assert_close(cache.gather(cache.rows(ids))["i"], encode(items)["i"])
    assert cache.rows(torch.tensor([0, 35, 10_000])).tolist() == [0, 0, 0]


def test_manifest_and_files(artifact: Path) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    for key in ("model_name", "weights_sha256", "num_items", "prerank_version", "created", "files"):
        assert key in manifest
    assert len(manifest["weights_sha256"]) == 64
    cache = json.loads((artifact / "item_cache" / "cache.json").read_text())
    assert cache["weights_sha256"] == manifest["weights_sha256"]
    # weights are a plain state_dict loadable with weights_only=True
    state = torch.load(artifact / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    row_of_id = np.load(artifact / "item_cache" / "row_of_id.npy")
    assert row_of_id.shape == (40,) and row_of_id[0] == 0
    assert sorted(row_of_id[row_of_id > 0]) == list(range(1, NUM_ITEMS + 1))


def test_stamp_mismatch_is_refused(tmp_path: Path, data_dir: Path, artifact: Path) -> None:
    other = tmp_path / "other"
    export(make_checkpoint(tmp_path / "lr2.pt", "lr", seed=1), data_dir, other)
    shutil.rmtree(artifact / "item_cache")
    shutil.copytree(other / "item_cache", artifact / "item_cache")
    with pytest.raises(CheckpointError, match="stamp .* does not match the model's weights"):
        load_artifact(artifact)


def test_swapped_weights_are_refused(tmp_path: Path, data_dir: Path, artifact: Path) -> None:
    other = tmp_path / "other"
    export(make_checkpoint(tmp_path / "lr2.pt", "lr", seed=1), data_dir, other)
    shutil.copy(other / "weights.pt", artifact / "weights.pt")
    with pytest.raises(CheckpointError, match="stamp"):
        load_artifact(artifact)


def test_truncated_cache_is_refused(artifact: Path) -> None:
    state = artifact / "item_cache" / "state-000.npy"
    state.write_bytes(state.read_bytes()[:-16])
    with pytest.raises(CheckpointError, match="state-000.npy is corrupt or truncated"):
        load_artifact(artifact)


def test_bit_flip_in_cache_is_refused(artifact: Path) -> None:
    state = artifact / "item_cache" / "state-000.npy"
    data = bytearray(state.read_bytes())
    data[-3] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_artifact(artifact)


def test_corrupt_weights_are_refused(artifact: Path) -> None:
    (artifact / "weights.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_artifact(artifact)


@pytest.mark.parametrize("missing", ["manifest.json", "weights.pt", "item_cache/row_of_id.npy", "schema.json"])
def test_missing_file_is_named(artifact: Path, missing: str) -> None:
    (artifact / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.split("/")[-1]):
        load_artifact(artifact)


def test_export_refuses_data_with_another_schema(tmp_path: Path) -> None:
    schema = tiny_schema()
    feats = tuple(FeatureSpec(**{**f.__dict__, "vocab_size": 7}) if f.name == "age" else f for f in schema.features)
    other = write_serve_data(tmp_path / "other", Schema(features=feats, name="tiny", has_label_level=True))
    with pytest.raises(ValueError, match=r"schema mismatch.*\['age'\]"):
        export(make_checkpoint(tmp_path / "lr.pt", "lr"), other, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_load_refuses_an_unexpected_schema(artifact: Path) -> None:
    schema = tiny_schema()
    with pytest.raises(CheckpointError, match="schema mismatch"):
        load_artifact(artifact, expected_schema=Schema(features=schema.features[:-1], name="tiny"))


def test_export_refuses_duplicate_catalogue_ids(tmp_path: Path, tiny_dataset: Path) -> None:
    items = pq.read_table(tiny_dataset / "items.parquet")
    pq.write_table(pa.concat_tables([items, items.slice(0, 3)]), tiny_dataset / "items.parquet")
    with pytest.raises(ValueError, match="more than once"):
        export(make_checkpoint(tmp_path / "lr.pt", "lr"), tiny_dataset, tmp_path / "art")


def test_failed_export_leaves_the_old_artifact(
    tmp_path: Path, data_dir: Path, artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (artifact / "manifest.json").read_text()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "build_item_cache", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(make_checkpoint(tmp_path / "two.pt", "two_tower"), data_dir, artifact)
    assert (artifact / "manifest.json").read_text() == before
    assert load_artifact(artifact).name == "lr"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "data", "lr.pt", "two.pt"]


def test_export_replaces_an_existing_artifact(tmp_path: Path, data_dir: Path, artifact: Path) -> None:
    export(make_checkpoint(tmp_path / "two.pt", "two_tower"), data_dir, artifact)
    assert load_artifact(artifact).name == "two_tower"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "data", "lr.pt", "two.pt"]


def test_export_refuses_to_overwrite_a_foreign_directory(tmp_path: Path, data_dir: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a prerank artifact"):
        export(make_checkpoint(tmp_path / "lr.pt", "lr"), data_dir, precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_cli_export(tmp_path: Path, data_dir: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "lr.pt", "lr")
    out = tmp_path / "art"
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt), "--data", str(data_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_artifact(out).cache.num_items == NUM_ITEMS
    half = tmp_path / "half"
    args = ["export", "--checkpoint", str(ckpt), "--data", str(data_dir), "--out", str(half), "--cache-dtype"]
    assert CliRunner().invoke(app, [*args, "bfloat16"]).exit_code == 0
    assert load_artifact(half).cache.cache_dtype == "bfloat16"
    wrong = CliRunner().invoke(app, [*args, "int8"])
    assert wrong.exit_code != 0 and "--cache-dtype must be one of" in " ".join(wrong.output.split())
    bad = CliRunner().invoke(
        app,
        ["export", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(data_dir), "--out", str(tmp_path / "x")],
    )
    assert bad.exit_code != 0 and "does not exist" in " ".join(bad.output.split())
