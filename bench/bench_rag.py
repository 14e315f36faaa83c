"""RAG figures: retrieval recall per retriever, the "I don't know" threshold, answer F1 with retrieval vs
closed-book, indexing throughput against sentence-transformers + LanceDB used directly, query latency at
10k chunks.

Data: SQuAD-shifts (Miller et al., ICML 2020) as shipped inside the `bigbench` sdist (evaluation only: the
files carry BIG-bench's canary, never train on them):

    pip download --no-deps bigbench==1.0.0 -d /tmp/bb
    python bench/bench_rag.py --bigbench /tmp/bb/bigbench-1.0.0.tar.gz --out bench/results/rag.md

The index is built from the first --paragraphs paragraphs of every new_wiki article (one text file per
article); --questions questions are drawn (seed 0) from those paragraphs; Amazon-review questions asked
of the same index are the off-topic set for the threshold. Answers: SmolLM2-135M-Instruct
(`gptlab models get smollm2-135m-instruct`), greedy, on the first --answer-n questions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from gptlab.apps.llm import open_llm
from gptlab.apps.rag import RagIndex
from gptlab.apps.rag.embedders import open_embedder
from gptlab.apps.rag.evaluate import QA, answer_metrics, markdown_report, plot_report, retrieval_metrics, write_contexts

SUBSETS = "bigbench-1.0.0/bigbench/benchmark_tasks/squad_shifts/{}_v1.0.json"


def squad_shifts(tar_path: str, subset: str, paragraphs: int) -> list[QA]:
    with tarfile.open(tar_path) as tar:
        data = json.load(tar.extractfile(SUBSETS.format(subset)))["data"]
    out = []
    for number, article in enumerate(data):
        for paragraph in article["paragraphs"][:paragraphs]:
            for qa in paragraph["qas"]:
                out.append(QA(qa["question"], [a["text"] for a in qa["answers"]], paragraph["context"],
                              article.get("title") or f"{subset} {number}"))
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def calibrate(index: RagIndex, on_topic: list[QA], off_topic: list[QA]) -> tuple[list[str], float]:
    """Top-1 cosine of on-topic and off-topic questions; the threshold keeps ~97% of the on-topic ones."""
    on = [index.search(q.question, k=1, retriever="vector")[0].similarity for q in on_topic]
    off = [index.search(q.question, k=1, retriever="vector")[0].similarity for q in off_topic]
    lines = ["| questions | n | top-1 cosine p3 | p50 | p97 |", "|---|---:|---:|---:|---:|"]
    for name, values in (("on-topic (new_wiki, indexed)", on), ("off-topic (amazon_reviews)", off)):
        lines.append(f"| {name} | {len(values)} | {percentile(values, 3):.3f} | {percentile(values, 50):.3f} | "
                     f"{percentile(values, 97):.3f} |")
    rows = []
    for threshold in (0.2, 0.25, 0.3, 0.35, 0.4):
        rows.append(f"| {threshold:.2f} | {sum(v >= threshold for v in on) / len(on):.3f} | "
                    f"{sum(v < threshold for v in off) / len(off):.3f} |")
    lines += ["", "| threshold | on-topic answered | off-topic refused |", "|---:|---:|---:|", *rows]
    return lines, percentile(on, 3)


def direct_indexing(texts: list[str], folder: Path, model: str) -> float:
    """chunks/s of the plain recipe: SentenceTransformer.encode + lancedb.create_table, same chunks."""
    import lancedb
    from sentence_transformers import SentenceTransformer

    from gptlab.apps.models import resolve_model_dir

    encoder = SentenceTransformer(str(resolve_model_dir(model)), device="cpu")
    started = time.perf_counter()
    vectors = encoder.encode(texts, batch_size=64, normalize_embeddings=True)
    db = lancedb.connect(str(folder))
    db.create_table("chunks", data=[{"text": t, "vector": v} for t, v in zip(texts, vectors)])
    return len(texts) / (time.perf_counter() - started)


class RandomEmbedder:
    """Synthetic vectors for the latency test (the query's embedding time is measured apart)."""

    name, dim = "random-384", 384

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def embed(self, texts):
        v = self.rng.standard_normal((len(texts), self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def count_tokens(self, text):
        return len(text.split())


def latency(folder: Path, n_chunks: int, queries: list[str], ann: bool) -> dict[str, tuple[float, float]]:
    """p50/p99 ms of search() per retriever on n_chunks synthetic chunks (random words, random vectors)."""
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(20_000)]
    corpus = folder / "corpus"
    corpus.mkdir(parents=True)
    for f in range(100):  # 100 files of n_chunks/100 paragraph-sized chunks
        paragraphs = [" ".join(rng.choices(vocabulary, k=60)) + "." for _ in range(n_chunks // 100)]
        (corpus / f"{f}.txt").write_text("\n\n".join(paragraphs))
    index = RagIndex(folder / "ix", RandomEmbedder(), create=True, chunk_tokens=64, overlap=0,
                     ann_threshold=1000 if ann else 10**9)
    index.update([str(corpus)], progress=False)
    assert len(index) == n_chunks, len(index)
    out = {}
    for retriever in ("bm25", "vector", "hybrid"):
        index.search(queries[0], k=5, retriever=retriever)  # warm-up (builds BM25)
        times = []
        for query in queries:
            started = time.perf_counter()
            index.search(query, k=5, retriever=retriever)
            times.append((time.perf_counter() - started) * 1000)
        out[retriever] = (percentile(times, 50), percentile(times, 99))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bigbench", required=True, help="bigbench-1.0.0.tar.gz")
    parser.add_argument("--paragraphs", type=int, default=12, help="paragraphs per new_wiki article")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--off-topic", type=int, default=300)
    parser.add_argument("--answer-n", type=int, default=50)
    parser.add_argument("--embedder", default="all-minilm-l6-v2")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--latency-chunks", type=int, default=10_000)
    parser.add_argument("--out", default="bench/results/rag.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()

    def stage(name: str) -> None:
        print(f"[{time.perf_counter() - clock:6.0f}s] {name}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-rag-"))
    try:
        questions = squad_shifts(args.bigbench, "new_wiki", args.paragraphs)
        articles = write_contexts(questions, work / "corpus")
        sample = random.Random(0).sample(questions, min(args.questions, len(questions)))
        stage("indexing")
        embedder = open_embedder(args.embedder)
        index = RagIndex(work / "ix", embedder, create=True)
        stats = index.update([str(work / "corpus")], progress=False)
        chunk_texts = index.table.to_arrow().column("text").to_pylist()
        stage("direct indexing")
        direct_rate = direct_indexing(chunk_texts, work / "direct", args.embedder)
        stage("retrieval")
        retrieval = {name: retrieval_metrics(index, sample, name, progress=False)
                     for name in ("bm25", "vector", "hybrid")}
        off_topic = random.Random(0).sample(squad_shifts(args.bigbench, "amazon_reviews", 100), args.off_topic)
        calibration, p3 = calibrate(index, sample[:300], off_topic)
        stage("answers")
        llm = open_llm(args.model, threads=1)
        started = time.perf_counter()
        answers, rows = answer_metrics(index, llm, sample[:args.answer_n], k=3, max_tokens=24, progress=False)
        answer_seconds = time.perf_counter() - started
        plot_report(retrieval, answers, out.with_suffix(".png"))
        queries = [q.question for q in sample[:200]]
        stage("latency")
        flat = latency(work / "lat-flat", args.latency_chunks, queries, ann=False)
        ann = latency(work / "lat-ann", args.latency_chunks, queries, ann=True)
        embed_times = []
        for query in queries[:100]:
            started = time.perf_counter()
            embedder.embed([query])
            embed_times.append((time.perf_counter() - started) * 1000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()[0]
    lines = [
        "# Retrieval-augmented generation (`gptlab rag`)", "",
        f"Command: `python bench/bench_rag.py --bigbench bigbench-1.0.0.tar.gz --paragraphs {args.paragraphs} "
        f"--questions {args.questions} --answer-n {args.answer_n}`", "",
        f"Machine: 2-core CPU shared with other agents' work; load average {load_before:.1f} before, "
        f"{load_after:.1f} after (1 min). Everything on CPU, torch threads 1 for the LLM.", "",
        f"Data: SQuAD-shifts new_wiki (BIG-bench copy, canary-marked: evaluation only), first {args.paragraphs} "
        f"paragraphs of each of {articles} articles, one file per article: {stats.total_chunks} chunks "
        f"(all-MiniLM-L6-v2 tokens, 200 per chunk, overlap 40); {len(sample)} questions drawn from "
        f"{len(questions)} (seed 0). Embedder: {args.embedder}.", "",
        "## Retrieval", "",
        markdown_report(retrieval, answers, len(sample), len(rows)).strip(), "",
        f"The answers: {args.model} greedy, at most 24 tokens, top 3 hybrid chunks, short-answer instruction; "
        f"closed-book = the same model and instruction without sources. {answer_seconds:.0f} s for "
        f"{2 * len(rows)} generations. Figure: `{out.with_suffix('.png').name}`.", "",
        "## The \"I don't know\" threshold (top-1 cosine, MiniLM)", "", *calibration, "",
        f"3rd percentile of on-topic top-1 cosine: {p3:.3f}.", "",
        "## Indexing throughput (same chunks, same model, CPU)", "",
        "| pipeline | chunks/s |", "|---|---:|",
        f"| `RagIndex.update` (read, chunk, hash, embed, LanceDB, per-batch commits) | "
        f"{stats.chunks_embedded / stats.seconds:.1f} |",
        f"| sentence-transformers `encode` + `lancedb.create_table` directly | {direct_rate:.1f} |", "",
        f"## Query latency at {args.latency_chunks} chunks (synthetic text and 384-dim vectors, k=5)", "",
        "| retriever | flat p50 ms | flat p99 ms | ANN (IVF-HNSW-SQ) p50 ms | ANN p99 ms |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r} | {flat[r][0]:.1f} | {flat[r][1]:.1f} | {ann[r][0]:.1f} | {ann[r][1]:.1f} |" for r in flat],
        "", f"Embedding one query with MiniLM (not included above): p50 {percentile(embed_times, 50):.1f} ms, "
            f"p99 {percentile(embed_times, 99):.1f} ms.", "",
    ]
    out.write_text("\n".join(lines))
    # metrics only: the questions and replies stay out of the repository (BIG-bench canary data)
    out.with_suffix(".json").write_text(json.dumps({"retrieval": retrieval, "answers": answers,
                                                    "latency_flat": flat, "latency_ann": ann}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
