"""``prerank export``, ``prerank serve`` and ``prerank bench``: artifacts, the HTTP service and latency."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from prerank.cli import app
from prerank.cli.common import friendly_errors
from prerank.serve.scorer import DEFAULT_MAX_CANDIDATES

console = Console()
# the bench table has 14 columns; a pipe or a log gets them unwrapped
wide = console if console.is_terminal else Console(width=220)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise typer.BadParameter(f"{option} must be a comma list of integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{option} must list integers >= 1, got {text!r}")
    return values


@app.command("export")
@friendly_errors
def export_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Model checkpoint (.pt) written by training."),
    data: Path = typer.Option(..., "--data", help="Dataset directory whose items.parquet is the catalogue to cache."),
    out: Path = typer.Option(..., "--out", help="Artifact directory to write (replaced atomically if it exists)."),
    chunk_rows: int = typer.Option(8192, "--chunk-rows", min=1, help="Items encoded per chunk (bounds memory)."),
    cache_dtype: str = typer.Option(
        "float32", "--cache-dtype", help="Item-cache storage: float32, or bfloat16 (half the bytes, rounded states)."
    ),
) -> None:
    """Export a checkpoint and its item cache as a serving artifact."""
    from prerank.serve.export import CACHE_DTYPES, export

    if cache_dtype not in CACHE_DTYPES:
        raise typer.BadParameter(f"--cache-dtype must be one of {sorted(CACHE_DTYPES)}, got {cache_dtype!r}")
    manifest = export(checkpoint, data, out, chunk_rows=chunk_rows, cache_dtype=cache_dtype)
    console.print(
        f"exported {manifest['model_name']} with {manifest['num_items']:,} cached items to {out} "
        f"(weights sha256 {manifest['weights_sha256'][:12]}...)",
        highlight=False,
    )


@app.command("serve")
@friendly_errors
def serve_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `prerank export`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; loopback unless you mean otherwise."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port to listen on."),
    max_candidates: int = typer.Option(DEFAULT_MAX_CANDIDATES, "--max-candidates", min=1, help="413 above this."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", min=1, help="413 for larger request bodies."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch intra-op threads."),
    unknown_items: str = typer.Option("fail", "--unknown-items", help="'fail' (422) or 'skip' unknown item ids."),
    log_level: str = typer.Option(
        "info", "--log-level", help="uvicorn log level: critical, error, warning, info, debug."
    ),
) -> None:
    """Serve an artifact over HTTP: POST /score, GET /health, GET /metadata."""
    import uvicorn

    from prerank.serve.app import create_app, is_loopback
    from prerank.serve.scorer import Scorer

    if unknown_items not in ("fail", "skip"):
        raise typer.BadParameter("--unknown-items must be 'fail' or 'skip'")
    scorer = Scorer.load(
        artifact,
        threads=threads,
        unknown_items=unknown_items,  # type: ignore[arg-type]
        max_candidates=max_candidates,
    )
    if not is_loopback(host):
        console.print(f"[yellow]warning:[/yellow] binding {host}, reachable from other machines", highlight=False)
    uvicorn.run(
        create_app(scorer, max_body_bytes=max_body_bytes), host=host, port=port, log_level=log_level, access_log=False
    )


@app.command("bench")
@friendly_errors
def bench_cmd(
    data: Path = typer.Option(..., "--data", help="Dataset directory: schema, catalogue and rows for requests."),
    artifact: str = typer.Option("", "--artifact", help="Comma list of artifact directories."),
    model: str = typer.Option("", "--model", help="Comma list of registry names (untrained, random init)."),
    candidates: str = typer.Option("100,1000,5000", "--candidates", help="Comma list of candidates per request."),
    threads: str = typer.Option("1,2", "--threads", help="Comma list of torch thread counts."),
    requests: int = typer.Option(200, "--requests", min=1, help="Timed requests per setting."),
    warmup: int = typer.Option(20, "--warmup", min=0, help="Untimed requests before timing."),
    out: Path | None = typer.Option(None, "--out", help="Write bench.json and bench.md here."),
    profile: bool = typer.Option(False, "--profile", help="Profile `score` of models that miss the latency target."),
    cache_dtype: str = typer.Option(
        "float32", "--cache-dtype", help="Comma list of item-cache storage dtypes for --model: float32, bfloat16."
    ),
) -> None:
    """Latency per request with the item cache vs the full forward, FLOPs per candidate and the FLOP bound."""
    from prerank.bench.efficiency import (
        COLUMNS,
        BenchConfig,
        profile_score,
        run_bench,
        table_rows,
        target_from_artifact,
        target_from_model,
        write_report,
    )
    from prerank.serve.export import CACHE_DTYPES

    artifacts = [a.strip() for a in artifact.split(",") if a.strip()]
    models = [m.strip() for m in model.split(",") if m.strip()]
    if not artifacts and not models:
        raise typer.BadParameter("give --artifact and/or --model")
    dtypes = [d.strip() for d in cache_dtype.split(",") if d.strip()]
    if not dtypes or any(d not in CACHE_DTYPES for d in dtypes):
        raise typer.BadParameter(f"--cache-dtype must list some of {sorted(CACHE_DTYPES)}, got {cache_dtype!r}")
    config = BenchConfig(
        candidates=_int_list(candidates, "--candidates"),
        threads=_int_list(threads, "--threads"),
        requests=requests,
        warmup=warmup,
    )
    targets = [target_from_artifact(a, data) for a in artifacts]
    targets += [target_from_model(m, data, cache_dtype=d) for m in models for d in dtypes]
    records = run_bench(targets, data, config)
    machine = records[0]["machine"]
    gflops, kernels = machine["matmul_gflops_1thread"], machine["native_kernels"]
    table = Table(title=f"prerank bench ({gflops} GFLOP/s 1-thread matmul at the start, native kernels {kernels})")
    for head, _, _ in COLUMNS:
        table.add_column(head, justify="right")
    for row in table_rows(records):
        table.add_row(*row)
    wide.print(table)
    if out is not None:
        write_report(records, out)
        console.print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}", highlight=False)
    if profile:
        n = max(config.candidates)
        for target in targets:
            mine = [r for r in records if (r["model"], r["cache_dtype"]) == (target.name, target.cache.cache_dtype)]
            if any(r["candidates"] == n and not r["latency_target_met"] for r in mine):
                wide.print(profile_score(target, data, n), highlight=False)
