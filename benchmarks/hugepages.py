"""Item cache memory as `prerank.serve.pages` lays it out, against the plainer layouts: what a server gains.

    python benchmarks/hugepages.py --data DIR [--models rank_tower,int_tower,two_tower] [--items 0,200000]
        [--candidates 5000] [--requests 400] [--threads 1]

For each model (untrained, on the data's schema) and catalogue size, the catalogue's cached item states are
tiled to ``--items`` rows (0: the catalogue as it is) and copied three times:

- ``off16``: each state array in ``np.zeros`` memory, 16 bytes past a 64-byte line, as numpy's arrays often
  start (``np.zeros``, ``np.load``: the library's cache memory before ``prerank.serve.pages``); numpy advises huge
  pages itself for arrays of 4 MiB or more;
- ``lines``: each array in torch's memory, from a 64-byte line, in 4 KiB pages (unless the OS makes every page
  huge);
- ``pages``: all arrays in one :func:`prerank.serve.pages.zeros_many` block, as the library now allocates a
  built or loaded cache (huge pages where the OS grants them).

Each copy gets its bound request path (``PreRanker.bind``, what ``prerank serve`` runs); requests of
``--candidates`` random rows rotate over the three in one process, so that the machine's drift hits all alike.
Prints p10/p50/p90 ms of each, the p50 ratios to ``off16``, and the huge-page memory the ``pages`` copy was granted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from prerank.bench.efficiency import request_rows, sample_requests
from prerank.models.registry import build_model
from prerank.schema import Schema
from prerank.serve import pages
from prerank.serve.export import build_item_cache
from prerank.serve.scorer import Scorer


def copy_into(raw: np.ndarray, t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into the bytes ``raw``."""
    return torch.from_numpy(raw).view(t.dtype).view(t.shape).copy_(t)


def off16(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` starting 16 bytes past a 64-byte line."""
    raw = np.zeros(t.numel() * t.element_size() + 128, np.uint8)
    start = -raw.ctypes.data % 64 + 16
    return copy_into(raw[start : start + t.numel() * t.element_size()], t)


def in_pages(states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``states`` in one :func:`pages.zeros_many` block."""
    raws = pages.zeros_many([((t.numel() * t.element_size(),), np.dtype(np.uint8)) for t in states.values()])
    return {k: copy_into(raw, t) for (k, t), raw in zip(states.items(), raws, strict=True)}


def anon_huge_kib() -> int:
    """AnonHugePages of this process, KiB (0 where /proc does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")), 0)
    except OSError:
        return 0


def bench(name: str, data: Path, items: int, n: int, requests: int, seed: int) -> dict:
    model = build_model(name, Schema.load(data)).eval()
    cache = build_item_cache(model, data)
    rng = np.random.default_rng(seed)
    size = items or cache.num_items
    tile = torch.from_numpy(rng.integers(1, cache.num_items + 1, size)) if items else torch.arange(1, size + 1)
    small = {k: v.index_select(0, torch.cat([torch.zeros(1, dtype=torch.long), tile])) for k, v in cache.states.items()}
    variants = {"off16": {k: off16(v) for k, v in small.items()}, "lines": small}
    before = anon_huge_kib()
    variants["pages"] = in_pages(small)
    granted = anon_huge_kib() - before
    probe = Scorer(model, cache, max_candidates=n)
    samples = sample_requests(request_rows(data, schema=model.schema), model.schema, cache.ids().numpy(), 16, n, seed)
    inputs = [
        (probe.user_batch(s.user), torch.from_numpy(rng.integers(1, size + 1, n)), probe.pair_batch(s.cross, n))
        for s in samples
    ]
    bound = {k: model.bind(states) for k, states in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for i in range(requests + 20):
            order = list(bound)[i % 3 :] + list(bound)[: i % 3]
            for k in order:
                start = time.perf_counter()
                bound[k](*inputs[i % len(inputs)])
                if i >= 20:  # warm-up
                    times[k].append((time.perf_counter() - start) * 1e3)
    p = {k: np.percentile(v, [10, 50, 90]) for k, v in times.items()}
    ratios = {k: p[k][1] / p["off16"][1] for k in ("lines", "pages")}
    return {"model": name, "items": size, "p": p, "ratios": ratios, "huge_mib": granted / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="Dataset directory (schema, catalogue, rows).")
    ap.add_argument("--models", default="rank_tower,int_tower,two_tower", help="Comma list of registry names.")
    ap.add_argument("--items", default="0,200000", help="Comma list of catalogue sizes (0: the data's own).")
    ap.add_argument("--candidates", type=int, default=5000)
    ap.add_argument("--requests", type=int, default=400, help="Timed requests per cache (after 20 of warm-up).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"huge pages requested: {pages.enabled()}; candidates {args.candidates}, threads {args.threads}")
    print("| model | items | off16 p10/p50/p90 ms | lines | pages | p50 lines/off16 | p50 pages/off16 | huge MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for items in (int(x) for x in args.items.split(",")):
            r = bench(name.strip(), args.data, items, args.candidates, args.requests, args.seed)
            cells = " | ".join("/".join(f"{x:.3f}" for x in r["p"][k]) for k in ("off16", "lines", "pages"))
            ratios = " | ".join(f"{r['ratios'][k]:.3f}" for k in ("lines", "pages"))
            print(f"| {r['model']} | {r['items']:,} | {cells} | {ratios} | {r['huge_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
