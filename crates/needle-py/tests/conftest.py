"""Fixtures of the Python package's tests: a small generated log (no network, no shared data),
and the `needle` command for parity checks."""

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import needle

REPO = Path(__file__).resolve().parents[3]


def generated_log(n_users=120, n_items=90, per_user=30, seed=7):
    """Users walk a ring of items with some jumps, so the next item is learnable."""
    rng = np.random.default_rng(seed)
    rows = []
    t = 1_000_000
    for u in range(n_users):
        cur = int(rng.integers(n_items))
        for _ in range(per_user):
            cur = (cur + 1) % n_items if rng.random() < 0.7 else int(rng.integers(n_items))
            t += int(rng.integers(1, 50))
            rows.append((u + 1, cur + 100, float(rng.integers(1, 6)), t))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame(
        {
            "item_id": np.arange(n_items) + 100,
            "title": [f"item {i}" for i in range(n_items)],
            "genres": ["a|b" if i % 3 == 0 else "c" for i in range(n_items)],
        }
    )
    return df, items


SMALL = {
    "model": {"kind": "youtubednn", "dim": 16, "max_seq_len": 10, "user_features": [], "hidden": [32]},
    "train": {"epochs": 2, "batch_size": 64, "threads": 2, "seed": 3},
}


@pytest.fixture(scope="session")
def log():
    return generated_log()


@pytest.fixture(scope="session")
def trained(log, tmp_path_factory):
    df, items = log
    data = needle.Dataset.from_pandas(df, items=items, item_title="title", item_features={"genres": "|"})
    out = tmp_path_factory.mktemp("runs") / "ytb"
    run = needle.train(SMALL, data, out=out, quiet=True)
    return run


def needle_bin():
    """The `needle` command: $NEEDLE_BIN, else the workspace's release or debug build."""
    for p in [os.environ.get("NEEDLE_BIN"), REPO / "target/release/needle", REPO / "target/debug/needle"]:
        if p and Path(p).is_file():
            return str(p)
    found = shutil.which("needle")
    if found:
        return found
    raise RuntimeError("no needle command: build it (cargo build -p needle) or set NEEDLE_BIN")
