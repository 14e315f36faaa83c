"""Indexing throughput: `gptlab rag index` against sentence-transformers + LanceDB used directly by a short
script, interleaved A B A B in fresh processes, same corpus, model, batch size and torch threads.

    python bench/bench_rag_index_ab.py --files 8 --reps 5 --threads 1,2 --out bench/results/rag_index_ab.md

A = `gptlab rag index CORPUS --index DIR` (reads the files, hashes them, chunks by MiniLM tokens at sentence
boundaries, embeds, commits per batch, prints its stats line). B = `direct` below: the recipe a user would
write by hand, given the very chunk texts A makes (prepared once, untimed: B gets its chunking for free),
`SentenceTransformer.encode(batch_size=64, normalize_embeddings=True)` then one `lancedb.create_table`.
Both time themselves from after the model load to the end of the write (chunks/s in process), and the
harness also times each whole process (imports and model load included). Ratios are A/B pair by pair, so
a drift in the machine's load hits both sides of a pair alike. Corpus: the first `--files` State of the
Union addresses of ../shared/data/sotu (plain text, public domain).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = "all-minilm-l6-v2"
BATCH = 64  # SentenceTransformerEmbedder's batch_size


def prepare(work: Path, files: int, sotu: Path) -> int:
    """Copy the corpus and write the chunk texts gptlab makes of it (chunks.jsonl) for the direct side."""
    from gptlab.apps.rag.chunking import chunk_text
    from gptlab.apps.rag.embedders import open_embedder
    from gptlab.apps.rag.readers import read_documents

    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    embedder = open_embedder(MODEL)
    paths = sorted(sotu.glob("*.txt"))[:files]
    if not paths:
        raise SystemExit(f"no .txt files in {sotu} (give --sotu)")
    texts = []
    for path in paths:
        shutil.copy(path, corpus / path.name)
        for document in read_documents(path, path.read_bytes(), "text"):
            texts += [document.text[s.start:s.end] for s in chunk_text(document.text, embedder.count_tokens, 200, 40)]
    (work / "chunks.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return len(texts)


def direct(work: Path) -> None:
    """Side B: the plain recipe. Prints chunks and in-process seconds as JSON."""
    import lancedb
    from sentence_transformers import SentenceTransformer

    from gptlab.apps.models import resolve_model_dir

    texts = [json.loads(line)["text"] for line in (work / "chunks.jsonl").read_text().splitlines()]
    encoder = SentenceTransformer(str(resolve_model_dir(MODEL)), device="cpu", local_files_only=True)
    started = time.perf_counter()
    vectors = encoder.encode(texts, batch_size=BATCH, normalize_embeddings=True, show_progress_bar=False)
    db = lancedb.connect(str(work / "direct"))
    db.create_table("chunks", data=[{"text": t, "vector": v} for t, v in zip(texts, vectors)], mode="overwrite")
    print(json.dumps({"chunks": len(texts), "seconds": time.perf_counter() - started}))


def in_process(work: Path, reps: int, threads: int) -> None:
    """Both sides in one process with one loaded model, alternating, timed by CPU seconds of this process
    (time.process_time: what the work cost, not how long it waited for a core) and wall seconds."""
    import lancedb
    import torch

    from gptlab.apps.rag.embedders import open_embedder
    from gptlab.apps.rag.store import RagIndex

    torch.set_num_threads(threads)
    embedder = open_embedder(MODEL)
    texts = [json.loads(line)["text"] for line in (work / "chunks.jsonl").read_text().splitlines()]
    for rep in range(reps):
        for side in (("gptlab", "direct") if rep % 2 == 0 else ("direct", "gptlab")):
            shutil.rmtree(work / "inproc", ignore_errors=True)
            cpu, wall = time.process_time(), time.perf_counter()
            if side == "gptlab":
                RagIndex(work / "inproc", embedder, create=True).update([str(work / "corpus")], progress=False)
            else:
                vectors = embedder.model.encode(texts, batch_size=BATCH, normalize_embeddings=True,
                                                show_progress_bar=False)
                lancedb.connect(str(work / "inproc")).create_table(
                    "chunks", data=[{"text": t, "vector": v} for t, v in zip(texts, vectors)])
            print(f"{side}: {len(texts) / (time.process_time() - cpu):.2f} chunks per CPU s, "
                  f"{len(texts) / (time.perf_counter() - wall):.2f} chunks/s wall (load {os.getloadavg()[0]:.1f})",
                  flush=True)


def run_side(side: str, work: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    if side == "gptlab":
        shutil.rmtree(work / "index", ignore_errors=True)
        command = [sys.executable, "-m", "gptlab.cli", "rag", "index", str(work / "corpus"), "--index",
                   str(work / "index"), "--quiet"]
    else:
        command = [sys.executable, __file__, "direct", "--work", str(work)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out.returncode:
        raise SystemExit(f"{side} failed:\n{out.stderr[-2000:]}")
    if side == "gptlab":  # the stats line: "... N chunks embedded in S s (R chunks/s) ..."
        match = re.search(r"(\d+) chunks embedded in ([\d.]+)s", out.stdout)
        chunks, seconds = int(match.group(1)), float(match.group(2))
    else:
        result = json.loads(out.stdout.strip().splitlines()[-1])
        chunks, seconds = result["chunks"], result["seconds"]
    return {"chunks": chunks, "rate": chunks / seconds, "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="ab", choices=["ab", "prepare", "direct", "inprocess"])
    parser.add_argument("--work", default=None)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5, help="A B pairs per thread count (after one warm-up pair)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted A B pairs before each thread count")
    parser.add_argument("--sotu", default=str(ROOT.parent / "shared" / "data" / "sotu"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="rag_index_ab_"))
    if args.mode == "direct":
        return direct(work)
    chunks = prepare(work, args.files, Path(args.sotu))
    if args.mode == "prepare":
        return print(f"{chunks} chunks in {work}")
    if args.mode == "inprocess":
        return in_process(work, args.reps, int(args.threads.split(",")[0]))
    lines = ["# Indexing throughput: `gptlab rag index` vs sentence-transformers + LanceDB directly", "",
             f"Command: `python bench/bench_rag_index_ab.py --files {args.files} --reps {args.reps} "
             f"--threads {args.threads} --warmup {args.warmup}`", "",
             f"Corpus: the first {args.files} State of the Union addresses, {chunks} chunks (200 MiniLM tokens, "
             f"overlap 40); model {MODEL}, batch {BATCH}, CPU. Interleaved A B pairs in fresh processes (who goes first alternates), "
             f"{args.warmup} warm-up pair(s) not counted. Rates: chunks / in-process wall seconds (model load "
             "excluded); wall and CPU (user+sys): whole process, imports and model load included.", "",
             "| threads | load avg (1 min) start-end | gptlab chunks/s (median) | direct chunks/s (median) | "
             "ratio gptlab/direct, median [min-max] | whole-process wall s gptlab / direct (median) | "
             "whole-process CPU s gptlab / direct (median) |",
             "|---:|---|---:|---:|---|---|---|"]
    for threads in [int(t) for t in args.threads.split(",")]:
        load_start = os.getloadavg()[0]
        for _ in range(args.warmup):
            run_side("gptlab", work, threads), run_side("direct", work, threads)
        pairs = []
        for rep in range(args.reps):
            order = ("gptlab", "direct") if rep % 2 == 0 else ("direct", "gptlab")  # alternate who goes first
            results = {side: run_side(side, work, threads) for side in order}
            assert results["gptlab"]["chunks"] == results["direct"]["chunks"] == chunks, results
            pairs.append(results)
            print(threads, rep, {s: {k: round(v, 2) for k, v in r.items()} for s, r in results.items()}, flush=True)
        ratio = [p["gptlab"]["rate"] / p["direct"]["rate"] for p in pairs]
        med = lambda side, key: float(np.median([p[side][key] for p in pairs]))  # noqa: E731
        lines.append(f"| {threads} | {load_start:.1f}-{os.getloadavg()[0]:.1f} | {med('gptlab', 'rate'):.1f} | "
                     f"{med('direct', 'rate'):.1f} | {np.median(ratio):.3f} [{min(ratio):.3f}-{max(ratio):.3f}] | "
                     f"{med('gptlab', 'wall'):.1f} / {med('direct', 'wall'):.1f} | "
                     f"{med('gptlab', 'cpu'):.1f} / {med('direct', 'cpu'):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
