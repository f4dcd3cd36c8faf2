"""Test AUC on the rows of users never seen in training, of returning users, and pooled, for compare's models.

Where a time split's pooled AUC is lost (issue 25, docs/results.md "Small data"): a row's user is new when its
``user_id`` is 0 (the recipes' vocabularies hold training users only). Popularity is ``compare --popularity``'s
scorer. Each model is the first seed's best checkpoint of a ``prerank compare --out CMP`` run::

    python benchmarks/new_user_auc.py --data ml10k/data --runs ml10k/cmp_time/runs \\
        --models lr,two_tower,cold,int_tower,fit,rank_tower,fscd_preranker,distilled_dssm
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.parquet as pq
import torch
from sklearn.metrics import roc_auc_score

from prerank.train.checkpoint import load_model
from prerank.train.compare import popularity_predictions
from prerank.train.trainer import predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--runs", required=True, help="compare's runs folder (RUNS/MODEL/seed0/best.pt)")
    ap.add_argument("--models", required=True, help="comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    new = np.asarray(pq.read_table(f"{args.data}/test", columns=["user_id"]).column(0)) == 0
    pop = popularity_predictions(args.data)
    label = pop["label"]
    print(f"test rows: {int(new.sum())} of users never seen in training, {int((~new).sum())} of returning users\n")
    print("| scorer | AUC, new users | AUC, returning users | AUC, pooled |\n|---|---|---|---|")

    def row(name: str, scores: np.ndarray) -> None:
        parts = [roc_auc_score(label[m], scores[m]) for m in (new, ~new, np.ones_like(new))]
        print(f"| {name} | " + " | ".join(f"{a:.4f}" for a in parts) + " |")

    row("popularity", pop["logits"])
    for name in args.models.split(","):
        _, model, _ = load_model(f"{args.runs}/{name}/seed{args.seed}/best.pt")
        pred = predict(model, args.data, "test")
        if not np.array_equal(pred["label"], label):
            raise SystemExit(f"{name}: its test rows are not the data's ({args.data})")
        row(name, pred["logits"])


if __name__ == "__main__":
    main()
