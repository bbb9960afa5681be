"""needle from Python: train on MovieLens-100k from a pandas DataFrame, evaluate, recall for two
users, and index the item vectors.

    pip install ./crates/needle-py pandas pyarrow
    python examples/quickstart.py [--data-dir DIR]

The ratings are read from DIR/ml-100k/u.data (or DIR/u.data), where DIR is --data-dir, else
$NEEDLE_DATA_DIR, else ./data; `needle data download ml-100k` fetches them.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

import needle


def ratings_file(data_dir: Path) -> Path:
    for p in (data_dir / "ml-100k" / "u.data", data_dir / "u.data"):
        if p.is_file():
            return p
    sys.exit(f"MovieLens-100k not found in {data_dir} (looked for ml-100k/u.data); "
             "download it with `needle data download ml-100k`, or pass --data-dir")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("NEEDLE_DATA_DIR", "data")))
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="needle-quickstart-")))
    ap.add_argument("--epochs", type=int, default=None, help="override the default config's epochs")
    args = ap.parse_args()

    ratings = pd.read_csv(ratings_file(args.data_dir), sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    data = needle.Dataset.from_pandas(ratings, rating="rating")
    print(data)

    # No config: needle picks the sequential model for a log of this size and says so.
    config = None
    if args.epochs is not None:
        config = needle.default_config(len(ratings))
        config["train"]["epochs"] = args.epochs
    run = needle.train(config, data, out=args.out / "run", force=True)
    print(run)
    print({k: round(v, 4) for k, v in run.evaluate(k=[10, 100]).items() if k.startswith(("hit_rate", "ndcg"))})

    ids, scores = run.recall(users=[1, 2], k=10)
    for user, items, s in zip([1, 2], ids, scores):
        print(f"user {user}: {items[:5].tolist()} (scores {[round(float(x), 3) for x in s[:5]]})")

    item_ids, vectors = run.item_vectors()
    index = needle.Index.build(vectors, ids=item_ids, kind="hnsw")
    _, user_vectors = run.user_vectors(users=[1, 2])
    found, _ = index.search(user_vectors, k=10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, run.recall(users=[1, 2], k=10, keep_seen=True)[0])])
    print(f"{index}: top-10 overlap with exact recall {overlap:.2f}")


if __name__ == "__main__":
    main()
