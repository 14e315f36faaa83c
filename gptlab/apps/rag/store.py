"""`RagIndex`: chunks, their vectors and metadata in an embedded LanceDB table, with BM25 (bm25s), vector and
hybrid (reciprocal rank fusion) retrieval.

Design decisions
- Why LanceDB rather than Qdrant's local mode: LanceDB is an embedded columnar store (Lance files on
  disk, Apache Arrow in and out) built for this use: no server, data larger than memory, every write a
  versioned atomic commit, SQL filters, and an on-disk ANN index (IVF/HNSW) built on demand. Qdrant's
  local mode (qdrant-client with `path=`) is meant for development and tests: it loads the collection
  into memory, searches by brute force (the HNSW index lives in the server only), locks the folder
  against a second process, and warns that it is not recommended past 20,000 points; a real corpus
  would need the Qdrant server running next to us. LanceDB also speaks pyarrow, already a dependency.
- One table `chunks`: id, file, file_hash, doc, title, start, end, text, vector. The table is also the
  manifest for incremental indexing: a file is up to date iff its rows carry its current sha256. A file's
  old rows are deleted and its new rows added in one batch (a batch is a few files' worth of chunks);
  each LanceDB write is an atomic commit, so an interrupted run leaves whole files or no trace of them,
  and the next run redoes only what is missing (resume). Files that no longer exist are removed; files
  that exist but were not named this time are kept (the index accumulates across runs).
- `rag.json` records the embedder's name and dimension and the chunking parameters at creation; any later
  open with another embedder (name or dimension) is a GptlabError naming both.
- Vector search is exact (flat) below `ann_threshold` chunks, where it takes milliseconds; past it an
  IVF_SQ cosine index (k-means partitions, LanceDB's default sqrt(rows) of them, vectors kept as 8-bit
  scalar codes) is (re)built after an update that changed rows. Not IVF-HNSW-SQ (session 10's choice):
  LanceDB's default target partition for it is ~1M rows, so below that it builds one HNSW graph over the
  whole table (m 20, ef_construction 300), which took 917 s at 100k chunks and 154 s at 20k on the loaded
  2-core machine, against 5 s for IVF_SQ at 20k (7.8 s at 100k) with the same recall@10 (0.99 at 20k,
  0.97 at 100k, both 1.000 with refine_factor 5). Not IVF_PQ: 360 s to train 48 sub-quantisers at 20k,
  recall@10 0.84 (0.96 re-ranked). bench/bench_rag_ann_build.py holds the comparison.
- BM25 (bm25s, English stopwords, no stemming) is built in memory on the first BM25/hybrid query from the
  table's text column and cached until the table changes: simpler than keeping a second on-disk index in
  sync (the rebuild took 18.9 s at 100k chunks on the loaded machine, bench/results/rag_scale.md; the latency
  table in bench/results/rag.md excludes it).
- Hybrid = reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR 2009): score(d) = sum over the
  rankings r of 1 / (60 + rank_r(d)), ranks from 1, each ranking cut at `depth` (default max(50, 4k)).
  RRF needs no score calibration between BM25's unbounded scores and cosines.
- Every hit also carries `similarity`, the cosine of the query and the chunk whatever the retriever: it
  is the relevance gate for "I don't know" in answer.py.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import time
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...common import GptlabError, atomic_write_json, get_logger, read_json
from .chunking import chunk_text
from .embedders import DEFAULT_EMBEDDER, Embedder, open_embedder
from .readers import Document, Unreadable, find_files, read_documents

log = get_logger("rag")

META_FILE = "rag.json"
TABLE = "chunks"
RETRIEVERS = ("bm25", "vector", "hybrid")
RRF_K = 60
ANN_THRESHOLD = 20_000
ANN_KINDS = {"ivf_hnsw_sq": "IvfHnswSq", "ivf_hnsw_pq": "IvfHnswPq", "ivf_pq": "IvfPq", "ivf_sq": "IvfSq",
             "ivf_rq": "IvfRq", "ivf_flat": "IvfFlat"}
DEFAULT_ANN = "ivf_sq"
# IVF partitions probed per query, and the re-ranking of refine_factor * k candidates by their full float32
# vectors: at 1M synthetic chunks recall@10 0.965 -> 1.000 for +4 ms p50 (13 -> 18 ms, load ~6), and the
# hits' cosines become exact rather than 8-bit estimates (the "I don't know" gate compares them to 0.30)
ANN_NPROBES = 20
ANN_REFINE_FACTOR = 5
_TEXT_COLUMNS = ["id", "file", "doc", "title", "start", "end", "text"]


@dataclass
class Hit:
    id: str
    file: str
    doc: str
    title: str
    start: int
    end: int
    text: str
    score: float  # the retriever's own score: BM25 score, cosine, or RRF score
    similarity: float  # cosine(query, chunk), whatever the retriever


@dataclass
class IndexStats:
    files_seen: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    empty: list[str] = field(default_factory=list)
    documents: int = 0
    chunks_embedded: int = 0
    seconds: float = 0.0
    total_chunks: int = 0

    def line(self) -> str:
        rate = self.chunks_embedded / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.files_seen} files ({self.documents} documents read): {self.new} new, {self.changed} changed, "
                f"{self.unchanged} unchanged, {self.removed} removed, {len(self.skipped)} skipped, "
                f"{len(self.empty)} empty; "
                f"{self.chunks_embedded} chunks embedded in {self.seconds:.1f}s ({rate:.1f} chunks/s); "
                f"index holds {self.total_chunks} chunks")


def ann_config(kind: str = DEFAULT_ANN, num_partitions: int | None = None, num_sub_vectors: int | None = None):
    """A LanceDB cosine ANN index config of `kind` (one of ANN_KINDS); None: LanceDB's default for a setting
    (sqrt(rows) partitions; dim / 16 PQ sub-vectors)."""
    import lancedb.index as lance_index

    if kind not in ANN_KINDS:
        raise GptlabError(f"ANN index kind must be one of {', '.join(ANN_KINDS)}, got {kind!r}")
    options = {"distance_type": "cosine"}
    if num_partitions:
        options["num_partitions"] = num_partitions
    if num_sub_vectors and kind in ("ivf_pq", "ivf_hnsw_pq"):
        options["num_sub_vectors"] = num_sub_vectors
    return getattr(lance_index, ANN_KINDS[kind])(**options)


def _sql_list(values) -> str:
    return "(" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + ")"


def rrf_fuse(rankings: list[list[str]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion of ranked id lists: [(id, sum 1/(k + rank))], best first (ties: first seen)."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])


def source_matches(file: str, pattern: str) -> bool:
    """A --source glob against a stored (absolute) file path; a relative glob may match any tail of it."""
    return fnmatch.fnmatch(file, pattern) or (not os.path.isabs(pattern) and fnmatch.fnmatch(file, "*/" + pattern))


class RagIndex:
    """An index directory. `RagIndex(DIR)` opens one (its recorded embedder is loaded when first needed) or,
    with `create=True`, creates it for `embedder` (default all-MiniLM-L6-v2)."""

    def __init__(self, path: str | os.PathLike, embedder: Embedder | None = None, *, create: bool = False,
                 chunk_tokens: int = 200, overlap: int = 40, ann_threshold: int = ANN_THRESHOLD):
        import lancedb

        self.path = Path(path)
        meta_path = self.path / META_FILE
        if meta_path.is_file():
            self.meta = read_json(meta_path, "RAG index metadata")
            if embedder is not None and (embedder.name, embedder.dim) != (self.meta["embedder"], self.meta["dim"]):
                raise GptlabError(f"index {self.path} was built with embedder {self.meta['embedder']} "
                                  f"(dim {self.meta['dim']}), not {embedder.name} (dim {embedder.dim}); "
                                  f"query it with the same embedder or re-index into a new directory")
        elif create:
            embedder = embedder or open_embedder(DEFAULT_EMBEDDER)
            self.path.mkdir(parents=True, exist_ok=True)
            self.meta = {"embedder": embedder.name, "dim": embedder.dim, "chunk_tokens": chunk_tokens,
                         "overlap": overlap}
            atomic_write_json(meta_path, self.meta)
        else:
            raise GptlabError(f"{self.path} is not a RAG index (no {META_FILE}); build one with `gptlab rag index`")
        self._embedder = embedder
        self.ann_threshold = ann_threshold
        # read_consistency_interval 0: every read sees the latest commit, also one made by another process
        self.db = lancedb.connect(str(self.path / "lance"), read_consistency_interval=timedelta(0))
        self._table = None
        self._bm25_cache = None  # (table version, bm25s.BM25, rows as a list of dicts), built on first use
        # ANN search knobs (None: LanceDB's defaults); bench/bench_rag_scale.py measures recall vs latency
        self.ann_nprobes: int | None = ANN_NPROBES
        self.ann_refine_factor: int | None = ANN_REFINE_FACTOR

    # ---- plumbing ----------------------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = open_embedder(self.meta["embedder"])
            if self._embedder.dim != self.meta["dim"]:
                raise GptlabError(f"embedder {self.meta['embedder']} now gives dim {self._embedder.dim}, "
                                  f"the index {self.path} holds dim {self.meta['dim']}")
        return self._embedder

    @property
    def table(self):
        if self._table is None and TABLE in self.db.list_tables().tables:
            self._table = self.db.open_table(TABLE)
        return self._table

    def __len__(self) -> int:
        return 0 if self.table is None else self.table.count_rows()

    def _columns(self, names: list[str]):
        """These columns of every row, as a pyarrow table (the vectors stay on disk)."""
        return self.table.search().select(names).limit(None).to_arrow()

    def _file_hashes(self) -> dict[str, str]:
        if self.table is None:
            return {}
        columns = self._columns(["file", "file_hash"]).to_pydict()
        return dict(zip(columns["file"], columns["file_hash"]))

    def _write(self, rows: list[dict], replace_files: list[str]) -> None:
        """One batch: drop the files' old rows, add their new ones (each an atomic LanceDB commit)."""
        if self.table is not None and replace_files:
            self.table.delete("file IN " + _sql_list(replace_files))
        if not rows:
            return
        if self.table is None:
            import pyarrow as pa

            schema = pa.schema([("id", pa.string()), ("file", pa.string()), ("file_hash", pa.string()),
                                ("doc", pa.string()), ("title", pa.string()), ("start", pa.int64()),
                                ("end", pa.int64()), ("text", pa.string()),
                                ("vector", pa.list_(pa.float32(), self.meta["dim"]))])
            self._table = self.db.create_table(TABLE, data=rows, schema=schema)
        else:
            self.table.add(rows)

    # ---- indexing ------------------------------------------------------------------------------------------
    def update(self, paths: list[str], field: str = "text", batch_chunks: int = 256,
               progress: bool = True) -> IndexStats:
        """Index the files under `paths`: new and changed files are (re-)embedded, unchanged ones skipped,
        indexed files that no longer exist removed. Returns the counts (see IndexStats.line)."""
        from tqdm import tqdm

        self.embedder  # loads the model now, so that its load time is not counted as indexing time
        started = time.perf_counter()
        stats = IndexStats()
        indexed = self._file_hashes()
        gone = sorted(f for f in indexed if not os.path.exists(f))
        if gone:
            self._write([], gone)
            stats.removed = len(gone)
        files = find_files(paths)
        stats.files_seen = len(files)
        pending_rows: list[dict] = []
        pending_files: list[str] = []
        bar = tqdm(files, desc="indexing", unit="file", disable=not progress)
        for path in bar:
            key = str(path.resolve())
            try:
                data = path.read_bytes()
            except OSError as e:
                stats.skipped.append((str(path), e.strerror or str(e)))
                continue
            digest = hashlib.sha256(data).hexdigest()
            if indexed.get(key) == digest:
                stats.unchanged += 1
                continue
            try:
                documents = read_documents(path, data, field)
            except Unreadable as e:
                documents = None
                stats.skipped.append((str(path), str(e)))
            rows = self._chunk_rows(key, digest, documents) if documents is not None else []
            if not rows:
                if documents is not None:
                    stats.documents += len(documents)
                    stats.empty.append(str(path))
                if key in indexed:  # it had text before: its old chunks must go
                    pending_files.append(key)
                continue
            stats.documents += len(documents)
            stats.changed += key in indexed
            stats.new += key not in indexed
            pending_rows += rows
            pending_files.append(key)
            if len(pending_rows) >= batch_chunks:
                stats.chunks_embedded += self._flush(pending_rows, pending_files)
                pending_rows, pending_files = [], []
            bar.set_postfix(chunks=stats.chunks_embedded + len(pending_rows))
        stats.chunks_embedded += self._flush(pending_rows, pending_files)
        self._maybe_build_ann(changed=bool(stats.chunks_embedded or stats.removed))
        stats.seconds = time.perf_counter() - started
        stats.total_chunks = len(self)
        return stats

    def _chunk_rows(self, key: str, digest: str, documents: list[Document]) -> list[dict]:
        rows = []
        for document in documents:
            spans = chunk_text(document.text, self.embedder.count_tokens, self.meta["chunk_tokens"],
                               self.meta["overlap"])
            for span in spans:
                chunk_id = hashlib.sha1(f"{document.doc}\0{span.start}\0{digest}".encode()).hexdigest()[:16]
                rows.append({"id": chunk_id, "file": key, "file_hash": digest, "doc": document.doc,
                             "title": document.title, "start": span.start, "end": span.end,
                             "text": document.text[span.start:span.end]})
        return rows

    def _flush(self, rows: list[dict], files: list[str]) -> int:
        if not files:
            return 0
        vectors = self.embedder.embed([row["text"] for row in rows])
        for row, vector in zip(rows, vectors):
            row["vector"] = vector
        self._write(rows, files)
        return len(rows)

    def _maybe_build_ann(self, changed: bool) -> None:
        count = len(self)
        if not changed or count < self.ann_threshold:
            return
        self.build_ann()

    def build_ann(self, config=None) -> None:
        """(Re)build the cosine ANN index over the vectors (`config`: a lancedb.index config, default
        `ann_config()`)."""
        log.info("building the ANN index over %d chunks", len(self))
        self.table.create_index("vector", config=config or ann_config(), replace=True)

    # ---- retrieval ------------------------------------------------------------------------------------------
    def _bm25_state(self):
        version = self.table.version
        if self._bm25_cache is None or self._bm25_cache[0] != version:  # built for an older commit
            import bm25s

            rows = self._columns(_TEXT_COLUMNS).to_pylist()
            retriever = bm25s.BM25()
            retriever.index(bm25s.tokenize([row["text"] for row in rows], stopwords="en", show_progress=False),
                            show_progress=False)
            self._bm25_cache = (version, retriever, rows)
        return self._bm25_cache[1:]

    def _bm25(self, query: str, depth: int, allowed: set[str] | None) -> list[tuple[dict, float]]:
        import bm25s

        retriever, rows = self._bm25_state()
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.ids[0]:
            return []  # only stopwords or unknown words: BM25 has nothing to rank by
        mask = None if allowed is None else np.array([row["file"] in allowed for row in rows], dtype=np.float32)
        depth = min(depth, len(rows))
        indices, scores = retriever.retrieve(tokens, k=depth, show_progress=False, weight_mask=mask)
        return [(rows[i], float(s)) for i, s in zip(indices[0], scores[0]) if s > 0]

    def _vector(self, query_vector: np.ndarray, depth: int, allowed: set[str] | None) -> list[tuple[dict, float]]:
        search = self.table.search(query_vector).metric("cosine").limit(depth).select([*_TEXT_COLUMNS, "_distance"])
        if self.ann_nprobes:
            search = search.nprobes(self.ann_nprobes)
        if self.ann_refine_factor:
            search = search.refine_factor(self.ann_refine_factor)
        if allowed is not None:
            search = search.where("file IN " + _sql_list(sorted(allowed)), prefilter=True)
        return [({c: r[c] for c in _TEXT_COLUMNS}, 1.0 - float(r["_distance"])) for r in search.to_list()]

    def _similarities(self, ids: list[str], query_vector: np.ndarray) -> dict[str, float]:
        if not ids:
            return {}
        found = self.table.search().where("id IN " + _sql_list(ids)).select(["id", "vector"]).limit(len(ids)).to_list()
        return {r["id"]: float(np.dot(np.asarray(r["vector"], np.float32), query_vector)) for r in found}

    def search(self, query: str, k: int = 5, retriever: str = "hybrid", source: str | None = None,
               depth: int | None = None) -> list[Hit]:
        """Top-k chunks for `query`, best first; `source`: a glob that the chunk's file must match."""
        if retriever not in RETRIEVERS:
            raise GptlabError(f"retriever must be one of {', '.join(RETRIEVERS)}, got {retriever!r}")
        if k < 1:
            raise GptlabError(f"k must be >= 1, got {k}")
        if self.table is None or len(self) == 0:
            return []
        allowed = None
        if source is not None:
            allowed = {f for f in self._file_hashes() if source_matches(f, source)}
            if not allowed:
                return []
        depth = depth or max(50, 4 * k)
        query_vector = self.embedder.embed([query])[0]
        rankings: dict[str, list[tuple[dict, float]]] = {}
        if retriever in ("bm25", "hybrid"):
            rankings["bm25"] = self._bm25(query, depth if retriever == "hybrid" else k, allowed)
        if retriever in ("vector", "hybrid"):
            rankings["vector"] = self._vector(query_vector, depth if retriever == "hybrid" else k, allowed)
        if retriever == "hybrid":
            rows = {row["id"]: row for ranking in rankings.values() for row, _ in ranking}
            fused = rrf_fuse([[row["id"] for row, _ in ranking] for ranking in rankings.values()])[:k]
            scored = [(rows[i], score) for i, score in fused]
        else:
            scored = rankings[retriever][:k]
        # the vector ranking already carries each hit's cosine (past the ANN threshold, exact after the
        # refine step; without it, the scalar-quantised estimate, within ~0.01); look up only BM25-only hits
        similarity = {row["id"]: cosine for row, cosine in rankings.get("vector", [])}
        similarity.update(self._similarities([row["id"] for row, _ in scored if row["id"] not in similarity],
                                             query_vector))
        return [Hit(**row, score=score, similarity=similarity[row["id"]]) for row, score in scored]
