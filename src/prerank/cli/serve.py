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
    formats: str = typer.Option(
        "torch,onnx", "--formats", help="Graph formats to write: torch (torch.export .pt2), onnx, or both."
    ),
    int8: bool = typer.Option(
        False, "--int8", help="Also write int8 (dynamically quantized) ONNX user and score graphs: --runtime onnx-int8."
    ),
) -> None:
    """Export a checkpoint as a serving artifact: user tower, item tower and scorer as torch.export and ONNX graphs,
    the item cache written by the exported item tower, and the weights; every file hashed in manifest.json."""
    from prerank.serve.export import CACHE_DTYPES, export
    from prerank.serve.graphs import FORMATS

    if cache_dtype not in CACHE_DTYPES:
        raise typer.BadParameter(f"--cache-dtype must be one of {sorted(CACHE_DTYPES)}, got {cache_dtype!r}")
    chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
    if not chosen or any(f not in FORMATS for f in chosen):
        raise typer.BadParameter(f"--formats must list some of {list(FORMATS)}, got {formats!r}")
    with console.status("exporting the graphs and writing the item cache"):
        manifest = export(
            checkpoint, data, out, chunk_rows=chunk_rows, cache_dtype=cache_dtype, formats=chosen, int8=int8
        )
    console.print(
        f"exported {manifest['model_name']} ({', '.join(sorted(manifest['graphs']))}) with "
        f"{manifest['num_items']:,} cached items to {out} (weights sha256 {manifest['weights_sha256'][:12]}...)",
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
    threads: int = typer.Option(1, "--threads", min=1, help="Intra-op threads of the runtime."),
    runtime: str = typer.Option(
        "onnx",
        "--runtime",
        help="What runs the graphs: onnx (onnxruntime), onnx-int8 (int8 graphs of `export --int8`), torch "
        "(torch.export programs), eager (the PyTorch model), native (the optional C backend of IntTower and "
        "RankTower; eager for other models).",
    ),
    unknown_items: str = typer.Option("fail", "--unknown-items", help="'fail' (422) or 'skip' unknown item ids."),
    log_level: str = typer.Option(
        "info", "--log-level", help="uvicorn log level: critical, error, warning, info, debug."
    ),
    workers: int = typer.Option(
        1, "--workers", min=1, help="Worker processes (each loads the artifact and scores one request at a time)."
    ),
    token: str = typer.Option(
        None,
        "--token",
        envvar="PRERANK_TOKEN",
        show_default=False,
        help="Bearer token every request but /health and /ready must carry (401 otherwise); required to bind an "
        "address beyond loopback. Prefer the environment variable: a flag shows in the process list.",
    ),
) -> None:
    """Serve an artifact over HTTP: POST /score, GET /health, GET /ready, GET /metadata. SIGTERM finishes the
    requests in flight, then exits."""
    import json
    import os

    import uvicorn

    from prerank.serve.app import SERVE_OPTIONS_ENV, TOKEN_ENV, create_app, is_loopback
    from prerank.serve.scorer import Scorer

    if unknown_items not in ("fail", "skip"):
        raise typer.BadParameter("--unknown-items must be 'fail' or 'skip'")
    if not is_loopback(host) and not token:
        raise ValueError(
            f"binding {host} makes the service reachable from other machines: give it a bearer token with --token "
            f"or the {TOKEN_ENV} environment variable (or bind 127.0.0.1)"
        )
    options = {
        "artifact": str(artifact),
        "runtime": runtime,
        "threads": threads,
        "unknown_items": unknown_items,
        "max_candidates": max_candidates,
    }
    scorer = Scorer.load(**options)  # type: ignore[arg-type]  (also checks the artifact before workers start)
    serve = {"host": host, "port": port, "log_level": log_level, "access_log": False}
    if workers == 1:
        uvicorn.run(create_app(scorer, max_body_bytes=max_body_bytes, token=token or None), **serve)
        return
    del scorer
    os.environ[SERVE_OPTIONS_ENV] = json.dumps({**options, "max_body_bytes": max_body_bytes})
    if token:
        os.environ[TOKEN_ENV] = token
    uvicorn.run("prerank.serve.app:app_from_env", factory=True, workers=workers, **serve)


@app.command("bench")
@friendly_errors
def bench_cmd(
    data: Path = typer.Option(..., "--data", help="Dataset directory: schema, catalogue and rows for requests."),
    artifact: str = typer.Option("", "--artifact", help="Comma list of artifact directories."),
    model: str = typer.Option("", "--model", help="Comma list of registry names (untrained, random init)."),
    candidates: str = typer.Option("100,1000,10000", "--candidates", help="Comma list of candidates per request."),
    threads: str = typer.Option(
        "1,2", "--threads", help="Comma list of thread counts (torch, onnxruntime and native threads)."
    ),
    requests: int = typer.Option(200, "--requests", min=1, help="Timed requests per setting and path."),
    warmup: int = typer.Option(20, "--warmup", min=0, help="Untimed requests per path before timing."),
    out: Path | None = typer.Option(None, "--out", help="Write bench.json and bench.md here."),
    cache_dtype: str = typer.Option(
        "float32", "--cache-dtype", help="Comma list of item-cache storage dtypes for --model: float32, bfloat16."
    ),
) -> None:
    """Latency per request, side by side: the full forward, and the cached request on PyTorch eager, the
    torch.export graphs, onnxruntime and the C kernels; plus the scorer with validation. Models given by --model
    are exported (random init) to a temporary directory first."""
    import tempfile

    from prerank.bench.efficiency import (
        COLUMNS,
        BenchConfig,
        machine_info,
        run_bench,
        table_rows,
        target_from_artifact,
        target_from_model,
        write_report,
    )
    from prerank.models.registry import MODELS
    from prerank.serve.export import CACHE_DTYPES

    artifacts = [a.strip() for a in artifact.split(",") if a.strip()]
    models = [m.strip() for m in model.split(",") if m.strip()]
    if not artifacts and not models:
        raise typer.BadParameter("give --artifact and/or --model")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise typer.BadParameter(f"unknown model {unknown[0]!r} in --model; registered: {', '.join(MODELS)}")
    dtypes = [d.strip() for d in cache_dtype.split(",") if d.strip()]
    if not dtypes or any(d not in CACHE_DTYPES for d in dtypes):
        raise typer.BadParameter(f"--cache-dtype must list some of {sorted(CACHE_DTYPES)}, got {cache_dtype!r}")
    config = BenchConfig(
        candidates=_int_list(candidates, "--candidates"),
        threads=_int_list(threads, "--threads"),
        requests=requests,
        warmup=warmup,
    )
    with tempfile.TemporaryDirectory(prefix="prerank-bench-") as workdir:
        with console.status("exporting the models to bench"):
            targets = [target_from_artifact(a, data, workdir) for a in artifacts]
            targets += [target_from_model(m, data, workdir, cache_dtype=d) for m in models for d in dtypes]
        records = run_bench(targets, data, config, progress=True)
    machine = records[0]["machine"] if records else machine_info()
    table = Table(title=f"prerank bench: p50 ms per request on {machine['cpu']} (native kernels {machine['native']})")
    for head, _ in COLUMNS:
        table.add_column(head, justify="left" if head in ("model", "cache") else "right")
    for row in table_rows(records):
        table.add_row(*row)
    wide.print(table)
    if out is not None:
        write_report(records, out)
        console.print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}", highlight=False)
