"""`gptlab lab word2vec`: skip-gram with negative sampling (Mikolov et al. 2013) in PyTorch.

The pieces are the ones of word2vec.c / gensim, so the result can be compared with gensim's `Word2Vec` on the
same sentences and hyperparameters (bench/bench_word2vec.py):
- Vocabulary: words seen at least `min_count` times, most frequent first (ties in order of first appearance);
  other words are dropped from the sentences before windows are taken, as gensim does.
- Frequent-word subsampling (Mikolov et al. 2013b, as implemented in word2vec.c and gensim, not the paper's
  1 - sqrt(t/f)): with f = count / total and t = `sample`, a word is kept with probability
  min(1, (sqrt(f / t) + 1) * t / f). Dropped words are removed before windowing, so windows reach further.
- Noise distribution: unigram counts to the power 0.75, normalised. Negatives equal to the target word are
  skipped (their gradient is zero), as in word2vec.c.
- Dynamic window: for each centre word an effective window drawn uniformly from 1..window (word2vec.c's
  "reduced window" b in 0..window-1), so near words are seen more often. Windows stay inside a sentence.
- Learning rate: linear decay from `alpha` to `min_alpha` over all epochs' words.
- Pair (centre, context): the context word's input vector predicts the centre word against `negative` noise
  words (word2vec.c's orientation). Input vectors start uniform in [-0.5/dim, 0.5/dim), output vectors at 0.

Speed (the point of the design): pairs are generated for a chunk of ~100k words at once with numpy (one
masked shift per window offset), shuffled inside the chunk, and trained in batches of `batch_pairs` pairs:
one gather of input and output rows, one batched dot product, and plain SGD written back with `index_add_`
(sparse: only touched rows move). That is word2vec's own update rule; the difference from its Hogwild
threads is that the updates of one batch are computed from the same weights and summed. Sentences are
chunked at 10,000 words (gensim's limit), and a window never crosses a chunk boundary.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..common import GptlabError, get_logger

log = get_logger("lab.word2vec")

MAX_SENTENCE_WORDS = 10_000  # gensim's MAX_WORDS_IN_BATCH: longer sentences are cut
MIN_VOCAB = 10  # fewer distinct words than this cannot be trained or evaluated meaningfully
TOKEN_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # letter/digit runs, inner apostrophes kept ("don't")


@dataclass
class Word2VecConfig:
    dim: int = 100
    window: int = 5
    negative: int = 5
    epochs: int = 5
    min_count: int = 5
    sample: float = 1e-3  # gensim's default subsampling threshold t
    alpha: float = 0.025
    min_alpha: float = 0.0001
    batch_pairs: int = 1024  # pairs per SGD step: larger batches fall out of the CPU caches
    chunk_words: int = 100_000
    seed: int = 1
    threads: int = 2
    device: str = "cpu"

    def check(self) -> None:
        for name in ("dim", "window", "negative", "epochs", "min_count", "batch_pairs", "chunk_words", "threads"):
            if getattr(self, name) < 1:
                raise GptlabError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.sample < 1:
            raise GptlabError(f"--sample must be in [0, 1), got {self.sample}")
        if not 0 < self.min_alpha <= self.alpha:
            raise GptlabError(f"need 0 < min_alpha <= alpha, got {self.min_alpha} and {self.alpha}")


# ---- corpus and vocabulary ------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Lower-cased words: runs of letters and digits, apostrophes inside a word kept."""
    return TOKEN_RE.findall(text.lower())


def sentences_from_texts(texts: Iterable[str]) -> Iterator[list[str]]:
    """One sentence per non-empty line of each text, cut at MAX_SENTENCE_WORDS words."""
    for text in texts:
        for line in text.splitlines():
            words = tokenize(line)
            for start in range(0, len(words), MAX_SENTENCE_WORDS):
                yield words[start:start + MAX_SENTENCE_WORDS]


def read_corpus(corpus: str, max_bytes: int | None = None) -> list[list[str]]:
    """Sentences of a text file (UTF-8, one sentence per line), or of a mixture's training split (a built-in
    name such as `default`, or a mixture .toml)."""
    path = Path(corpus)
    if path.is_file() and path.suffix != ".toml":
        try:
            data = path.read_bytes()
        except OSError as e:
            raise GptlabError(f"cannot read {corpus}: {e.strerror}") from None
        if max_bytes is not None:
            data = data[:max_bytes]
        texts: Iterable[str] = [data.decode("utf-8", errors="replace")]
    else:
        from ..data.mixture import load_mixture

        texts = (d.text for d in load_mixture(corpus, max_bytes=max_bytes).documents("train"))
    return [s for s in sentences_from_texts(texts) if s]


@dataclass
class Vocab:
    words: list[str]  # most frequent first
    counts: np.ndarray  # int64, aligned with words
    index: dict[str, int]

    @classmethod
    def build(cls, sentences: Iterable[list[str]], min_count: int) -> Vocab:
        counter: Counter[str] = Counter()
        for s in sentences:
            counter.update(s)
        kept = sorted(((w, c) for w, c in counter.items() if c >= min_count), key=lambda wc: -wc[1])
        if len(kept) < MIN_VOCAB:
            raise GptlabError(
                f"corpus too small for the vocabulary: {len(kept)} distinct words occur at least {min_count} times "
                f"({sum(counter.values()):,} words read, {len(counter):,} distinct); word2vec needs at least "
                f"{MIN_VOCAB}: give more text or lower --min-count")
        words = [w for w, _ in kept]
        return cls(words, np.array([c for _, c in kept], dtype=np.int64), {w: i for i, w in enumerate(words)})

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, sentences: Iterable[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(word ids, sentence number of each) with out-of-vocabulary words dropped, as int32 arrays."""
        ids: list[int] = []
        sent: list[int] = []
        for n, s in enumerate(sentences):
            known = [self.index[w] for w in s if w in self.index]
            ids.extend(known)
            sent.extend([n] * len(known))
        return np.array(ids, dtype=np.int32), np.array(sent, dtype=np.int32)


def keep_probability(counts: np.ndarray, sample: float) -> np.ndarray:
    """P(keep) per word for subsampling threshold `sample` (word2vec.c, gensim):
    min(1, (sqrt(f / t) + 1) * t / f) with f = count / total; `sample` = 0 keeps everything."""
    counts = np.asarray(counts, dtype=np.float64)
    if sample == 0:
        return np.ones_like(counts)
    threshold = sample * counts.sum()  # t * total, in counts
    return np.minimum(1.0, (np.sqrt(counts / threshold) + 1) * threshold / counts)


def noise_distribution(counts: np.ndarray, power: float = 0.75) -> np.ndarray:
    """P(noise word) proportional to count ** power (Mikolov et al. 2013b, section 2.2)."""
    weights = np.asarray(counts, dtype=np.float64) ** power
    return weights / weights.sum()


# ---- pairs ----------------------------------------------------------------------------------------------


def window_pairs(ids: np.ndarray, sent: np.ndarray, window: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(centres, contexts) of every skip-gram pair of a token run: each centre i draws an effective window
    w_i uniform in 1..window and pairs with the words at distance 1..w_i on both sides in its sentence."""
    n = len(ids)
    reach = rng.integers(1, window + 1, size=n)
    centres, contexts = [], []
    for d in range(1, min(window, n - 1) + 1):
        left = np.arange(n - d)  # pairs (left, left + d): same sentence, within the centre's own window
        same = sent[left] == sent[left + d]
        right_centre = left[same & (reach[left] >= d)]  # centre on the left, context d to its right
        left_centre = left[same & (reach[left + d] >= d)] + d  # centre on the right, context d to its left
        centres += [ids[right_centre], ids[left_centre]]
        contexts += [ids[right_centre + d], ids[left_centre - d]]
    if not centres:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(centres).astype(np.int64), np.concatenate(contexts).astype(np.int64)


# ---- training -------------------------------------------------------------------------------------------


class SkipGram:
    """Input (`vectors`, the word vectors) and output embeddings, trained by `sgd_step`."""

    def __init__(self, vocab_size: int, dim: int, device: torch.device, generator: torch.Generator):
        self.vectors = ((torch.rand(vocab_size, dim, generator=generator) - 0.5) / dim).to(device)
        self.output = torch.zeros(vocab_size, dim, device=device)

    @torch.no_grad()
    def sgd_step(self, centres: torch.Tensor, contexts: torch.Tensor, negatives: torch.Tensor, lr: float,
                 want_loss: bool = False) -> float | None:
        """One SGD step on the negative-sampling loss of a batch; returns the batch's mean loss if asked
        (computing it every step would synchronise a GPU every step).
        For target t with label y (1 for the centre, 0 for a negative) and input vector v of the context:
        g = lr * (y - sigmoid(u_t . v)); u_t += g v; v += sum_t g u_t (word2vec.c's update, summed)."""
        batch, dim = negatives.shape[0], self.vectors.shape[1]
        targets = torch.cat([centres[:, None], negatives], dim=1).reshape(-1)  # (B * (1 + K))
        v = self.vectors.index_select(0, contexts)  # (B, D); index_select is several times faster than v[idx]
        u = self.output.index_select(0, targets).view(batch, -1, dim)  # (B, 1 + K, D)
        scores = (u * v[:, None, :]).sum(-1)
        labels = torch.zeros_like(scores)
        labels[:, 0] = 1
        skip = torch.zeros_like(scores, dtype=torch.bool)
        skip[:, 1:] = negatives == centres[:, None]  # word2vec.c skips a negative equal to the target
        g = (labels - torch.sigmoid(scores)).masked_fill_(skip, 0) * lr
        self.vectors.index_add_(0, contexts, torch.bmm(g[:, None, :], u)[:, 0])
        self.output.index_add_(0, targets, (g[:, :, None] * v[:, None, :]).view(-1, dim))
        if not want_loss:
            return None
        signed = torch.where(labels.bool(), scores, -scores).masked_fill_(skip, 30.0)  # skipped: loss ~0
        return float(-torch.nn.functional.logsigmoid(signed).sum(1).mean())


@dataclass
class TrainStats:
    words: int  # in-vocabulary words over all epochs, before subsampling
    pairs: int
    seconds: float
    final_loss: float

    @property
    def words_per_second(self) -> float:
        return self.words / max(self.seconds, 1e-9)


def train(ids: np.ndarray, sent: np.ndarray, vocab: Vocab, cfg: Word2VecConfig, progress: bool = True
          ) -> tuple[np.ndarray, TrainStats]:
    """Word vectors (float32, vocabulary order) trained on the encoded corpus (`Vocab.encode`).

    `cfg.threads` Python threads train chunks concurrently on the shared tables without locks (Hogwild,
    Recht et al. 2011, as word2vec.c's threads do), each with one torch thread: torch releases the GIL inside
    its operations, and on a busy machine this is many times faster than one step split over OpenMP threads
    (measured: 25x slower with 2 OpenMP threads at load average 19, their barriers wait for descheduled cores).
    With one thread a run is reproducible for a given seed."""
    import threading

    from tqdm import tqdm

    from ..common import torch_device

    cfg.check()
    device = torch_device(cfg.device)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = SkipGram(len(vocab), cfg.dim, device, gen)
    keep = keep_probability(vocab.counts, cfg.sample)
    noise = torch.tensor(noise_distribution(vocab.counts), dtype=torch.float32)
    # A table sampled from the noise distribution, indexed by uniform draws (word2vec.c's unigram table):
    # drawing from it is a gather, much faster than a multinomial per batch.
    table = torch.multinomial(noise, max(1_000_000, 10 * len(vocab)), replacement=True, generator=gen).to(device)
    total = len(ids) * cfg.epochs
    if total == 0 or not (sent[1:] == sent[:-1]).any():
        raise GptlabError("corpus too small: no two in-vocabulary words share a sentence, so there is nothing to "
                          "train on; give more text or lower --min-count")
    jobs = iter([(epoch, first) for epoch in range(cfg.epochs) for first in range(0, len(ids), cfg.chunk_words)])
    lock = threading.Lock()
    state = {"done": 0, "pairs": 0, "loss": math.nan}
    errors: list[BaseException] = []
    bar = tqdm(total=total, unit="w", unit_scale=True, desc="word2vec", disable=not progress, dynamic_ncols=True)

    def work_on_chunk(epoch: int, first: int) -> None:
        job_seed = (cfg.seed, epoch, first)  # each chunk's randomness is its own, whichever thread takes it
        rng = np.random.default_rng(job_seed)
        draws_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        chunk = slice(first, first + cfg.chunk_words)
        kept = rng.random(len(ids[chunk])) < keep[ids[chunk]]
        centres, contexts = window_pairs(ids[chunk][kept], sent[chunk][kept], cfg.window, rng)
        order = rng.permutation(len(centres))
        centres_t = torch.from_numpy(centres[order]).to(device)
        contexts_t = torch.from_numpy(contexts[order]).to(device)
        n_words = len(ids[chunk])
        loss = None
        for b in range(0, len(order), cfg.batch_pairs):
            progress_now = (state["done"] + n_words * b / len(order)) / total
            lr = cfg.alpha - (cfg.alpha - cfg.min_alpha) * progress_now
            c, x = centres_t[b:b + cfg.batch_pairs], contexts_t[b:b + cfg.batch_pairs]
            draws = torch.randint(len(table), (len(c), cfg.negative), generator=draws_gen).to(device)
            loss = model.sgd_step(c, x, table[draws], lr, want_loss=b + cfg.batch_pairs >= len(order))
        with lock:
            state["done"] += n_words
            state["pairs"] += len(order)
            state["loss"] = state["loss"] if loss is None else loss
            bar.update(n_words)
            bar.set_postfix(loss=f"{state['loss']:.3f}", refresh=False)

    def worker() -> None:
        torch.set_num_threads(1)
        try:
            while not errors:
                with lock:
                    job = next(jobs, None)
                if job is None:
                    return
                work_on_chunk(*job)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(cfg.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    if errors:
        raise errors[0]
    seconds = time.perf_counter() - start
    stats = TrainStats(total, state["pairs"], seconds, state["loss"])
    return model.vectors.cpu().numpy().astype(np.float32), stats


# ---- word2vec file formats ------------------------------------------------------------------------------


def save_word2vec(path: str | Path, words: list[str], vectors: np.ndarray, binary: bool) -> None:
    """word2vec.c's format: a "count dim" header line, then per word either `word v1 ... vD` in text
    (9 significant digits: float32 round-trips exactly) or `word ` + D little-endian float32 + newline."""
    from ..common import atomic_write_bytes

    vectors = np.asarray(vectors, dtype="<f4")
    parts = [f"{len(words)} {vectors.shape[1]}\n".encode()]
    for word, row in zip(words, vectors):
        if binary:
            parts.append(word.encode("utf-8") + b" " + row.tobytes() + b"\n")
        else:
            parts.append((word + " " + " ".join(f"{x:.9g}" for x in row) + "\n").encode("utf-8"))
    atomic_write_bytes(path, b"".join(parts))


def load_word2vec(path: str | Path, binary: bool) -> tuple[list[str], np.ndarray]:
    """Read a word2vec text or binary file (as `save_word2vec` and word2vec.c write them)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise GptlabError(f"cannot read {path}: {e.strerror}") from None
    head, _, body = data.partition(b"\n")
    try:
        count, dim = (int(x) for x in head.split())
    except ValueError:
        raise GptlabError(f"{path}: line 1 must be '<words> <dim>', got {head[:80]!r}") from None
    words: list[str] = []
    vectors = np.empty((count, dim), dtype=np.float32)
    pos = 0
    for i in range(count):
        while body[pos:pos + 1] == b"\n":  # the newline word2vec.c writes after a binary vector
            pos += 1
        space = body.find(b" ", pos)
        if space < 0:
            raise GptlabError(f"{path}: truncated at word {i + 1} of {count}")
        words.append(body[pos:space].decode("utf-8", errors="replace"))
        if binary:
            raw = body[space + 1:space + 1 + 4 * dim]
            if len(raw) < 4 * dim:
                raise GptlabError(f"{path}: truncated in the vector of word {i + 1} ({words[-1]!r})")
            vectors[i] = np.frombuffer(raw, dtype="<f4")
            pos = space + 1 + 4 * dim
        else:
            end = body.find(b"\n", space)
            end = len(body) if end < 0 else end
            numbers = body[space + 1:end].split()
            if len(numbers) != dim:
                raise GptlabError(f"{path}, line {i + 2}: expected {dim} numbers after {words[-1]!r}, "
                                  f"got {len(numbers)}")
            try:
                vectors[i] = [float(x) for x in numbers]
            except ValueError:
                raise GptlabError(f"{path}, line {i + 2}: a value after {words[-1]!r} is not a number") from None
            pos = end + 1
    return words, vectors


# ---- command line ---------------------------------------------------------------------------------------

DEFAULT_QUERY = "king - man + woman"
DEFAULT_PLOT_WORDS = "king,queen,man,woman,france,paris,london,war,god,money"


def check_queries(queries: list[str], vocab: Vocab) -> None:
    """Fail before training when a query names a word outside the vocabulary."""
    from .word2vec_eval import parse_query

    for query in queries:
        for _, word in parse_query(query):
            if word not in vocab.index:
                raise GptlabError(f"query {query!r}: word {word!r} is not in the vocabulary ({len(vocab):,} words "
                                  f"with at least the min-count occurrences)")


def _cmd_word2vec(args: argparse.Namespace) -> None:
    from ..common import atomic_write_text
    from .word2vec_eval import WordVectors, evaluate, evaluation_markdown, parse_query, plot_neighbourhoods

    cfg = Word2VecConfig(dim=args.dim, window=args.window, negative=args.negative, epochs=args.epochs,
                         min_count=args.min_count, sample=args.sample, alpha=args.alpha, seed=args.seed,
                         threads=args.threads, device=args.device)
    cfg.check()
    sentences = read_corpus(args.corpus, args.max_bytes)
    vocab = Vocab.build(sentences, cfg.min_count)
    queries = args.query or [q for q in [DEFAULT_QUERY] if all(w in vocab.index for _, w in parse_query(q))]
    check_queries(queries, vocab)
    plot_words = [w.strip().lower() for w in (args.plot_words or DEFAULT_PLOT_WORDS).split(",") if w.strip()]
    missing = [w for w in plot_words if w not in vocab.index]
    if args.plot_words and missing:  # checked before training, like the queries
        raise GptlabError(f"--plot-words: {', '.join(missing)} not in the vocabulary ({len(vocab):,} words)")
    plot_words = [w for w in plot_words if w not in missing]
    ids, sent = vocab.encode(sentences)
    del sentences
    print(f"{args.corpus}: {len(ids):,} words in the vocabulary of {len(vocab):,} (min-count {cfg.min_count})")
    vectors, stats = train(ids, sent, vocab, cfg, progress=not args.quiet)
    out = Path(args.out)
    save_word2vec(out / "vectors.txt", vocab.words, vectors, binary=False)
    save_word2vec(out / "vectors.bin", vocab.words, vectors, binary=True)
    wv = WordVectors(vocab.words, vectors)
    ev = evaluate(wv)
    lines = [f"# word2vec on {args.corpus}", "",
             f"{len(ids):,} words, vocabulary {len(vocab):,}; dim {cfg.dim}, window {cfg.window}, negative "
             f"{cfg.negative}, epochs {cfg.epochs}, min-count {cfg.min_count}, sample {cfg.sample}, alpha "
             f"{cfg.alpha} -> {cfg.min_alpha}, {cfg.threads} thread(s) on {cfg.device}", "",
             f"training: {stats.seconds:.1f} s, {stats.words_per_second:,.0f} words/s, {stats.pairs:,} pairs, "
             f"final batch loss {stats.final_loss:.3f}", "", evaluation_markdown(ev)]
    for query in queries:
        lines.append(f"{query}: " + ", ".join(f"{w} {s:.3f}" for w, s in wv.analogy(query)))
    if plot_words:
        plot_neighbourhoods(wv, plot_words, args.k, out / "neighbours.png",
                            f"word2vec on {Path(args.corpus).name}: nearest {args.k} neighbours (PCA)")
    report = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", report)
    print(report)
    print(f"wrote vectors.txt, vectors.bin, report.md{', neighbours.png' if plot_words else ''} to {out}")


def register_lab(commands) -> None:
    p = commands.add_parser("word2vec", help="train skip-gram word vectors (negative sampling) and evaluate them")
    p.add_argument("--corpus", default="default", help="text file (one sentence per line) or mixture name/.toml")
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this much text")
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negative", type=int, default=5, help="noise words per pair")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--min-count", type=int, default=5, help="words seen fewer times are dropped")
    p.add_argument("--sample", type=float, default=1e-3, help="subsampling threshold t (0: keep every word)")
    p.add_argument("--alpha", type=float, default=0.025, help="initial learning rate (decays linearly)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    p.add_argument("--query", action="append", default=None,
                   help=f"an analogy query such as '{DEFAULT_QUERY}' (repeatable; default that one when its words "
                        "are in the vocabulary)")
    p.add_argument("--plot-words", default=None, help=f"comma-separated words to plot (default {DEFAULT_PLOT_WORDS}, "
                                                       "those in the vocabulary)")
    p.add_argument("--k", type=int, default=8, help="neighbours per plotted word")
    p.add_argument("--out", required=True, help="folder for vectors.txt, vectors.bin, report.md, neighbours.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_word2vec)
