"""`gptlab serve --rag-index`: OpenAI's /v1/embeddings and grounded chat completions, through the official
openai client against a live server (tiny GPT, tiny real sentence-transformers model)."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

from _serve_helpers import LiveServer, make_model_dir, serve_app
from test_rag import CORPUS, _tiny_sentence_transformer
from gptlab.apps.rag import RagIndex
from gptlab.apps.rag.answer import DONT_KNOW
from gptlab.apps.rag.embedders import SentenceTransformerEmbedder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_rag")
    docs = tmp / "docs"
    docs.mkdir()
    for name, text in CORPUS.items():
        (docs / name).write_text(text)
    folder, _ = _tiny_sentence_transformer(tmp / "st")
    embedder = SentenceTransformerEmbedder(folder)
    index = RagIndex(tmp / "ix", embedder, create=True)
    index.update([str(docs)], progress=False)
    model_dir = make_model_dir(tmp / "model")
    mp = pytest.MonkeyPatch()
    app = serve_app(["serve", "--model", str(model_dir), "--rag-index", str(tmp / "ix")], mp)
    plain = serve_app(["serve", "--model", str(model_dir)], mp)
    servers = LiveServer(app), LiveServer(plain)
    yield {"folder": folder, "embedder": embedder, "index": index, "model": model_dir.name,
           "client": openai.OpenAI(base_url=servers[0].url + "/v1", api_key="x", max_retries=0),
           "plain": openai.OpenAI(base_url=servers[1].url + "/v1", api_key="x", max_retries=0)}
    for s in servers:
        s.stop()
    mp.undo()


def test_embeddings_match_the_index_embedder_in_both_encodings(served):
    texts = ["Paris is the capital of France.", "Cats purr."]
    expected = served["embedder"].embed(texts)
    # left out, the openai client asks for base64 and decodes it; asked explicitly, the caller decodes
    for encoding in ("float", None, "base64"):
        extra = {"encoding_format": encoding} if encoding else {}
        response = served["client"].embeddings.create(model=served["folder"], input=texts, **extra)
        rows = [d.embedding for d in sorted(response.data, key=lambda d: d.index)]
        if encoding == "base64":
            rows = [np.frombuffer(base64.b64decode(row), "<f4") for row in rows]
        np.testing.assert_allclose(np.array(rows, np.float32), expected, atol=1e-6)
        assert response.usage.prompt_tokens == sum(served["embedder"].count_tokens(t) for t in texts)


def test_embeddings_bad_requests(served):
    client = served["client"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError, match="token-id input is not supported"):
        client.embeddings.create(model=served["folder"], input=[[1, 2, 3]])
    with pytest.raises(openai.BadRequestError, match="dimensions 7 is not supported"):
        client.embeddings.create(model=served["folder"], input="x", dimensions=7)
    with pytest.raises(openai.NotFoundError, match="--rag-index DIR or --embedder"):
        served["plain"].embeddings.create(model=served["folder"], input="x")


def test_grounded_chat_returns_the_retrieved_sources(served):
    question = "Which river flows through Rome?"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    rag = {"k": 2, "retriever": "hybrid", "min_similarity": -1.0}
    client = served["client"]
    grounded = client.chat.completions.create(model=served["model"], messages=messages, max_tokens=4, temperature=0,
                                              extra_body={"rag": rag})
    plain = client.chat.completions.create(model=served["model"], messages=messages, max_tokens=4, temperature=0)
    sources = grounded.model_extra["rag_sources"]
    expected = served["index"].search(question, k=2, retriever="hybrid")
    assert [s["id"] for s in sources] == [h.id for h in expected] and [s["number"] for s in sources] == [1, 2]
    assert "rag_sources" not in (plain.model_extra or {})
    # the sources went into the prompt: each source's text costs tokens beyond the plain request
    tok_texts = sum(len(h.text.split()) for h in expected)
    assert grounded.usage.prompt_tokens > plain.usage.prompt_tokens + tok_texts
    stream = client.chat.completions.create(model=served["model"], messages=messages, max_tokens=4, temperature=0,
                                            stream=True,
                                            extra_body={"rag": rag})
    chunks = list(stream)
    with_sources = [c for c in chunks if (c.model_extra or {}).get("rag_sources")]
    assert len(with_sources) == 1 and with_sources[0].model_extra["rag_sources"] == sources
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == grounded.choices[0].message.content  # greedy: the same reply


def test_nothing_relevant_answers_dont_know_without_the_model(served):
    for stream in (False, True):
        response = served["client"].chat.completions.create(
            model=served["model"], messages=[{"role": "user", "content": "Who won?"}], max_tokens=4, stream=stream,
            extra_body={"rag": {"min_similarity": 1.01}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in response if c.choices)
        else:
            text = response.choices[0].message.content
            assert response.usage.completion_tokens == 0 and response.model_extra["rag_sources"] == []
        assert text == DONT_KNOW


def test_bad_rag_options(served):
    kwargs = dict(model=served["model"], messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="rag: k"):
        served["client"].chat.completions.create(**kwargs, extra_body={"rag": {"k": 0}})
    with pytest.raises(openai.BadRequestError, match="rag: retriever"):
        served["client"].chat.completions.create(**kwargs, extra_body={"rag": {"retriever": "grep"}})
    with pytest.raises(openai.NotFoundError, match="no embedder"):
        served["plain"].chat.completions.create(**kwargs, extra_body={"rag": True})
