"""Which LanceDB ANN index should `RagIndex` build? Build time, then recall@10 against exact search and
query latency through `RagIndex.search`, for several index types and settings on the same table.

    python bench/bench_rag_ann_build.py --n 100000 --configs ivf_hnsw_sq,ivf_pq,ivf_sq,ivf_rq

Data and queries as bench/bench_rag_scale.py (Gaussian-mixture 384-dim unit vectors). The table is written
once; each config replaces the index. Queries run in this process (warm), `--queries` of them, k=10, for
each (nprobes, refine_factor) pair; the scale bench measures the chosen config in fresh processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rag_scale import DIM, K, PreparedEmbedder, build, exact_top_k, make_queries, pct, recall, vectors  # noqa: E402

from gptlab.apps.rag.store import RagIndex, ann_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--configs", default="ivf_hnsw_sq,ivf_pq,ivf_sq,ivf_rq",
                        help="comma list of KIND[:partitions[:sub_vectors]] (see store.ann_config)")
    parser.add_argument("--probes", default="20:0,20:5,50:0,50:5", help="nprobes:refine_factor pairs")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="rag_ann_"))
    data = vectors(args.n, seed=0)
    queries = make_queries(data, args.queries)
    exact = exact_top_k(queries, data)
    print(f"n={args.n} dim={DIM} load average {os.getloadavg()[0]:.2f}", flush=True)
    folder = work / f"n{args.n}"
    if (folder / "rag.json").exists():
        index = RagIndex(folder, PreparedEmbedder(queries))
    else:
        t = time.perf_counter()
        index = build(folder, data, [""] * args.n)
        print(f"write {time.perf_counter() - t:.1f} s", flush=True)
        index._embedder = PreparedEmbedder(queries)
    del data
    for spec in args.configs.split(","):
        kind, *numbers = spec.split(":")
        partitions = int(numbers[0]) if numbers else None
        sub_vectors = int(numbers[1]) if len(numbers) > 1 else None
        load = os.getloadavg()[0]
        t = time.perf_counter()
        index.build_ann(ann_config(kind, partitions, sub_vectors))
        build_s = time.perf_counter() - t
        name = index.table.list_indices()[0].name
        stats = index.table.index_stats(name)
        print(f"{spec}: build {build_s:.1f} s (load average {load:.2f} -> {os.getloadavg()[0]:.2f}); {stats.index_type}, "
              f"{stats.num_indexed_rows} rows indexed, {stats.num_unindexed_rows} not", flush=True)
        for pair in args.probes.split(","):
            nprobes, refine = (int(x) for x in pair.split(":"))
            index.ann_nprobes, index.ann_refine_factor = nprobes, refine or None
            index.search("q:0", k=K, retriever="vector")
            times, found = [], []
            for i in range(len(queries)):
                t = time.perf_counter()
                hits = index.search(f"q:{i}", k=K, retriever="vector")
                times.append(time.perf_counter() - t)
                found.append([int(h.id[1:]) for h in hits])
            print(f"  nprobes={nprobes} refine={refine}: recall@10 {recall(found, exact):.3f} "
                  f"p50 {pct(times, 50):.1f} ms p99 {pct(times, 99):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
