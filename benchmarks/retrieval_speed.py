"""Retrieval latency, throughput, recall and memory of the FAISS index kinds athwe builds.

    python benchmarks/retrieval_speed.py [--sizes 12000,100000,1000000] [--dim 64] [--out benchmarks/results/retrieval]

For each catalogue size the script generates item vectors with clustered structure (see
`clustered_items`), builds the exact, HNSW and IVF-PQ indexes with the defaults of
`athwe.retrieval.index.build_index` (the ones `athwe index` uses), and measures:

- build seconds and index bytes per item (serialized size / items);
- single-user latency p50/p95 (one query per search call, as `athwe retrieve --user` does);
- batch throughput (users/s, 1,024 queries per call, as `athwe retrieve --all-users` does);
- recall@10 against the exact index's top 10.

Learned recommender embeddings are not isotropic noise: items form topical clusters of very
different sizes, and norms vary with popularity. The generator reproduces both, so approximate
indexes are not flattered by uniform data.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from athwe.retrieval.index import EXACT_MAX_ITEMS, build_index, search_index
from athwe.utils import atomic_write_json, atomic_write_text

K = 10


def clustered_items(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items from a Gaussian mixture with Zipf-sized clusters and popularity-like norms; returns
    the vectors and the cluster centres (queries are drawn near a few centres)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(64, n // 500)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    sizes = 1.0 / np.arange(1, n_clusters + 1) ** 0.8
    assign = rng.choice(n_clusters, size=n, p=sizes / sizes.sum())
    spread = rng.uniform(0.3, 0.8, size=n_clusters).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 200_000):
        a = assign[lo:lo + 200_000]
        x[lo:lo + len(a)] = centres[a] + spread[a, None] * rng.standard_normal((len(a), d), dtype=np.float32)
    x *= rng.lognormal(0.0, 0.25, size=(n, 1)).astype(np.float32)
    return x, centres


def user_queries(centres: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Users mixing interest in 1-3 clusters, plus individual noise."""
    rng = np.random.default_rng(seed + 1)
    q = np.zeros((n, centres.shape[1]), dtype=np.float32)
    for i in range(n):
        picks = rng.choice(len(centres), size=rng.integers(1, 4), replace=False)
        q[i] = rng.dirichlet(np.ones(len(picks))) @ centres[picks]
    q += 0.5 * rng.standard_normal(q.shape, dtype=np.float32)
    return q


def measure(index, queries: np.ndarray, single: int, batch: int) -> dict:
    lat = []
    for i in range(single):
        t0 = time.perf_counter()
        search_index(index, queries[i:i + 1], K)  # one thread, as `athwe retrieve --user`
        lat.append((time.perf_counter() - t0) * 1000)
    qb = queries[:batch]
    index.search(qb[:16], K)  # warm-up
    t0 = time.perf_counter()
    _, ids = index.search(qb, K)
    batch_s = time.perf_counter() - t0
    return {"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "users_per_s": batch / batch_s, "ids": ids}


def main() -> None:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="12000,100000,1000000")
    ap.add_argument("--dim", type=int, default=64,
                    help="vector width (SASRec-size models: 64; ATHWE with 3 modalities: 192)")
    ap.add_argument("--kinds", default="flat,hnsw,ivfpq")
    ap.add_argument("--single", type=int, default=300, help="single-user searches timed per index")
    ap.add_argument("--batch", type=int, default=1024, help="queries per batch call")
    ap.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0 = library default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/retrieval")
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.load_before = os.getloadavg()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        items, centres = clustered_items(n, args.dim, args.seed)
        queries = user_queries(centres, max(args.single, args.batch), args.seed)
        exact_ids = None
        for kind in args.kinds.split(","):
            t0 = time.perf_counter()
            index, meta = build_index(items, kind)
            build_s = time.perf_counter() - t0
            nbytes = len(faiss.serialize_index(index))
            m = measure(index, queries, args.single, args.batch)
            ids = m.pop("ids") - 1  # FAISS ids are item ids (1-based)
            if kind == "flat":
                exact_ids = ids
            recall = None if exact_ids is None else float(np.mean(
                [len(set(a) & set(b)) / K for a, b in zip(ids, exact_ids)]))
            knobs = {k: v for k, v in meta.items() if k not in ("kind", "n_items", "dim")}
            row = {"items": n, "dim": args.dim, "kind": kind, "knobs": knobs, "build_s": round(build_s, 2),
                   "bytes_per_item": round(nbytes / n, 1), **{k: round(v, 3) for k, v in m.items()},
                   "recall@10": None if recall is None else round(recall, 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del index
    write(args, command, rows)


def write(args: argparse.Namespace, command: str, rows: list[dict]) -> None:
    import faiss

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"faiss": faiss.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
           "threads": args.threads or "default",
           "load_avg_before": [round(v, 2) for v in args.load_before],
           "load_avg_after": [round(v, 2) for v in os.getloadavg()]}
    atomic_write_json(out.with_suffix(".json"), {"command": command, "env": env, "rows": rows})
    lines = ["# Retrieval: exact vs HNSW vs IVF-PQ", "", f"Command: `{command}`", "",
             f"faiss {env['faiss']}, {env['cpus']} CPUs ({env['machine']}), FAISS threads: {env['threads']}. "
             f"Clustered synthetic item vectors (Zipf-sized Gaussian clusters, popularity-like norms), {args.dim}-d, "
             f"inner product, k={K}. Single-user latency: one query per call on one thread, "
             f"as `athwe retrieve --user` runs it ({args.single} calls); throughput: "
             f"{args.batch} queries per call. Recall@10 is against the exact index. Knobs are the defaults of "
             f"`athwe index` (`auto` picks exact up to {EXACT_MAX_ITEMS:,} items, IVF-PQ above). "
             f"Load average before/after: {env['load_avg_before']} / {env['load_avg_after']} "
             "(other jobs on the 2 cores inflate build times and batch throughput most).", "",
             "| items | index | knobs | build s | bytes/item | p50 ms | p95 ms | users/s (batch) | recall@10 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        knobs = ", ".join(f"{k}={v}" for k, v in r["knobs"].items()) or "-"
        rec = "1 (reference)" if r["kind"] == "flat" else f"{r['recall@10']:.4f}"
        lines.append(f"| {r['items']:,} | {r['kind']} | {knobs} | {r['build_s']:.1f} | {r['bytes_per_item']:.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['users_per_s']:,.0f} | {rec} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
