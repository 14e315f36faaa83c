"""RAG index at scale: query latency exact vs ANN, the ANN's recall@10 against exact search, build time,
memory and disk, at 100k and 1M chunks, through gptlab's own `RagIndex` (the layer users call).

    python bench/bench_rag_scale.py --sizes 100000,1000000 --out bench/results/rag_scale.md

Data: synthetic 384-dim unit vectors (all-MiniLM-L6-v2's dimension) drawn from a mixture of 2,000 Gaussian
clusters, because real sentence embeddings are clustered, and uniform random vectors in 384 dimensions
are the one distribution on which no ANN index works (every point is nearly equidistant); texts are 40
random words from a 5,000-word Zipf vocabulary (for the BM25 rebuild cost). Queries: 200 perturbed copies
of random stored vectors, so each has real near neighbours. Exact top-10 by numpy float32 dot products is
the reference for recall. Query latency = `RagIndex.search(retriever="vector", k=10)` minus nothing: the
synthetic embedder returns the prepared vector, so the figure is the index's own cost. Memory = peak RSS of
a fresh process that opens the index and runs the queries (the bench process holds the vectors itself).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gptlab.apps.rag.store import ANN_KINDS, DEFAULT_ANN, RagIndex, ann_config  # noqa: E402

DIM = 384
CLUSTERS = 2000
QUERIES = 200
K = 10


class PreparedEmbedder:
    """An embedder whose 'texts' are query keys `q:<i>` into a table of prepared vectors (see module doc)."""

    name = "synthetic-384"
    dim = DIM

    def __init__(self, queries: np.ndarray | None = None):
        self.queries = queries

    def embed(self, texts):
        return [self.queries[int(t.split(":")[1])] for t in texts]

    def count_tokens(self, text):
        return len(text.split())


def vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = centers[rng.integers(0, CLUSTERS, stop - start)]
        out[start:stop] += 0.6 * rng.standard_normal((stop - start, DIM)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed + 1)
    vocab = np.array([f"w{i}" for i in range(5000)])
    words = vocab[np.minimum(rng.zipf(1.3, (n, 40)) - 1, 4999)]
    return [" ".join(row) for row in words]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build(folder: Path, data: np.ndarray, words: list[str], batch: int = 50_000) -> RagIndex:
    """The table through `RagIndex._write` (the store's own write path), `batch` rows per commit. Rows go in
    as Arrow record batches, as LanceDB takes them, so that the bench measures the store, not dict building."""
    import pyarrow as pa

    index = RagIndex(folder, PreparedEmbedder(), create=True, ann_threshold=10**12)  # ANN built by hand below
    for start in range(0, len(data), batch):
        ids = np.arange(start, min(len(data), start + batch))
        flat = pa.array(data[ids].reshape(-1), pa.float32())
        rows = pa.table({"id": [f"c{i}" for i in ids], "file": [f"/synthetic/{i // 1000}.txt" for i in ids],
                         "file_hash": ["0"] * len(ids), "doc": [str(i // 1000) for i in ids],
                         "title": [""] * len(ids), "start": np.zeros(len(ids), np.int64),
                         "end": np.array([len(words[i]) for i in ids], np.int64),
                         "text": [words[i] for i in ids],
                         "vector": pa.FixedSizeListArray.from_arrays(flat, DIM)})
        index._write(rows, [])
    return index


def make_queries(data: np.ndarray, count: int) -> np.ndarray:
    """Perturbed copies of random stored vectors (each has real near neighbours), unit length."""
    rng = np.random.default_rng(1)
    queries = data[rng.integers(0, len(data), count)]
    queries = queries + 0.3 * rng.standard_normal(queries.shape).astype(np.float32) / np.sqrt(DIM)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def exact_top_k(queries: np.ndarray, data: np.ndarray, k: int = K) -> np.ndarray:
    """The reference: exact top-k by float32 dot product (= cosine for unit vectors), ids best first."""
    blocks = []
    for start in range(0, len(queries), 25):  # 25 x 1M scores at a time: bounded memory
        scores = queries[start:start + 25] @ data.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        blocks.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(blocks)


def query_script(folder: Path, queries_file: Path, count: int, nprobes: int | None, refine: int | None) -> str:
    return f"""
import json, sys, time
import numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_rag_scale import PreparedEmbedder
from gptlab.apps.rag.store import RagIndex
queries = np.load({str(queries_file)!r})[:{count}]
index = RagIndex({str(folder)!r}, PreparedEmbedder(queries))
index.ann_nprobes, index.ann_refine_factor = {nprobes!r}, {refine!r}
index.search("q:0", k={K}, retriever="vector")  # open the table, warm caches
times, ids = [], []
for i in range(len(queries)):
    t = time.perf_counter()
    hits = index.search(f"q:{{i}}", k={K}, retriever="vector")
    times.append(time.perf_counter() - t)
    ids.append([int(h.id[1:]) for h in hits])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so it would report the bench's own peak
hwm_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({{"times": times, "ids": ids, "rss_mb": hwm_kb / 1024}}))
"""


def run_queries(folder, queries_file, count=QUERIES, nprobes=None, refine=None) -> dict:
    out = subprocess.run([sys.executable, "-c", query_script(folder, queries_file, count, nprobes, refine)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def recall(found: list[list[int]], exact: np.ndarray) -> float:
    """Mean overlap of each query's found ids with its exact top-K (queries beyond len(found) unused)."""
    return float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact.tolist())]))


def pct(values, q):
    return 1000 * float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--nprobes", default="20,50", help="ANN settings to sweep (IVF partitions probed)")
    parser.add_argument("--refine", type=int, default=0, help="also try this refine_factor (0: none)")
    parser.add_argument("--ann", default=DEFAULT_ANN, choices=list(ANN_KINDS), help="ANN index kind (default %(default)s)")
    parser.add_argument("--flat-queries", type=int, default=QUERIES,
                        help="queries for the exact scan (fewer at 1M, where each takes ~1 s)")
    parser.add_argument("--keep", action="store_true", help="keep each table in --work (default: delete)")
    parser.add_argument("--bm25-max", type=int, default=100_000, help="measure the BM25 rebuild up to this size")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default="bench/results/rag_scale.md")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="rag_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    lines = ["# RAG index at scale (`RagIndex`, LanceDB, synthetic 384-dim clustered vectors)", "",
             f"Command: `python bench/bench_rag_scale.py --sizes {args.sizes} --nprobes {args.nprobes}"
             f"{' --refine ' + str(args.refine) if args.refine else ''} --ann {args.ann} "
             f"--flat-queries {args.flat_queries}`", "",
             f"Machine: {os.cpu_count()}-core CPU; load average {load:.1f} at start. Queries: {QUERIES}, k={K}, "
             "vector retriever; latency includes everything `RagIndex.search` does. Recall@10 = overlap with "
             "exact numpy top-10.", "",
             "| chunks | search | p50 ms | p99 ms | recall@10 | query-process peak RSS MB |",
             "|---:|---|---:|---:|---:|---:|"]
    facts, results = [], {}
    for n in [int(s) for s in args.sizes.split(",")]:
        folder = work / f"n{n}"
        shutil.rmtree(folder, ignore_errors=True)
        data = vectors(n, seed=0)
        queries = make_queries(data, QUERIES)
        queries_file = work / f"queries{n}.npy"
        np.save(queries_file, queries)
        exact = exact_top_k(queries, data)
        words = texts(n, seed=0)
        t = time.perf_counter()
        index = build(folder, data, words)
        write_s = time.perf_counter() - t
        del data
        disk_flat = du(folder)
        flat = run_queries(folder, queries_file, count=args.flat_queries)
        lines.append(f"| {n:,} | exact (flat, {len(flat['times'])} queries) | {pct(flat['times'], 50):.1f} | {pct(flat['times'], 99):.1f} | "
                     f"{recall(flat['ids'], exact):.3f} | {flat['rss_mb']:.0f} |")
        t = time.perf_counter()
        load_build = os.getloadavg()[0]
        index.build_ann(ann_config(args.ann))
        ann_s = time.perf_counter() - t
        disk_ann = du(folder)
        results[n] = {"write_s": write_s, "ann_build_s": ann_s, "disk_flat": disk_flat, "disk_ann": disk_ann,
                      "flat": flat}
        for nprobes in [int(p) for p in args.nprobes.split(",")]:
            for refine in [None] + ([args.refine] if args.refine else []):
                r = run_queries(folder, queries_file, nprobes=nprobes, refine=refine)
                label = f"{args.ann} nprobes={nprobes}" + (f" refine={refine}" if refine else "")
                lines.append(f"| {n:,} | {label} | {pct(r['times'], 50):.1f} | {pct(r['times'], 99):.1f} | "
                             f"{recall(r['ids'], exact):.3f} | {r['rss_mb']:.0f} |")
                results[n][label] = r
        bm25 = ""
        if n <= args.bm25_max:
            t = time.perf_counter()
            index._bm25_state()
            bm25 = f"; BM25 (bm25s) in-memory rebuild {time.perf_counter() - t:.1f} s"
        facts.append(f"- {n:,} chunks: LanceDB writes {write_s:.1f} s ({n / write_s:,.0f} chunks/s), ANN build "
                     f"{ann_s:.1f} s (load average {load_build:.1f} at its start); disk {disk_flat / 2**20:,.0f} MB without the ANN index, "
                     f"{disk_ann / 2**20:,.0f} MB with it ({disk_ann / 2**20 / (n / 100_000):,.0f} MB per 100k "
                     f"chunks){bm25}")
        print("\n".join(lines + [""] + facts), flush=True)
        Path(args.out).write_text("\n".join(lines + ["", *facts, "", "(run in progress: later sizes follow)"]) + "\n")
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    text = "\n".join(lines + ["", *facts, "", f"Load average at end: {os.getloadavg()[0]:.1f}; bench process "
                              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB "
                              "(holds the vectors and exact scores)."]) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
