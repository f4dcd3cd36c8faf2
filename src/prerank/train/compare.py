"""``prerank compare``: train several models over several seeds on one dataset and tabulate them."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from prerank.bench.cost import score_cost
from prerank.data.parquet import ParquetSplit
from prerank.evaluate import metrics
from prerank.evaluate.listwise import evaluate_listwise
from prerank.evaluate.report import auc_latency_plot, results_table
from prerank.io import atomic_write_text
from prerank.models.base import ConfigError, num_params
from prerank.models.registry import MODELS
from prerank.schema import STAGES, Schema
from prerank.train import distributed
from prerank.train.config import TrainConfig, train_config
from prerank.train.trainer import Loss, bce_loss, evaluate_predictions, evaluate_split, quiet, train_model

BASELINE = "two_tower"
#: The row of :func:`popularity_predictions` in a comparison.
POPULARITY = "popularity (item train rate)"
LISTWISE_PREFIXES = ("recall@", "ndcg@", "hard_recall@", "hard_ndcg@", "cascade_recall@", "exposure_auc")

#: Per-model training defaults that differ from the shared ones. LR's 1-dim weights move at most
#: ``lr`` per Adam step, so at the shared 1e-3 it is still far from converged after 4 epochs; 1e-2
#: was the best of {1e-3, 1e-2, 3e-2} on the VALID split of ML-1M paper, ML-1M temporal and Taobao.
#: A ``--train-option`` for the model replaces these.
MODEL_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {"lr": {"lr": 0.01}}


def resolve_loss(name: str, options: dict[str, Any] | None = None) -> Loss:
    """A training loss by name: ``bce`` (pointwise, default) or any name of :data:`prerank.losses.LOSSES`."""
    if name == "bce" and not options:
        return bce_loss
    from prerank.losses import build_loss

    try:
        return build_loss(name, **(options or {}))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _test_metrics(model, data_dir: Path, batch_size: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Test metrics; on cascade data (a ``stage`` column) also Recall@K, NDCG@K and cascade recall."""
    if model.schema.has_stage:
        return evaluate_listwise(model, data_dir, "test", batch_size=batch_size)
    return evaluate_split(model, data_dir, "test", batch_size)


def _cost(model, data_dir: Path, rows: int = 256) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Cost per candidate on the first ``rows`` test rows; FIT also reports how distinct its meta queries are."""
    split = ParquetSplit(data_dir, "test", model.schema)
    batch = split.to_batch(split.read_table(split.row_groups[0]).slice(0, rows), where="test")
    report = model.meta_report(batch) if hasattr(model, "meta_report") else {}
    return {**score_cost(model, batch), **report}


def run_compare(
    data_dir: str | Path,
    models: list[str],
    seeds: int,
    out_dir: str | Path,
    *,
    config: TrainConfig = TrainConfig(),
    model_overrides: dict[str, dict] | None = None,
    train_overrides: dict[str, dict] | None = None,
    loss: str = "bce",
    loss_options: dict[str, Any] | None = None,
    resume: bool = False,
    teacher: str | Path | None = None,
    teacher_data: str | Path | None = None,
    log: Callable[[str], None] = print,
    latency_candidates: int | None = 1000,
    on_step: Callable[[str], None] | None = None,
    grid: dict[str, list[Any]] | None = None,
    then_grid: dict[str, list[Any]] | None = None,
    popularity: bool = False,
) -> list[dict[str, Any]]:
    """Train every model for seeds ``config.seed .. config.seed + seeds - 1``; evaluate each on the test split.

    ``results.json`` (a list of records) and ``results.md`` (mean +- std per model) are rewritten
    atomically after every run, so an interruption loses at most the run in progress; with
    ``resume=True`` runs already recorded are skipped and unfinished ones resume from ``last.pt``.
    RelaImpr is computed against Two-Tower of the same seed when Two-Tower is among the models.
    ``train_overrides`` changes training options for one model (e.g. a larger learning rate for
    LR, chosen on the valid split); the record keeps the options it was trained with.
    ``teacher`` (a checkpoint of the ranking teacher, trained on this dataset's schema) adds its own row, evaluated
    once on the same test split, and every student's RelaImpr against it (``relaimpr_teacher``), so the table shows
    the gap to the ranker. ``teacher_data``: the teacher reads another feature set of the same log (e.g. ``prepare
    --features wide``); it is evaluated on that dataset's test split, after checking that its rows are this
    dataset's test rows (:func:`~prerank.data.align.check_aligned`).
    ``latency_candidates`` (None or 0: skip) times each model's served request once, on its first seed's best
    checkpoint (:func:`measure_latencies`), and writes ``auc_vs_latency.png`` (AUC, mean over seeds, against p50
    latency). ``on_step(description)`` is called as each training run and each latency measurement starts (one outer
    progress display; pass ``config.progress=False`` then, so that the trainer shows none of its own).
    ``grid`` (training options -> values, e.g. ``{"lr": [1e-3, 3e-3], "weight_decay": [0, 1e-5]}``; ``loss.NAME``
    keys are options of ``loss``, e.g. ``{"loss.distillation_weight": [0.5, 1, 2]}``) tunes every model on the same
    grid first (:func:`tune`, valid split, first seed); each model's seeds then train with its chosen point, which
    its records carry as ``tuned`` and the table prints beside its row. The first seed's run is the chosen point's
    tuning run (same options, same seed), so it is read back from ``tune/`` instead of being trained twice.
    ``then_grid`` is a second stage of tuning: its points are tried on top of the first stage's best (coordinate
    search, e.g. the loss weights and temperatures after the learning rate and weight decay).
    ``popularity`` adds the row of a scorer that learns nothing (:func:`popularity_predictions`: the item's smoothed
    click rate on the train split), the bar every model should clear.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ConfigError(f"unknown models {unknown}; registered: {', '.join(MODELS)}")
    if seeds < 1:
        raise ConfigError("seeds must be >= 1")
    loss_fn = resolve_loss(loss, loss_options)
    if then_grid and not grid:
        raise ConfigError("a second tuning stage (then_grid) needs a first one (grid)")
    for stage in (grid, then_grid):
        for point in grid_points(stage) if stage else []:  # bad loss options fail here, before any training
            resolve_loss(loss, {**(loss_options or {}), **_loss_part(point)})
    if grid and then_grid and set(grid) & set(then_grid):
        raise ConfigError(f"options tuned in both stages: {sorted(set(grid) & set(then_grid))}")
    results_path = out_dir / "results.json"
    records: list[dict[str, Any]] = []
    if resume and results_path.exists():
        records = json.loads(results_path.read_text())
    done = {(r["model"], r["seed"]) for r in records}
    main = distributed.setup(config.device)[0].main  # under torchrun: rank 0 evaluates, writes and logs
    if not main:
        log = quiet
    if teacher is not None and main and not any(r.get("is_teacher") for r in records):
        records.insert(0, _teacher_record(Path(teacher), data_dir, config.eval_batch_size, teacher_data))
        log(f"teacher {records[0]['model']}: test AUC {records[0]['auc']:.4f}")
    if popularity and main and not any(r["model"] == POPULARITY for r in records):
        records.append(_popularity_record(data_dir))
        log(f"{POPULARITY}: test AUC {records[-1]['auc']:.4f}")
    # the baseline first, so that every later record can carry its RelaImpr
    order = sorted(models, key=lambda m: m != BASELINE)
    chosen = {
        name: tune(
            name,
            data_dir,
            out_dir,
            grid,
            config,
            (model_overrides or {}).get(name),
            loss,
            loss_options,
            then_grid=then_grid,
            log=log,
        )
        for name in order
        if grid
    }
    for seed in range(config.seed, config.seed + seeds):
        for name in order:
            if (name, seed) in done:
                log(f"skipping {name} seed {seed}: already in {results_path}")
                continue
            model_loss = loss_fn
            if name in chosen:
                options = {
                    **MODEL_TRAIN_DEFAULTS.get(name, {}),
                    **_train_part(chosen[name]),
                    **(train_overrides or {}).get(name, {}),
                }
                if _loss_part(chosen[name]):
                    model_loss = resolve_loss(loss, {**(loss_options or {}), **_loss_part(chosen[name])})
            else:
                options = (train_overrides or {}).get(name) or MODEL_TRAIN_DEFAULTS.get(name, {})
            run_config = train_config({**options, "seed": seed}, config)
            run_dir = out_dir / "runs" / name / f"seed{seed}"
            tuned_run = name in chosen and run_config == _point_config(name, chosen[name], config)
            if tuned_run:  # the first seed's run with the chosen point is that point's tuning run: not trained twice
                run_dir = _point_dir(out_dir, name, chosen[name])
            if on_step:
                on_step(f"{name} seed {seed}")
            result = train_model(
                name,
                data_dir,
                run_dir,
                (model_overrides or {}).get(name),
                run_config,
                model_loss,
                resume=resume or tuned_run,
                log=log,
            )
            if not main:
                continue  # the other ranks only help train; rank 0 evaluates and writes
            test = _test_metrics(result.model, data_dir, config.eval_batch_size)
            record: dict[str, Any] = {
                "model": name,
                "seed": seed,
                "data": str(data_dir),
                "loss": loss,
                "auc": test["auc"],
                "logloss": test["logloss"],
                "gauc": test["gauc"],
                "gauc_requests_skipped": test.get("gauc_requests_skipped"),
                "relaimpr": None,
                "train_seconds": result.train_seconds,
                "train_samples_per_second": result.samples_per_second,
                "params": num_params(result.model),
                "epochs": result.epochs,
                "max_epochs": result.config.epochs if result.config else run_config.epochs,
                "batch_size": result.config.batch_size if result.config else run_config.batch_size,
                "auto_schedule": list(result.auto),
                "best_valid": result.best_metric,
                "valid_metric": config.metric,
                "threads": run_config.threads,
                "lr": run_config.lr,
                "weight_decay": run_config.weight_decay,
                **({"tuned": grid_label(chosen[name])} if name in chosen else {}),
                "checkpoint": str(result.checkpoint),
                **_cost(result.model, data_dir),
                **{k: v for k, v in test.items() if k.startswith(LISTWISE_PREFIXES) or k == "list_len_mean"},
            }
            records.append(record)
            _fill_relaimpr(records)
            write_results(out_dir, records)
            log(f"{name} seed {seed}: test AUC {record['auc']:.4f}, logloss {record['logloss']:.4f}")
    if main:  # also when a resumed run trained nothing but added the teacher's or the popularity row
        _fill_relaimpr(records)
        write_results(out_dir, records)
    if latency_candidates and main:
        measure_latencies(records, models, config.seed, out_dir, data_dir, latency_candidates, log=log, on_step=on_step)
        write_results(out_dir, records)
        plot = auc_latency_plot(records, out_dir / "auc_vs_latency.png", title=f"{data_dir.name}: AUC against latency")
        if plot:
            log(f"wrote {plot}")
    return records


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in a fixed order: ``{"lr": [1, 2], "x": [3]}`` -> 2 points."""
    if not grid or any(not values for values in grid.values()):
        raise ConfigError(f"a tuning grid needs at least one value per option, got {grid}")
    keys = sorted(grid)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]
    for point in points:
        train_config(_train_part(point))  # unknown options and bad values fail here, before any training
    return points


#: Grid keys with this prefix are options of the loss (``loss.distillation_weight``), the others training options.
LOSS_PREFIX = "loss."


def _train_part(point: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in point.items() if not k.startswith(LOSS_PREFIX)}


def _loss_part(point: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix(LOSS_PREFIX): v for k, v in point.items() if k.startswith(LOSS_PREFIX)}


def grid_label(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(point.items()))


def _point_dir(out_dir: Path, name: str, point: dict[str, Any]) -> Path:
    return out_dir / "tune" / name / grid_label(point).replace(", ", "_")


def _point_config(name: str, point: dict[str, Any], config: TrainConfig) -> TrainConfig:
    """The training options of a grid point's tuning run (first seed)."""
    return train_config({**MODEL_TRAIN_DEFAULTS.get(name, {}), **_train_part(point)}, config)


def tune(
    name: str,
    data_dir: Path,
    out_dir: Path,
    grid: dict[str, list[Any]],
    config: TrainConfig,
    model_overrides: dict | None,
    loss: str = "bce",
    loss_options: dict[str, Any] | None = None,
    *,
    then_grid: dict[str, list[Any]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``name`` once per grid point (first seed) and return the point with the best valid ``config.metric``.

    Every model gets the same grid, so a comparison does not favour the model whose defaults happen to suit the
    data. Runs land in ``out_dir/tune/NAME/POINT``; each point's best valid metric is kept in ``out_dir/tuning.json``
    (rewritten atomically after each point), and a point already there is not trained again. With ``then_grid``,
    each of its points is then trained on top of ``grid``'s best point, and the best of all points is chosen
    (``grid``'s best stays a candidate): |grid| + |then_grid| runs instead of their product.
    """
    path = out_dir / "tuning.json"
    tuning = json.loads(path.read_text()) if path.exists() else {}
    runs = tuning.setdefault(name, {"metric": config.metric, "points": []})

    def valid_metric(point: dict[str, Any]) -> float:
        label = grid_label(point)
        row = next((r for r in runs["points"] if r["point"] == label), None)
        if row is None:
            run_dir, run_config = _point_dir(out_dir, name, point), _point_config(name, point, config)
            point_loss = resolve_loss(loss, {**(loss_options or {}), **_loss_part(point)})
            result = train_model(name, data_dir, run_dir, model_overrides, run_config, point_loss, log=log)
            row = {"point": label, "options": point, "best_valid": result.best_metric, "epochs": result.epochs}
            runs["points"].append(row)
            atomic_write_text(path, json.dumps(tuning, indent=2))
            log(f"{name} tuning {label}: valid {config.metric} {result.best_metric:.4f}")
        return row["best_valid"]

    best_point: dict[str, Any] | None = None
    best = None
    for stage in [grid, then_grid] if then_grid else [grid]:
        base = dict(best_point or {})
        for point in (base | part for part in grid_points(stage)):
            value = valid_metric(point)
            if best is None or (value < best if config.metric == "logloss" else value > best):
                best_point, best = point, value
    assert best_point is not None
    runs["chosen"] = grid_label(best_point)
    atomic_write_text(path, json.dumps(tuning, indent=2))
    log(f"{name}: chose {runs['chosen']} (valid {config.metric} {best:.4f})")
    return best_point


def measure_latencies(
    records: list[dict[str, Any]],
    models: list[str],
    seed: int,
    out_dir: Path,
    data_dir: Path,
    candidates: int = 1000,
    *,
    log: Callable[[str], None] = print,
    on_step: Callable[[str], None] | None = None,
) -> None:
    """Time each model's served request once (:func:`prerank.bench.efficiency.served_latency`: ONNX runtime, one
    thread, ``candidates`` candidates), on the best checkpoint of its run with ``seed``, exported to
    ``out_dir/artifacts/MODEL``; the latency fields go into every record of that model. Models whose records already
    carry a latency at this ``candidates`` (a resumed comparison) are skipped."""
    from prerank.bench.efficiency import served_latency
    from prerank.train.checkpoint import load_model

    for name in models:
        rows = [r for r in records if r["model"] == name and not r.get("is_teacher")]
        run = next((r for r in rows if r["seed"] == seed), rows[0] if rows else None)
        if run is None or any(r.get("latency_candidates") == candidates for r in rows):
            continue
        if on_step:
            on_step(f"{name} latency")
        if not Path(run["checkpoint"]).exists():
            log(f"{name}: no checkpoint at {run['checkpoint']}; latency not measured")
            continue
        _, model, _ = load_model(run["checkpoint"])
        got = served_latency(name, model, data_dir, out_dir / "artifacts" / name, candidates=candidates)
        got["latency_seed"] = run["seed"]
        for r in rows:
            r.update(got)
        log(f"{name}: p50 {got['latency_p50_ms']:.3f} ms per request of {candidates:,} candidates (onnx, 1 thread)")


def _teacher_record(
    path: Path, data_dir: Path, batch_size: int, teacher_data: str | Path | None = None
) -> dict[str, Any]:
    """The teacher's row: its test metrics (it was trained once, so it has no seed), cost and size; on
    ``teacher_data``'s test split (row-aligned with ``data_dir``'s) when given."""
    from prerank.data.align import check_aligned
    from prerank.train.checkpoint import load_model

    name, model, _ = load_model(path)
    if teacher_data is not None:
        check_aligned(teacher_data, data_dir, ["test"])
        data_dir = Path(teacher_data)
    if model.schema.features != Schema.load(data_dir).features:
        hint = "" if teacher_data is not None else " (a teacher of another feature set: pass --teacher-data)"
        raise ConfigError(f"the teacher {path} was trained on another schema than {data_dir}'s{hint}")
    test = _test_metrics(model, data_dir, batch_size)
    return {
        "model": f"teacher ({name})",
        "is_teacher": True,
        "seed": None,
        "data": str(data_dir),
        "auc": test["auc"],
        "logloss": test["logloss"],
        "gauc": test["gauc"],
        "params": num_params(model),
        "checkpoint": str(path),
        **_cost(model, data_dir),
        **{k: v for k, v in test.items() if k.startswith(LISTWISE_PREFIXES)},
    }


def popularity_predictions(data_dir: str | Path, split: str = "test", smoothing: float = 10.0) -> dict[str, np.ndarray]:
    """Predictions of the item-popularity scorer on ``split``: the log-odds of the item's click rate on the train
    split, ``(clicks + smoothing * rate) / (impressions + smoothing)`` with ``rate`` the overall click rate (an item
    never shown in training scores ``rate``). On cascade data only impressions count."""
    import pyarrow.parquet as pq

    def read(name: str) -> dict[str, np.ndarray]:
        files = ParquetSplit(data_dir, name).files
        present = set(pq.read_schema(files[0]).names)
        table = pq.read_table(files, columns=[c for c in ("item_id", "label", "request_id", "stage") if c in present])
        if "item_id" not in table.column_names:
            raise ConfigError(f"{data_dir}/{name} has no item_id column: no popularity baseline")
        return {c: table.column(c).to_numpy() for c in table.column_names}

    train, rows = read("train"), read(split)
    shown = train["stage"] == STAGES.index("impression") if "stage" in train else slice(None)
    items, labels = train["item_id"][shown], train["label"][shown].astype(np.float64)
    size = int(max(items.max(initial=0), rows["item_id"].max(initial=0))) + 1
    rate = float(labels.mean())
    ctr = (np.bincount(items, weights=labels, minlength=size) + smoothing * rate) / (
        np.bincount(items, minlength=size) + smoothing
    )
    p = np.clip(ctr[rows["item_id"]], 1e-6, 1 - 1e-6)
    return {**{k: v for k, v in rows.items() if k != "item_id"}, "logits": np.log(p / (1 - p))}


def _popularity_record(data_dir: Path) -> dict[str, Any]:
    test = evaluate_predictions(popularity_predictions(data_dir))
    return {
        "model": POPULARITY,
        "is_baseline": True,
        "seed": None,
        "data": str(data_dir),
        "auc": test["auc"],
        "logloss": test["logloss"],
        "gauc": test["gauc"],
        "gauc_requests_skipped": test.get("gauc_requests_skipped"),
    }


def _fill_relaimpr(records: list[dict[str, Any]]) -> None:
    base = {r["seed"]: r["auc"] for r in records if r["model"] == BASELINE}
    teacher = next((r["auc"] for r in records if r.get("is_teacher")), None)
    for r in records:
        if r.get("is_teacher"):
            continue
        if r["seed"] in base:
            r["relaimpr"] = metrics.relaimpr(r["auc"], base[r["seed"]])
        if teacher is not None:
            r["relaimpr_teacher"] = metrics.relaimpr(r["auc"], teacher)


def write_results(out_dir: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(out_dir / "results.json", json.dumps(records, indent=2))
    atomic_write_text(out_dir / "results.md", results_table(records))
