"""``prerank cascade build``, ``evaluate`` and ``baselines``: full-stage cascade data and listwise metrics."""

from __future__ import annotations

from pathlib import Path

import typer

from prerank.cli import app
from prerank.cli.common import ProgressOpt, console, friendly_errors, print_json
from prerank.models.base import ConfigError

cascade_app = typer.Typer(
    help="Simulate a cascade (impressions, rank / pre-rank candidates, random items) and evaluate on it.",
    no_args_is_help=True,
)
app.add_typer(cascade_app, name="cascade")


def parse_resplit(text: str | None) -> tuple[float, float, float] | None:
    """``"70,10,20"`` (percentages or fractions) -> ``(0.7, 0.1, 0.2)``."""
    if text is None:
        return None
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError as e:
        raise ConfigError(f"--resplit must look like 70,10,20, got {text!r}") from e
    total = sum(parts)
    if len(parts) != 3 or min(parts) < 0 or total <= 0:
        raise ConfigError(f"--resplit needs three non-negative shares (train,valid,test), got {text!r}")
    return (parts[0] / total, parts[1] / total, parts[2] / total)


@cascade_app.command("build")
@friendly_errors
def build(
    data: Path = typer.Option(..., "--data", "-d", help="Impression dataset (schema.json, splits, items.parquet)."),
    teacher: Path = typer.Option(..., "--teacher", "-t", help="Teacher checkpoint (any registered model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the cascade dataset."),
    retrieve: int = typer.Option(200, "--retrieve", help="Unexposed items retrieved per request."),
    rank_candidates: int = typer.Option(20, "--rank-candidates", help="Teacher's top retrieved items kept."),
    prerank_candidates: int = typer.Option(40, "--prerank-candidates", help="Next retrieved items kept."),
    random: int = typer.Option(40, "--random", help="Random catalogue items per request."),
    popularity: str = typer.Option(
        "matched",
        "--popularity",
        help="'matched': random items and retrieval fill-in drawn by the split's impressions, so popularity cannot"
        " tell the stages apart; 'paper': random items uniform over items.parquet, fill-in the top training items.",
    ),
    unknown_items: str = typer.Option(
        "sample",
        "--unknown-items",
        help="'sample': with matched popularity, the unknown item id (items first seen after training) is drawn like"
        " the split's unknown impressions, so 'unknown' does not mark impressions; 'skip': candidates are known items.",
    ),
    rank_cut: str = typer.Option(
        "below_impressions",
        "--rank-cut",
        help="Candidates: 'below_impressions' (retrieved items the teacher scores below the request's lowest"
        " impression, as a ranker that exposed its top items would) or 'teacher_top' (the teacher's top items).",
    ),
    item_field: str = typer.Option("item_id", "--item-field", help="Categorical item-tower feature with the item id."),
    seed_from: str = typer.Option(
        "history",
        "--seed-from",
        help="Retrieval seeds: 'history' (the user's behaviour sequence before the request) or 'positives' "
        "(the request's positive impressions).",
    ),
    history_field: str = typer.Option(None, "--history-field", help="History sequence (default: auto-detected)."),
    co_window: int = typer.Option(5, "--co-window", help="Positives within this many positions co-occur."),
    neighbors: int = typer.Option(100, "--neighbors", help="Co-occurring items kept per item."),
    cross: str = typer.Option(
        "drop",
        "--cross",
        help="Cross features in the output: 'drop' (default), 'pad' (0 on unexposed rows) or 'compute' (computed for"
        " unexposed rows from their anchor impression's past-only / out-of-fold sources; needs --raw; MovieLens"
        " temporal recipes and Taobao UserBehavior).",
    ),
    raw: Path = typer.Option(
        None, "--raw", help="With --cross compute: the raw files the dataset was prepared from (its recipe re-run)."
    ),
    min_impressions: int = typer.Option(0, "--min-impressions", help="Keep users with at least this many rows."),
    min_positives: int = typer.Option(0, "--min-positives", help="Keep users with at least this many positives."),
    user_field: str = typer.Option(None, "--user-field", help="User id feature for the filter (default: request)."),
    resplit: str = typer.Option(None, "--resplit", help="Re-split pooled requests, e.g. 70,10,20."),
    resplit_by: str = typer.Option("time", "--resplit-by", help="Re-split by 'time' (earliest ts) or 'request'."),
    seed: int = typer.Option(0, "--seed", help="Seed of random items and of --resplit-by request."),
    chunk_rows: int = typer.Option(200_000, "--chunk-rows", help="Rows of work per in-memory chunk."),
    batch_size: int = typer.Option(4096, "--batch-size", help="Rows per teacher scoring batch."),
    threads: int = typer.Option(2, "--threads", help="torch intra-op threads."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    progress: bool = ProgressOpt,
) -> None:
    """Build a cascade dataset for full-stage sampling (RankTower Sec. 3.1) and listwise evaluation.

    Retrieval: item co-occurrence of the training split's positives, seeded with the user's history, topped up with
    the most popular training items. The teacher's order splits the retrieved items it scores below the request's
    impressions into rank candidates (top) and pre-rank candidates (next); random items (and the retrieval fill-in)
    are drawn from items.parquet in proportion to the split's impressions (--popularity, --rank-cut change both).

    Unexposed rows copy the request's user features and take item features from items.parquet. Their cross
    features are unknown, so cross features are dropped from the output unless --cross pad, or --cross compute
    --raw RAW (MovieLens temporal, Taobao UserBehavior: computed for the candidate from the recipe's past-only /
    out-of-fold sources).
    """
    import torch

    from prerank.data.cascade import CascadeConfig, build_cascade

    torch.set_num_threads(threads)
    config = CascadeConfig(
        retrieve=retrieve,
        rank_candidates=rank_candidates,
        prerank_candidates=prerank_candidates,
        random=random,
        popularity=popularity,  # type: ignore[arg-type]
        rank_cut=rank_cut,  # type: ignore[arg-type]
        unknown_items=unknown_items,  # type: ignore[arg-type]
        item_field=item_field,
        seed_from=seed_from,  # type: ignore[arg-type]
        history_field=history_field,
        co_window=co_window,
        neighbors=neighbors,
        cross=cross,  # type: ignore[arg-type]
        min_impressions=min_impressions,
        min_positives=min_positives,
        user_field=user_field,
        resplit=parse_resplit(resplit),
        resplit_by=resplit_by,  # type: ignore[arg-type]
        seed=seed,
        chunk_rows=chunk_rows,
        batch_size=batch_size,
    )
    provider = None
    if cross == "compute":
        from prerank.data.recipes import cross_features

        if raw is None:
            raise ConfigError("--cross compute needs --raw: the raw files the dataset was prepared from")
        provider = cross_features(data, raw)
    elif raw is not None:
        raise ConfigError("--raw is used with --cross compute only")
    summary = build_cascade(data, teacher, out, config, overwrite=overwrite, progress=progress, cross_features=provider)
    console.print(f"[green]cascade written to {out}")
    print_json(summary["splits"])


@cascade_app.command("evaluate")
@friendly_errors
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A pre-ranker checkpoint (best.pt)."),
    data: Path = typer.Option(..., "--data", "-d", help="Cascade dataset directory."),
    split: str = typer.Option("test", "--split", help="Split to evaluate."),
    ks: str = typer.Option("10,50,100", "--ks", help="K of Recall@K and NDCG@K, comma-separated."),
    cascade_ns: str = typer.Option("10,50", "--cascade-n", help="N of cascade recall@(5, N), comma-separated."),
    batch_size: int = typer.Option(16384, "--batch-size", help="Rows per scoring batch."),
    threads: int = typer.Option(2, "--threads", help="torch intra-op threads."),
) -> None:
    """Listwise metrics over each request's full list: Recall@K, NDCG@K, cascade recall, GAUC, AUC."""
    import torch

    from prerank.evaluate.listwise import evaluate_listwise
    from prerank.schema import Schema
    from prerank.train.checkpoint import load_model

    torch.set_num_threads(threads)
    name, model, _ = load_model(checkpoint)
    data_schema = Schema.load(data)
    if data_schema.features != model.schema.features:
        raise ConfigError(f"{checkpoint} was trained on other features than {data}/schema.json")
    result = evaluate_listwise(
        model, data, split, ks=_ints(ks, "--ks"), cascade_ns=_ints(cascade_ns, "--cascade-n"), batch_size=batch_size
    )
    print_json({"model": name, "split": split, **result})


@cascade_app.command("baselines")
@friendly_errors
def baselines(
    data: Path = typer.Option(..., "--data", "-d", help="Cascade dataset directory."),
    split: str = typer.Option("test", "--split", help="Split to evaluate."),
    item_field: str = typer.Option("item_id", "--item-field", help="Categorical item-tower feature with the item id."),
    ks: str = typer.Option("10,50,100", "--ks", help="K of Recall@K and NDCG@K, comma-separated."),
    cascade_ns: str = typer.Option("10,50", "--cascade-n", help="N of cascade recall@(5, N), comma-separated."),
) -> None:
    """The same metrics for two scorers that learn nothing: item popularity (training impressions) and the teacher.

    Print them beside every cascade table: what popularity alone reaches is what the simulated stages give away
    (its exposure_auc is how well it tells impressions from unexposed rows).
    """
    from prerank.evaluate.listwise import baseline_metrics

    result = baseline_metrics(
        data, split, item_field=item_field, ks=_ints(ks, "--ks"), cascade_ns=_ints(cascade_ns, "--cascade-n")
    )
    print_json({"split": split, **result})


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError as e:
        raise ConfigError(f"{option} must be comma-separated integers, got {text!r}") from e
