"""Open-loop load test of `prerank serve` on loopback.

For each target rate it sends requests on a fixed schedule (request i at t0 + i / rate), whether or not
earlier ones have returned, for at most ``--duration`` seconds and ``--max-requests`` requests. Latency
is measured from each request's scheduled send time, so time a request spends waiting because the
server (or this client) fell behind counts against it (no coordinated omission). Requests carry user
and cross features from the dataset's rows and ``--candidates`` ids from its item catalogue.

Either starts the server itself from ``--artifact`` (a subprocess on 127.0.0.1 and a free port,
stopped at the end; ``--runtime`` picks what runs the graphs and ``--workers`` how many worker processes serve, as for
`prerank serve`; a comma list of worker counts runs every rate once per count, each on a fresh server) or targets
``--url``, which must be a loopback address.

    python benchmarks/load_test.py --artifact ART --data DATA --rates 50,100,200 --duration 10 [--runtime native]
    python benchmarks/load_test.py --artifact ART --data DATA --rates 100 --workers 1,2 --out load.json
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --data DATA --out load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from prerank.bench.efficiency import read_rows, request_rows, sample_requests
from prerank.io import atomic_write_text
from prerank.schema import Schema
from prerank.serve.app import is_loopback

SERVER = "import prerank.cli.serve; from prerank.cli import app; app()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    artifact: Path, port: int, threads: int, max_candidates: int, log: Path, runtime: str = "onnx", workers: int = 1
) -> subprocess.Popen:
    """`prerank serve ARTIFACT --runtime RUNTIME --workers WORKERS` on 127.0.0.1:port in a subprocess; returns once
    /ready answers."""
    cmd = [sys.executable, "-c", SERVER, "serve", str(artifact), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--threads", str(threads), "--max-candidates", str(max_candidates), "--log-level", "warning"]
    cmd += ["--runtime", runtime, "--workers", str(workers)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not answer /ready within 120 s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process and its live descendants (the workers) have used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        total += sum(cpu_seconds(int(c)) for c in children.read_text().split())
    return total


def payloads(data: Path, n_candidates: int, n_requests: int, seed: int) -> list[bytes]:
    """Pre-serialised ``POST /score`` bodies (so JSON encoding does not slow the client down)."""
    schema = Schema.load(data)
    items = read_rows(data, "items", 1_000_000, schema).features["item_id"].numpy()
    samples = sample_requests(
        request_rows(data, schema=schema), schema, np.unique(items), n_requests, n_candidates, seed
    )
    return [json.dumps({**s.payload(), "k": 100}).encode() for s in samples]


async def run_rate(
    url: str, bodies: list[bytes], rate: float, duration: float, max_requests: int, timeout: float
) -> dict[str, Any]:
    """One open-loop phase at ``rate`` requests/s."""
    n = int(rate * duration)
    if max_requests:
        n = min(n, max_requests)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        loop = asyncio.get_running_loop()

        async def one(i: int, scheduled: float) -> tuple[str, float, float]:
            try:
                r = await client.post("/score", content=bodies[i % len(bodies)], headers=headers)
                status = str(r.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            done = loop.time()
            return status, done - scheduled, done

        t0 = loop.time() + 0.1
        tasks, lag = [], 0.0
        for i in range(n):
            scheduled = t0 + i / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(lag, loop.time() - scheduled)
            tasks.append(asyncio.create_task(one(i, scheduled)))
        # the phase ends `timeout` seconds after its last scheduled send; what is still running then is cut off
        finished, pending = await asyncio.wait(tasks, timeout=max(0.0, t0 + n / rate + timeout - loop.time()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    results = [task.result() for task in finished]
    ok = np.array([lat for status, lat, _ in results if status == "200"]) * 1e3
    elapsed = max((done for _, _, done in results), default=loop.time()) - t0
    errors = Counter(status for status, _, _ in results if status != "200")
    if pending:
        errors["unfinished"] = len(pending)
    pct = (lambda q: float(np.percentile(ok, q))) if ok.size else (lambda q: float("nan"))
    return {
        "target_rps": rate,
        "sent": n,
        "ok": int(ok.size),
        "errors": dict(errors),
        "achieved_rps": ok.size / elapsed,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": float(ok.max()) if ok.size else float("nan"),
        "max_send_lag_ms": lag * 1e3,
        "seconds": elapsed,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--artifact", type=Path, help="Start `prerank serve ARTIFACT` on 127.0.0.1 and test it.")
    target.add_argument("--url", help="A running server on a loopback address, e.g. http://127.0.0.1:8000.")
    p.add_argument("--data", type=Path, required=True, help="Dataset the requests' features are taken from.")
    p.add_argument("--rates", default="50,100,200", help="Comma list of target requests per second.")
    p.add_argument("--duration", type=float, default=10.0, help="Seconds per rate.")
    p.add_argument("--max-requests", type=int, default=0, help="Cap on requests per rate (0: rate x duration).")
    p.add_argument("--candidates", type=int, default=1000, help="Candidates per request.")
    p.add_argument("--threads", type=int, default=1, help="Server runtime threads per worker (with --artifact).")
    p.add_argument(
        "--workers", default="1", help="Comma list of server worker-process counts (with --artifact), e.g. 1,2."
    )
    p.add_argument(
        "--runtime",
        default="onnx",
        choices=["onnx", "torch", "eager", "native"],
        help="What the server runs the graphs on (with --artifact), as `prerank serve --runtime`.",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="Per-request timeout in seconds.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = p.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not rates or min(rates) <= 0 or args.duration <= 0:
        p.error("--rates must be positive numbers and --duration > 0")
    if args.url is not None:
        host = httpx.URL(args.url).host
        if not is_loopback(host):
            p.error(f"--url must point at a loopback address (127.0.0.1, ::1, localhost), not {host!r}")

    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not workers or min(workers) < 1:
        p.error("--workers must list integers >= 1")
    bodies = payloads(args.data, args.candidates, 64, args.seed)
    results: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    for n_workers in workers if args.artifact is not None else [None]:
        meta = run_server(args, rates, bodies, n_workers, results)
    if args.out is not None:
        record = {"url": args.url, "artifact": str(args.artifact) if args.artifact else None}
        record |= {"candidates": args.candidates, "model": meta["model"], "threads": meta["threads"]}
        record["runtime"] = meta.get("runtime")
        atomic_write_text(args.out, json.dumps({**record, "results": results}, indent=2))


def run_server(
    args: argparse.Namespace, rates: list[float], bodies: list[bytes], workers: int | None, results: list
) -> dict[str, Any]:
    """Every rate against one server (started here with ``workers`` processes unless ``--url``); appends a record per
    rate to ``results`` and returns the server's metadata."""
    proc, url = None, args.url
    fd, name = tempfile.mkstemp(prefix="prerank-load-test-", suffix=".log")
    os.close(fd)
    log = Path(name)
    try:
        if args.artifact is not None:
            port = free_port()
            max_candidates = max(args.candidates, 10_000)
            proc = start_server(args.artifact, port, args.threads, max_candidates, log, args.runtime, workers or 1)
            url = f"http://127.0.0.1:{port}"
        meta = httpx.get(f"{url}/metadata", timeout=10).json()
        print(
            f"server: {meta['model']} on {meta.get('runtime')} ({meta['num_items']:,} items, {meta['threads']} "
            f"threads, {workers or '?'} worker processes) at {url}"
        )
        print(
            f"{'rate':>6} {'sent':>6} {'ok':>6} {'achieved/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
            f"{'srv CPU ms/req':>14}  errors"
        )
        for rate in rates:
            cpu0 = cpu_seconds(proc.pid) if proc is not None else None
            r = asyncio.run(run_rate(url, bodies, rate, args.duration, args.max_requests, args.timeout))
            r["workers"] = workers
            if cpu0 is not None and r["ok"]:
                # the server's own CPU (all its processes) per answered request: what the service costs
                r["server_cpu_ms_per_request"] = (cpu_seconds(proc.pid) - cpu0) / r["ok"] * 1e3
            results.append(r)
            print(
                f"{rate:>6g} {r['sent']:>6} {r['ok']:>6} {r['achieved_rps']:>10.1f} {r['p50_ms']:>8.2f} "
                f"{r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {r.get('server_cpu_ms_per_request', float('nan')):>14.2f}"
                f"  {r['errors'] or '-'}"
            )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        log.unlink()
    return meta


if __name__ == "__main__":
    main()
