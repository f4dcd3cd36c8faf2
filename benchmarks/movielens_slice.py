"""Cut the first N ratings of ML-100K (RecBole atomic files, ../shared/data/ml-100k) into the CSV files a new user
would bring to ``prerank data prepare table``: an interaction log, a user table and an item table.

``interactions.csv``: user, item, liked (rating >= 4), time (ISO, UTC); ``users.csv``: user, age, gender,
occupation; ``items.csv``: item, year, genre (the first listed genre). The raw files stay where they are;
only the cut is written, to ``--out``.

    python benchmarks/movielens_slice.py --raw ../shared/data/ml-100k --rows 10000 --out /tmp/ml10k
"""

from __future__ import annotations

import argparse
import csv
import gzip
from datetime import UTC, datetime
from pathlib import Path


def _rows(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return [line.rstrip("\n").split("\t") for line in f][1:]  # the first line is RecBole's typed header


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path, required=True, help="folder with ml-100k.inter.gz, .user, .item")
    p.add_argument("--rows", type=int, default=10_000, help="ratings to keep (the first ones of the file)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    ratings = _rows(a.raw / "ml-100k.inter.gz")[: a.rows]
    users = {r[0] for r in ratings}
    items = {r[1] for r in ratings}
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "interactions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "liked", "time"])
        for user, item, rating, ts in ratings:
            when = datetime.fromtimestamp(int(float(ts)), UTC).strftime("%Y-%m-%d %H:%M:%S")
            w.writerow([user, item, int(float(rating) >= 4), when])
    with open(a.out / "users.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "age", "gender", "occupation"])
        w.writerows(r[:4] for r in _rows(a.raw / "ml-100k.user") if r[0] in users)
    with open(a.out / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item", "year", "genre"])
        movies = _rows(a.raw / "ml-100k.item")
        w.writerows([r[0], r[2] or "unknown", r[3].split(" ")[0]] for r in movies if r[0] in items)
    print(f"{len(ratings):,} ratings, {len(users):,} users, {len(items):,} items -> {a.out}")


if __name__ == "__main__":
    main()
