#!/usr/bin/env python3
"""Reference ANN numbers from hnswlib and Faiss on the same vectors as `needle bench ann`.

Usage:
    needle bench ann --items 1000000 --write-npy /tmp/ann   # writes base.npy + queries.npy
    python3 bench/ann_reference.py /tmp/ann
    # the compressed kinds (IVF-PQ 4-bit fast scan, IVF-SQ8, HNSW-SQ8), as for 10^7 vectors:
    needle bench ann --stream --items 10000000 --write-npy /tmp/ann7
    python3 bench/ann_reference.py /tmp/ann7 --compressed

The first run creates bench/.venv and installs numpy, hnswlib and faiss-cpu from PyPI into it
(hnswlib compiles from source, ~1 minute); later runs reuse it. The script then prints the same
markdown table as the Rust benchmark: ground truth from Faiss's exact inner-product index,
recall@10 / recall@100 against it, build time with all cores, and query rates with one thread
(queries handed over in one call, so Python's per-call overhead does not count against the
libraries) and with all threads.
"""

import argparse
import os
import sys
import time

from pyvenv import ensure_venv

PACKAGES = ["numpy", "hnswlib", "faiss-cpu"]


def recall(truth, got, k):
    """Mean |got[:k] ∩ truth[:k]| / k, as needle_index::recall_at_k computes it."""
    total = 0.0
    for t, g in zip(truth, got):
        t = set(int(x) for x in t[:k] if x >= 0)
        if not t:
            continue
        total += len(t.intersection(int(x) for x in g[:k])) / len(t)
    return total / len(truth)


def row(index, params, build_s, mem_mb, r10, r100, qps1, qpsn):
    mem = "-" if mem_mb is None else f"{mem_mb:.0f}"
    print(f"| {index} | {params} | {build_s:.1f} | {mem} | {r10:.4f} | {r100:.4f} | {qps1:.0f} | {qpsn:.0f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="folder holding base.npy and queries.npy")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef", default="100,128,160,200,300,500", help="comma-separated ef_search values")
    ap.add_argument("--skip-faiss-hnsw", action="store_true", help="only hnswlib (Faiss HNSW builds slowly at 1M)")
    ap.add_argument("--compressed", action="store_true",
                    help="Faiss IVF-PQ fast scan (SQ8 re-ranking), IVF-SQ8 and HNSW-SQ8 instead of the float indexes")
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (0: needle's default, min(4*sqrt(n), 16384))")
    ap.add_argument("--nprobe", default="8,16,32,64,128,256", help="comma-separated nprobe values")
    args = ap.parse_args()

    import numpy as np
    import faiss
    import hnswlib
    from importlib.metadata import version

    base = np.ascontiguousarray(np.load(os.path.join(args.dir, "base.npy")), dtype=np.float32)
    queries = np.ascontiguousarray(np.load(os.path.join(args.dir, "queries.npy")), dtype=np.float32)
    n, d = base.shape
    nq = queries.shape[0]
    k = args.k
    efs = [int(x) for x in args.ef.split(",") if x]
    threads = os.cpu_count()
    print(f"reference ANN libraries on {args.dir}: {n} vectors, dim {d}, {nq} queries, k={k}; "
          f"hnswlib {version('hnswlib')}, faiss {faiss.__version__}, numpy {np.__version__}\n")
    print(f"| index | params | build s | memory MB | recall@10 | recall@100 | q/s single-thread | q/s batched ({threads} threads) |")
    print("|---|---|---|---|---|---|---|---|")

    # Exact ground truth.
    faiss.omp_set_num_threads(threads)
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(d)
    flat.add(base)
    build = time.perf_counter() - t
    t = time.perf_counter()
    _, truth = flat.search(queries, k)
    qpsn = nq / (time.perf_counter() - t)
    faiss.omp_set_num_threads(1)
    sub = queries[: max(20, min(nq, 2_000_000_000 // (n * d)))]
    t = time.perf_counter()
    flat.search(sub, k)
    qps1 = len(sub) / (time.perf_counter() - t)
    row("faiss IndexFlatIP", "-", build, base.nbytes / 1e6, 1.0, 1.0, qps1, qpsn)
    del flat
    if args.compressed:
        compressed(args, base, queries, truth, threads)
        return

    # hnswlib: build with every core, as `needle` does.
    p = hnswlib.Index(space="ip", dim=d)
    p.init_index(max_elements=n, ef_construction=args.ef_construction, M=args.m, random_seed=42)
    p.set_num_threads(threads)
    t = time.perf_counter()
    p.add_items(base, np.arange(n))
    build = time.perf_counter() - t
    mem = p.index_file_size() / 1e6 if hasattr(p, "index_file_size") else None
    for ef in efs:
        p.set_ef(ef)
        p.set_num_threads(1)
        t = time.perf_counter()
        got, _ = p.knn_query(queries, k=k)
        qps1 = nq / (time.perf_counter() - t)
        p.set_num_threads(threads)
        t = time.perf_counter()
        p.knn_query(queries, k=k)
        qpsn = nq / (time.perf_counter() - t)
        row("hnswlib", f"M={args.m} ef_construction={args.ef_construction} ef={ef}", build, mem,
            recall(truth, got, 10), recall(truth, got, k), qps1, qpsn)
    del p

    if not args.skip_faiss_hnsw:
        faiss.omp_set_num_threads(threads)
        index = faiss.IndexHNSWFlat(d, args.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = args.ef_construction
        t = time.perf_counter()
        index.add(base)
        build = time.perf_counter() - t

        def set_ef(e):
            index.hnsw.efSearch = e

        faiss_sweep("faiss IndexHNSWFlat", f"M={args.m} efConstruction={args.ef_construction} efSearch=", index, build,
                    efs, set_ef, queries, truth, k, threads)


def faiss_sweep(name, spec, index, build, efforts, set_effort, queries, truth, k, threads):
    """One row per search effort: recall, queries/s on one thread and on all of them."""
    import faiss

    nq = queries.shape[0]
    mem = faiss.serialize_index(index).nbytes / 1e6
    for e in efforts:
        set_effort(e)
        faiss.omp_set_num_threads(1)
        t = time.perf_counter()
        _, got = index.search(queries, k)
        qps1 = nq / (time.perf_counter() - t)
        faiss.omp_set_num_threads(threads)
        t = time.perf_counter()
        index.search(queries, k)
        qpsn = nq / (time.perf_counter() - t)
        row(name, f"{spec}{e}", build, mem, recall(truth, got, 10), recall(truth, got, k), qps1, qpsn)


def compressed(args, base, queries, truth, threads):
    """IVF-PQ 4-bit fast scan with SQ8 re-ranking (needle's default compressed kind), IVF-SQ8
    and HNSW-SQ8, each built with all cores and swept over its search effort."""
    import numpy as np
    import faiss

    n, d = base.shape
    k = args.k
    nlist = args.nlist or min(int(round(4 * np.sqrt(n))), 16384)
    nprobes = [int(x) for x in args.nprobe.split(",") if x]

    def sweep(name, spec, index, build, efforts, set_effort):
        faiss_sweep(name, spec, index, build, efforts, set_effort, queries, truth, k, threads)

    def build(spec):
        faiss.omp_set_num_threads(threads)
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        t = time.perf_counter()
        index.train(base)
        index.add(base)
        return index, time.perf_counter() - t

    ps = faiss.ParameterSpace()
    m = d // 2
    spec = f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)"
    index, secs = build(spec)
    refine = faiss.downcast_index(index)
    refine.k_factor = 4  # re-rank 4k candidates, needle's default depth
    ivf = faiss.extract_index_ivf(refine.base_index)

    def set_nprobe(e):
        ivf.nprobe = e

    sweep("faiss IVF-PQ fast scan + SQ8", spec + " k_factor=4 nprobe=", index, secs, nprobes, set_nprobe)
    del index
    spec = f"IVF{nlist},SQ8"
    index, secs = build(spec)
    sweep("faiss IVF-SQ8", spec + " nprobe=", index, secs, nprobes, lambda e: ps.set_index_parameter(index, "nprobe", e))
    del index
    spec = "HNSW32,SQ8"
    index, secs = build(spec)
    sweep("faiss HNSW-SQ8", spec + " efSearch=", index, secs, [100, 128, 200, 300, 500],
          lambda e: ps.set_index_parameter(index, "efSearch", e))


if __name__ == "__main__":
    ensure_venv(".venv", PACKAGES, "hnswlib compiles from source", __file__)
    main()
