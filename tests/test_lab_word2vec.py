"""word2vec (gptlab.lab.word2vec, word2vec_eval): planted structure recovered on a synthetic corpus, the
subsampling and noise distributions against float64 formulas and against gensim's own tables, the word2vec
text/binary formats through gensim's KeyedVectors both ways, analogy and word-pair evaluation against
gensim's evaluate_word_analogies / evaluate_word_pairs on the same vectors, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from gensim.models import KeyedVectors, Word2Vec

from gptlab.cli import main as cli_main
from gptlab.common import GptlabError
from gptlab.lab import word2vec as w2v
from gptlab.lab import word2vec_eval as ev

TOPICS, PER_TOPIC = 8, 6


def topic_sentences(n_sentences: int, seed: int = 0) -> list[list[str]]:
    """Sentences of 8 words, each drawn from one topic's 6 words: words co-occur only within their topic."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_sentences):
        t = rng.integers(TOPICS)
        out.append([f"t{t}w{j}" for j in rng.integers(PER_TOPIC, size=8)])
    return out


def test_vectors_recover_planted_topics():
    sentences = topic_sentences(1500)
    vocab = w2v.Vocab.build(sentences, min_count=1)
    ids, sent = vocab.encode(sentences)
    cfg = w2v.Word2VecConfig(dim=16, window=3, negative=5, epochs=3, min_count=1, sample=0, threads=1)
    vectors, stats = w2v.train(ids, sent, vocab, cfg, progress=False)
    assert stats.words == 3 * 1500 * 8 and stats.pairs > 0
    wv = ev.WordVectors(vocab.words, vectors)
    same_topic = [n.split("w")[0] == w.split("w")[0] for w in vocab.words for n, _ in wv.neighbours(w, PER_TOPIC - 1)]
    # chance is 5 / 47 ~ 0.11; a working skip-gram puts nearly every topic mate first
    assert np.mean(same_topic) > 0.9


def test_subsampling_and_noise_against_formulas_and_gensim():
    counts = np.array([1000, 300, 50, 7, 1], dtype=np.int64)
    t = 1e-2
    f = counts / counts.sum()
    expected = np.minimum(1.0, (np.sqrt(f / t) + 1) * t / f)
    np.testing.assert_allclose(w2v.keep_probability(counts, t), expected, rtol=1e-12)
    assert expected[0] < 0.5 and expected[-1] == 1.0  # the formula really subsamples the frequent word
    np.testing.assert_array_equal(w2v.keep_probability(counts, 0), 1.0)
    noise = counts.astype(np.float64) ** 0.75
    np.testing.assert_allclose(w2v.noise_distribution(counts), noise / noise.sum(), rtol=1e-12)

    # gensim's tables on the same corpus: keep probability = sample_int / 2^32, noise = diff of cum_table
    sentences = topic_sentences(300) + [["t0w0"] * 50]
    vocab = w2v.Vocab.build(sentences, min_count=1)
    model = Word2Vec(vector_size=4, min_count=1, sample=1e-2, negative=5, workers=1)
    model.build_vocab(sentences)
    order = [model.wv.key_to_index[w] for w in vocab.words]
    sample_int = np.array([model.wv.get_vecattr(w, "sample_int") for w in vocab.words], dtype=np.float64)
    np.testing.assert_allclose(w2v.keep_probability(vocab.counts, 1e-2), sample_int / 2**32, atol=1e-9)
    cum = model.cum_table.astype(np.float64)
    gensim_noise = np.diff(np.concatenate([[0.0], cum]))[order] / cum[-1]
    np.testing.assert_allclose(w2v.noise_distribution(vocab.counts), gensim_noise, atol=1e-8)


def test_window_pairs_stay_in_sentence_and_window():
    ids = np.arange(12, dtype=np.int32)
    sent = np.array([0] * 5 + [1] * 7, dtype=np.int32)
    centres, contexts = w2v.window_pairs(ids, sent, 3, np.random.default_rng(0))
    assert len(centres) > 0
    assert np.all(sent[centres] == sent[contexts]) and np.all(np.abs(centres - contexts).clip(1) <= 3)
    assert np.all(centres != contexts)
    # with window 1 every neighbour pair appears in both directions, exactly once
    c1, x1 = w2v.window_pairs(ids, sent, 1, np.random.default_rng(0))
    want = {(i, i + 1) for i in range(11) if sent[i] == sent[i + 1]}
    assert sorted(zip(c1.tolist(), x1.tolist())) == sorted(want | {(b, a) for a, b in want})


@pytest.mark.parametrize("binary", [False, True])
def test_formats_round_trip_through_gensim(tmp_path, binary):
    rng = np.random.default_rng(1)
    words = ["the", "king", "queen", "don't", "café"]
    vectors = rng.normal(size=(5, 7)).astype(np.float32)
    path = tmp_path / ("v.bin" if binary else "v.txt")
    w2v.save_word2vec(path, words, vectors, binary=binary)
    kv = KeyedVectors.load_word2vec_format(str(path), binary=binary)
    assert kv.index_to_key == words
    np.testing.assert_array_equal(kv.vectors, vectors)  # 9 significant digits: float32 text is exact
    assert w2v.load_word2vec(path, binary)[0] == words
    np.testing.assert_array_equal(w2v.load_word2vec(path, binary)[1], vectors)
    # and what gensim writes, we read
    kv.save_word2vec_format(str(tmp_path / "g"), binary=binary)
    words_back, vectors_back = w2v.load_word2vec(tmp_path / "g", binary)
    assert words_back == words
    np.testing.assert_allclose(vectors_back, vectors, rtol=1e-6)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "v.bin"
    w2v.save_word2vec(path, ["a", "b"], np.ones((2, 4), np.float32), binary=True)
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(GptlabError, match="truncated in the vector of word 2"):
        w2v.load_word2vec(path, binary=True)


def planted_analogy_vectors() -> tuple[list[str], np.ndarray]:
    """Every word of questions-words.txt (plus mixed-case duplicates and distractors): the second word of a
    pair is the first plus its section's offset plus noise, so some analogies hold and some do not."""
    rng = np.random.default_rng(0)
    vec: dict[str, np.ndarray] = {}
    for section, questions in ev.read_analogies(ev.gensim_test_file("questions-words.txt")):
        offset = rng.normal(size=24)
        for a, b, c, d in questions:
            for x, y in ((a, b), (c, d)):
                x, y = x.lower(), y.lower()
                vec.setdefault(x, rng.normal(size=24))
                vec.setdefault(y, vec[x] + offset + rng.normal(scale=1.5, size=24))
    words = list(vec)
    words[5:5] = ["Paris", "KING"]  # case duplicates: gensim's rule keeps the most frequent (first) one
    vectors = [vec.get(w, rng.normal(size=24)) for w in words] + [rng.normal(size=24) for _ in range(200)]
    return words + [f"distractor{i}" for i in range(200)], np.array(vectors, dtype=np.float32)


@pytest.mark.parametrize("restrict", [300_000, 400])
def test_analogy_evaluation_matches_gensim(restrict, tmp_path):
    words, vectors = planted_analogy_vectors()
    kv = KeyedVectors(vectors.shape[1])
    kv.add_vectors(words, vectors)
    # every third question of each section (gensim answers one question per most_similar call: slow)
    lines = ev.gensim_test_file("questions-words.txt").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "questions.txt"
    path.write_text("\n".join(line for n, line in enumerate(lines) if line.startswith(":") or n % 3 == 0),
                    encoding="utf-8")
    _, sections = kv.evaluate_word_analogies(str(path), restrict_vocab=restrict)
    ours = ev.evaluate_analogies(ev.WordVectors(words, vectors), path, restrict_vocab=restrict)
    theirs = {s["section"]: (len(s["correct"]), len(s["correct"]) + len(s["incorrect"])) for s in sections}
    assert ours == theirs
    correct, asked = ours[ev.TOTAL]
    assert 0 < correct < asked  # the planted vectors make a test that can tell right from wrong answers


def test_word_pair_evaluation_matches_gensim():
    words, vectors = planted_analogy_vectors()
    for name in ("wordsim353.tsv", "simlex999.txt"):
        path = ev.gensim_test_file(name)
        lines = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line[:1] != "#"]
        pair_words = sorted({w.lower() for f in lines[::2] for w in f[:2]} - set(words))  # every other pair
        words = words + pair_words
        vectors = np.concatenate([vectors, np.random.default_rng(2).normal(size=(len(pair_words), 24))])
    kv = KeyedVectors(vectors.shape[1])
    kv.add_vectors(words, vectors.astype(np.float32))
    for name in ("wordsim353.tsv", "simlex999.txt"):
        path = ev.gensim_test_file(name)
        _, (rho, _), oov_percent = kv.evaluate_word_pairs(str(path))
        ours, used, total = ev.evaluate_word_pairs(ev.WordVectors(words, vectors), path)
        assert 100 < used < total
        assert ours == pytest.approx(rho, abs=1e-6)
        assert 100 * (total - used) / total == pytest.approx(oov_percent, abs=1e-9)


def test_analogy_query_and_errors():
    wv = ev.WordVectors(["king", "man", "woman", "queen"], np.array(
        [[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1]], dtype=np.float32))
    assert wv.analogy("King - man + woman", k=1)[0][0] == "queen"
    with pytest.raises(GptlabError, match="word 'prince' is not in the vocabulary"):
        wv.analogy("king - man + prince")
    with pytest.raises(GptlabError, match="has no words"):
        ev.parse_query(" - + ")


def test_corpus_too_small():
    with pytest.raises(GptlabError, match=r"corpus too small for the vocabulary: 3 distinct words .* at least 10"):
        w2v.Vocab.build([["a", "b", "c"]] * 5, min_count=5)


def test_cli_trains_writes_and_fails_cleanly(tmp_path, capsys):
    corpus = tmp_path / "topics.txt"
    corpus.write_text("\n".join(" ".join(s) for s in topic_sentences(400)), encoding="utf-8")
    out = tmp_path / "out"
    args = ["lab", "word2vec", "--corpus", str(corpus), "--dim", "8", "--epochs", "1", "--min-count", "1",
            "--quiet", "--out", str(out)]
    assert cli_main(args + ["--query", "t0w0 - t0w1 + t1w1", "--plot-words", "t0w0,t1w0", "--k", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["neighbours.png", "report.md", "vectors.bin", "vectors.txt"]
    assert KeyedVectors.load_word2vec_format(str(out / "vectors.bin"), binary=True).vectors.shape == (48, 8)
    assert "t0w0 - t0w1 + t1w1: " in (out / "report.md").read_text(encoding="utf-8")
    capsys.readouterr()
    assert cli_main(args + ["--query", "t0w0 - king"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: query 't0w0 - king': word 'king' is not in the vocabulary") and err.count("\n") == 1
    assert cli_main(args + ["--plot-words", "t0w0,queen"]) == 2
    assert capsys.readouterr().err.startswith("error: --plot-words: queen not in the vocabulary (48 words)")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one two three\n", encoding="utf-8")
    assert cli_main(["lab", "word2vec", "--corpus", str(tiny), "--out", str(out)]) == 2
    assert "corpus too small for the vocabulary: 0 distinct words occur at least 5 times" in capsys.readouterr().err
