"""What a bfloat16 item cache costs in accuracy: one trained checkpoint scored through a float32 and a bfloat16 cache.

    .venv/bin/python benchmarks/cache_precision.py --checkpoint RUN/best.pt --data DIR [--split test]
        [--candidates 1000] [--requests 200] [--top 10,100]

Both caches are built in memory from the same weights (`prerank.serve.export.build_item_cache`). Prints, for the
split's rows scored through each cache (encode_user, the cached item states, score) and through the full forward:
AUC, GAUC and logloss; the largest and mean absolute logit difference between the caches; and, for sampled
requests of N catalogue candidates (as `prerank bench` samples them, scored as the online scorer does on the eager
runtime, `Scorer.from_model`), the mean share of the float32 cache's top K that the bfloat16 cache also puts in its
top K.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from prerank.bench.efficiency import request_rows, sample_requests
from prerank.data.parquet import make_loader
from prerank.serve.export import ItemCache, build_item_cache
from prerank.serve.scorer import Scorer
from prerank.train.checkpoint import load_model
from prerank.train.trainer import evaluate_predictions


def split_logits(model, caches: dict[str, ItemCache], data: str, split: str) -> dict[str, np.ndarray]:
    """Per row of ``split``: the label, request id, full-forward logit and each cache's logit."""
    out: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for batch in make_loader(data, split, 16384, schema=model.schema):
            user = model.encode_user(batch)
            parts = {"full": model(batch)}
            for name, cache in caches.items():
                rows = cache.rows(batch.features[cache.id_feature])
                parts[name] = model.score(user, cache.gather(rows), batch)
            parts |= {"label": batch.label, "request_id": batch.request_id}
            for key, value in parts.items():
                if value is not None:
                    out.setdefault(key, []).append(value.float().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def top_overlap(model, caches: dict[str, ItemCache], data: str, n: int, requests: int, tops: list[int]) -> dict:
    """Mean share of the float32 cache's top K that the bfloat16 cache keeps, over sampled requests of n candidates."""
    ids = caches["float32"].ids().numpy()
    samples = sample_requests(request_rows(data, schema=model.schema), model.schema, ids, requests, n)
    scorers = {name: Scorer.from_model(model, cache, max_candidates=n) for name, cache in caches.items()}
    shares: dict[int, list[float]] = {k: [] for k in tops}
    with torch.inference_mode():
        for s in samples:
            got = {}
            for name, scorer in scorers.items():
                user, pair = scorer.user_batch(s.user), scorer.pair_batch(s.cross, n)
                got[name] = scorer.logits(user, caches[name].rows(torch.tensor(s.candidates)), pair)
            for k in tops:
                a = set(torch.topk(got["float32"], k).indices.tolist())
                b = set(torch.topk(got["bfloat16"], k).indices.tolist())
                shares[k].append(len(a & b) / k)
    return {k: (float(np.mean(v)), float(np.min(v))) for k, v in shares.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--top", default="10,100")
    args = p.parse_args()
    torch.set_num_threads(1)
    name, model, _ = load_model(args.checkpoint)
    model.eval()
    caches = {d: build_item_cache(model, args.data, cache_dtype=d) for d in ("float32", "bfloat16")}
    pred = split_logits(model, caches, args.data, args.split)
    print(f"{name} on {args.data} ({args.split}, {len(pred['label']):,} rows)")
    for key in ("full", "float32", "bfloat16"):
        m = evaluate_predictions({**pred, "logits": pred[key]})
        print(f"  {key:>8}: AUC {m['auc']:.5f}  GAUC {m['gauc']:.5f}  logloss {m['logloss']:.5f}")
    diff = np.abs(pred["float32"] - pred["bfloat16"])
    spread = pred["float32"].std()
    print(f"  |logit float32 - bfloat16|: max {diff.max():.2e}, mean {diff.mean():.2e}; logit std {spread:.3f}")
    tops = [int(k) for k in args.top.split(",")]
    for k, (mean, low) in top_overlap(model, caches, args.data, args.candidates, args.requests, tops).items():
        print(f"  top-{k} of {args.candidates} kept by bfloat16: mean {mean:.4f}, worst request {low:.2f}")


if __name__ == "__main__":
    main()
