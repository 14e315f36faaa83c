"""gptlab's word2vec vs gensim's Word2Vec on the same sentences and hyperparameters, plus GloVe 6B-50d as a
reference row: analogy accuracy (total and per section of questions-words.txt), WordSim353 / SimLex-999
Spearman, training time and words/s with the same number of threads, side by side in one run.

Both are scored by gptlab.lab.word2vec_eval (tests/test_lab_word2vec.py checks it gives gensim's own counts
per section and its Spearman). The corpus: the English texts of the shared data folder (Gutenberg books and
State of the Union addresses), one sentence per line, tokenised by gptlab's word2vec tokenizer; gensim gets
the very same token lists. Words/s counts in-vocabulary words before subsampling, the same for both.

Run (the figures in docs/benchmarks.md):
    python bench/bench_word2vec.py --data ../shared/data --epochs 3 --out bench/results/word2vec.md
Full size: --epochs 5 (gensim's default), or --corpus any large text file.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path


from gptlab.common import atomic_write_text
from gptlab.lab import word2vec as w2v
from gptlab.lab.word2vec_eval import TOTAL, WordVectors, evaluate, load_glove_folder, plot_neighbourhoods

QUERY = "king - man + woman"
PLOT_WORDS = ["king", "woman", "france", "london", "war", "money", "god"]


def corpus_texts(args: argparse.Namespace) -> tuple[str, list[str]]:
    if args.corpus:
        return args.corpus, [Path(args.corpus).read_text(encoding="utf-8", errors="replace")]
    data = Path(args.data)
    files = sorted((data / "gutenberg").glob("*.txt")) + sorted((data / "sotu").glob("*.txt"))
    if not files:
        raise SystemExit(f"no gutenberg/*.txt or sotu/*.txt under {data}")
    return f"{data}/gutenberg + sotu ({len(files)} files)", [f.read_text(encoding="utf-8", errors="replace")
                                                               for f in files]


def train_gensim(sentences: list[list[str]], cfg: w2v.Word2VecConfig) -> tuple[WordVectors, float]:
    from gensim.models import Word2Vec

    model = Word2Vec(vector_size=cfg.dim, window=cfg.window, negative=cfg.negative, hs=0, sg=1,
                     min_count=cfg.min_count, sample=cfg.sample, alpha=cfg.alpha, min_alpha=cfg.min_alpha,
                     workers=cfg.threads, seed=cfg.seed)
    model.build_vocab(sentences)
    start = time.perf_counter()
    model.train(sentences, total_examples=len(sentences), epochs=cfg.epochs)
    return WordVectors(list(model.wv.index_to_key), model.wv.vectors), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--corpus", default=None, help="a text file instead of the shared data's English texts")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--glove", default=str(Path.home() / ".cache/gptlab/models/glove-6b-50d"))
    p.add_argument("--out", default="bench/results/word2vec.md")
    args = p.parse_args()

    load_start = os.getloadavg()[0]
    name, texts = corpus_texts(args)
    sentences = [s for s in w2v.sentences_from_texts(texts) if s]
    del texts
    cfg = w2v.Word2VecConfig(epochs=args.epochs, min_count=args.min_count, threads=args.threads)
    vocab = w2v.Vocab.build(sentences, cfg.min_count)
    ids, sent = vocab.encode(sentences)
    print(f"{name}: {sum(map(len, sentences)):,} words, {len(ids):,} in a vocabulary of {len(vocab):,}", flush=True)

    vectors, stats = w2v.train(ids, sent, vocab, cfg, progress=False)
    ours = WordVectors(vocab.words, vectors)
    print(f"gptlab: {stats.seconds:.1f} s", flush=True)
    theirs, gensim_seconds = train_gensim(sentences, cfg)
    print(f"gensim: {gensim_seconds:.1f} s", flush=True)
    load_end = os.getloadavg()[0]
    rows = [("gptlab word2vec", ours, stats.seconds), ("gensim Word2Vec", theirs, gensim_seconds)]
    glove_path = Path(args.glove)
    if glove_path.is_dir():
        rows.append(("GloVe 6B-50d (reference)", load_glove_folder(glove_path), None))
    evals = [(label, wv, evaluate(wv), secs) for label, wv, secs in rows]

    words_total = stats.words  # in-vocabulary words x epochs, the same for both trainers
    md = [f"# word2vec: gptlab vs gensim ({time.strftime('%Y-%m-%d')})", "",
          f"Corpus: {name}, one sentence per line: {sum(map(len, sentences)):,} words, {len(ids):,} in the "
          f"vocabulary of {len(vocab):,} (min-count {cfg.min_count}). Both: skip-gram, dim {cfg.dim}, window "
          f"{cfg.window}, negative {cfg.negative}, sample {cfg.sample}, alpha {cfg.alpha} -> {cfg.min_alpha}, "
          f"{cfg.epochs} epochs, {cfg.threads} threads. Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"loaded machine (load average {load_start:.1f} at the start, {load_end:.1f} after training). GloVe "
          f"6B-50d: trained on 6B tokens of Wikipedia + Gigaword, a reference for scale, not a like-for-like row.",
          "", "| vectors | analogy (all) | semantic | syntactic | WordSim353 ρ | SimLex-999 ρ | train s | words/s |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, wv, ev, secs in evals:
        sem = [v for k, v in ev.analogies.items() if k != TOTAL and not k.startswith("gram")]
        syn = [v for k, v in ev.analogies.items() if k.startswith("gram")]
        frac = [sum(c for c, _ in part) / max(sum(n for _, n in part), 1) for part in (sem, syn)]
        c, n = ev.analogies[TOTAL]
        speed = f"{secs:.0f} | {words_total / secs:,.0f}" if secs else "- | -"
        md.append(f"| {label} | {c / max(n, 1):.1%} ({c}/{n}) | {frac[0]:.1%} | {frac[1]:.1%} | "
                  f"{ev.wordsim[0]:.3f} ({ev.wordsim[1]}) | {ev.simlex[0]:.3f} ({ev.simlex[1]}) | {speed} |")
    md += ["", f"words/s ratio gptlab / gensim: {gensim_seconds / stats.seconds:.2f} (same words, same threads, "
               "wall clock, measured in the same run one after the other)", "",
           "Analogies are asked only when all four words are in the vocabulary (counts in brackets; GloVe's "
           "vocabulary covers almost all of them, so its row answers a different, larger set).", "",
           "| section | " + " | ".join(label for label, *_ in evals) + " |",
           "|---|" + "---:|" * len(evals)]
    for section in evals[0][2].analogies:
        cells = [f"{ev.accuracy(section):.1%} ({ev.analogies[section][1]})" if ev.analogies[section][1] else "-"
                 for _, _, ev, _ in evals]
        md.append(f"| {section} | " + " | ".join(cells) + " |")
    md += ["", f"`{QUERY}`:", ""]
    for label, wv, _, _ in evals:
        try:
            md.append(f"- {label}: " + ", ".join(f"{w} {s:.3f}" for w, s in wv.analogy(QUERY)))
        except Exception as e:  # a small corpus may lack one of the words: say so in the table
            md.append(f"- {label}: {e}")
    plot_words = [w for w in PLOT_WORDS if w in ours.index]
    png = Path(args.out).with_name("word2vec_neighbours.png")
    plot_neighbourhoods(ours, plot_words, 6, png, f"gptlab word2vec on {name.split(' (')[0]}: 6 nearest (PCA)")
    md += ["", f"Neighbourhoods (PCA of unit vectors): {png.name}", ""]
    atomic_write_text(args.out, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
