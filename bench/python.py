"""Benchmarks of the Python package against the `needle` command (results/python.md).

    python bench/python.py ingest [--rows 10000000] [--pandas]
        A generated pyarrow table (int64 user, item and time columns), or the pandas DataFrame
        of it, ingested: rows/s and the peak RSS growth against the Arrow table's bytes.
    python bench/python.py index --dir DIR [--k 100]
        needle.Index over DIR/base.npy (HNSW, the default parameters) searched with
        DIR/queries.npy one query per call (one thread) and batched (all cores): q/s and recall@10/100
        against exact search, for comparison with `needle bench ann --vectors
        DIR/base.npy --query-vectors DIR/queries.npy` (DIR from `needle bench ann --write-npy DIR`).
    python bench/python.py recall --run RUN [--k 100] [--rounds 3]
        run.recall for every user against `needle recall --users all` on the same run, medians of
        alternated rounds, each including the opening of the run; and whether the lists agree.

Run with the virtual environment that has the package (`bash .ci/test` makes target/venv).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import needle

REPO = Path(__file__).resolve().parents[1]


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def ingest(args) -> None:
    import pyarrow as pa

    rng = np.random.default_rng(42)
    n = args.rows
    table = pa.table(
        {
            "user_id": rng.integers(0, n // 100, n, dtype=np.int64),
            "item_id": rng.integers(0, n // 1000, n, dtype=np.int64),
            "timestamp": np.arange(n, dtype=np.int64),
        }
    )
    source = table
    if args.pandas:
        source = table.to_pandas()
        del table
        import pyarrow as pa  # noqa: F811

        table_bytes = pa.Table.from_pandas(source, preserve_index=False).nbytes
    else:
        table_bytes = table.nbytes
    base = rss_kb("VmRSS")
    # VmHWM is the process's peak so far; reset it where the kernel allows (Linux ≥ 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    t = time.perf_counter()
    data = needle.Dataset.from_pandas(source) if args.pandas else needle.Dataset.from_arrow(source)
    secs = time.perf_counter() - t
    peak = rss_kb("VmHWM")
    mb = table_bytes / 2**20
    print(f"| {'pandas DataFrame' if args.pandas else 'pyarrow table'} | {n:,} | {secs:.2f} s | {n / secs / 1e6:.1f} M rows/s | {mb:.0f} MB | "
          f"{(peak - base) / 1024:.0f} MB | {(peak - base) / 1024 / mb:.2f}× | {peak / 1024:.0f} MB |")
    print(data)


def index(args) -> None:
    base = np.load(Path(args.dir) / "base.npy")
    queries = np.load(Path(args.dir) / "queries.npy")
    k = args.k
    truth, _ = needle.Index.build(base, kind="exact").search(queries, k)
    t = time.perf_counter()
    ix = needle.Index.build(base, kind="hnsw")
    build = time.perf_counter() - t

    def recall_at(got, n):
        return np.mean([len(set(got[i, :n]) & set(truth[i, :n])) / n for i in range(len(queries))])

    t = time.perf_counter()
    got, _ = ix.search(queries, k)
    batched = len(queries) / (time.perf_counter() - t)
    t = time.perf_counter()
    for q in queries:
        ix.search(q, k)
    single = len(queries) / (time.perf_counter() - t)
    print(f"| needle.Index {ix.spec} | {build:.1f} s | {recall_at(got, 10):.4f} | {recall_at(got, k):.4f} | "
          f"{single:.0f} | {batched:.0f} |")


def recall(args) -> None:
    bin_ = os.environ.get("NEEDLE_BIN", str(REPO / "target/release/needle"))
    py_t, cli_t = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        run = needle.Run.open(args.run)
        ids, scores = run.recall(k=args.k)
        py_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = subprocess.run([bin_, "recall", "--run", args.run, "--users", "all", "--k", str(args.k)],
                             capture_output=True, text=True, check=True).stdout
        cli_t.append(time.perf_counter() - t)
    lines = out.strip().split("\n")
    same = sum(
        [str(x) for x in ids[i] if x != -1] == line.split("\t")[1].split(",") for i, line in enumerate(lines)
    )
    py_m, cli_m = statistics.median(py_t), statistics.median(cli_t)
    print(f"| recall, {len(lines)} users, k = {args.k} | {py_m:.2f} s | {cli_m:.2f} s | {py_m / cli_m:.2f} | "
          f"{same} of {len(lines)} lists equal |")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ingest")
    a.add_argument("--rows", type=int, default=10_000_000)
    a.add_argument("--pandas", action="store_true")
    c = sub.add_parser("index")
    c.add_argument("--dir", required=True)
    c.add_argument("--k", type=int, default=100)
    b = sub.add_parser("recall")
    b.add_argument("--run", required=True)
    b.add_argument("--k", type=int, default=100)
    b.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    {"ingest": ingest, "recall": recall, "index": index}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
