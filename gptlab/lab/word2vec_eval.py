"""Evaluating word vectors: analogies (questions-words.txt), word-pair similarity (WordSim353, SimLex-999),
nearest neighbours, "a - b + c" queries and a 2-D PCA picture of neighbourhoods.

Design decisions
- The evaluation follows gensim's `KeyedVectors.evaluate_word_analogies` / `evaluate_word_pairs` rule for rule,
  so figures are comparable with gensim's and a test checks the per-section counts against it: case-
  insensitive (words upper-cased; among words equal after that, the most frequent wins), the analogy search
  restricted to the `restrict_vocab` (300,000) most frequent words, a question skipped when one of its four
  words is outside them, 3CosAdd (Mikolov et al. 2013c: the word closest in cosine to b - a + c, the three
  question words excluded), and for word pairs Spearman's rho of cosine similarity against the human score
  over the pairs whose two words are known.
- The test files ship inside the gensim wheel (gensim/test/test_data); `gensim_test_file` finds them.
- Vectors are held as one float32 matrix with unit rows; analogies are scored in batches of questions
  (one matrix product each), which is what makes evaluating GloVe's 400k words practical on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common import GptlabError, save_figure

RESTRICT_VOCAB = 300_000  # gensim's default restrict_vocab for analogies
TOTAL = "Total accuracy"  # gensim's name for the all-sections row


def gensim_test_file(name: str) -> Path:
    """Path of one of gensim's bundled evaluation files (questions-words.txt, wordsim353.tsv, simlex999.txt)."""
    try:
        import gensim
    except ImportError:
        raise GptlabError("the evaluation files ship with gensim: pip install gensim") from None
    path = Path(gensim.__file__).parent / "test" / "test_data" / name
    if not path.is_file():
        raise GptlabError(f"{name} not found in the gensim package ({path})")
    return path


@dataclass
class WordVectors:
    """Words (most frequent first) and their vectors."""

    words: list[str]
    vectors: np.ndarray

    def __post_init__(self):
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        self.index = {w: i for i, w in enumerate(self.words)}
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        self.unit = self.vectors / np.where(norms == 0, 1, norms)

    def id_of(self, word: str) -> int:
        if word not in self.index:
            raise GptlabError(f"word {word!r} is not in the vocabulary ({len(self.words):,} words)")
        return self.index[word]

    def nearest(self, query: np.ndarray, k: int, exclude: set[int] = frozenset()) -> list[tuple[str, float]]:
        scores = self.unit @ (query / max(np.linalg.norm(query), 1e-12))
        top = np.argsort(-scores)[:k + len(exclude)]
        return [(self.words[i], float(scores[i])) for i in top if i not in exclude][:k]

    def neighbours(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        i = self.id_of(word)
        return self.nearest(self.unit[i], k, {i})

    def analogy(self, query: str, k: int = 5) -> list[tuple[str, float]]:
        """Neighbours of a query like "king - man + woman": the sum of the words' unit vectors with their
        signs, the query words excluded (3CosAdd)."""
        terms = parse_query(query)
        ids = [self.id_of(w) for _, w in terms]
        total = sum(sign * self.unit[i] for (sign, _), i in zip(terms, ids))
        return self.nearest(total, k, set(ids))


def parse_query(query: str) -> list[tuple[int, str]]:
    """[(+1 or -1, word)] of "king - man + woman"; the first word may carry no sign."""
    tokens = query.replace("+", " + ").replace("-", " - ").split()
    terms, sign = [], 1
    for tok in tokens:
        if tok in "+-":
            sign = 1 if tok == "+" else -1
        else:
            terms.append((sign, tok.lower()))
            sign = 1
    if not terms:
        raise GptlabError(f"query {query!r} has no words (expected e.g. 'king - man + woman')")
    return terms


def case_insensitive_ids(words: list[str], limit: int) -> dict[str, int]:
    """Upper-cased word -> id among the first `limit` words, the most frequent winning (gensim's rule)."""
    ids: dict[str, int] = {}
    for i, w in enumerate(words[:limit]):
        ids.setdefault(w.upper(), i)
    return ids


def read_analogies(path: Path) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """[(section name, [(a, b, c, expected)])] of a questions-words file."""
    sections: list[tuple[str, list]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith(": "):
            sections.append((line[2:].strip(), []))
        elif line.strip():
            words = line.upper().split()
            if len(words) != 4 or not sections:
                raise GptlabError(f"{path}, line {n}: expected four words in a section, got {line!r}")
            sections[-1][1].append(tuple(words))
    return sections


def evaluate_analogies(wv: WordVectors, path: Path | None = None, restrict_vocab: int = RESTRICT_VOCAB,
                       batch: int = 512) -> dict[str, tuple[int, int]]:
    """{section: (correct, asked)}, plus TOTAL; questions with a word outside the vocabulary are skipped."""
    path = path or gensim_test_file("questions-words.txt")
    ok = case_insensitive_ids(wv.words, restrict_vocab)
    unit = wv.unit[:restrict_vocab]
    # gensim compares answers upper-cased: a word counts as the one it spells case-insensitively, and every
    # spelling of a question word is excluded from the answers
    canonical = np.array([ok[w.upper()] for w in wv.words[:restrict_vocab]], dtype=np.int64)
    spellings: dict[int, list[int]] = {}
    for i, c in enumerate(canonical.tolist()):
        if i != c:
            spellings.setdefault(c, []).append(i)
    results: dict[str, tuple[int, int]] = {}
    for section, questions in read_analogies(path):
        known = np.array([[ok[w] for w in q] for q in questions if all(w in ok for w in q)], dtype=np.int64)
        correct = 0
        for start in range(0, len(known), batch):
            q = known[start:start + batch]
            target = unit[q[:, 1]] - unit[q[:, 0]] + unit[q[:, 2]]
            scores = target @ unit.T
            scores[np.arange(len(q))[:, None], q[:, :3]] = -np.inf  # the question words are never the answer
            for row, col in zip(*np.nonzero(np.isin(q[:, :3], list(spellings)))):
                scores[row, spellings[int(q[row, col])]] = -np.inf
            correct += int((canonical[scores.argmax(1)] == q[:, 3]).sum())
        results[section] = (correct, len(known))
    results[TOTAL] = (sum(c for c, _ in results.values()), sum(n for _, n in results.values()))
    return results


def evaluate_word_pairs(wv: WordVectors, path: Path) -> tuple[float, int, int]:
    """(Spearman rho, pairs used, pairs in the file) of cosine similarity against the human scores."""
    from scipy.stats import spearmanr

    ok = case_insensitive_ids(wv.words, len(wv.words))
    sims, gold, total = [], [], 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            a, b, score = fields[0].upper(), fields[1].upper(), float(fields[2])
        except (IndexError, ValueError):
            raise GptlabError(f"{path}, line {n}: expected 'word<TAB>word<TAB>score', got {line!r}") from None
        total += 1
        if a in ok and b in ok:
            sims.append(float(wv.unit[ok[a]] @ wv.unit[ok[b]]))
            gold.append(score)
    rho = float(spearmanr(sims, gold).statistic) if len(sims) > 1 else float("nan")
    return rho, len(sims), total


@dataclass
class Evaluation:
    analogies: dict[str, tuple[int, int]]
    wordsim: tuple[float, int, int]
    simlex: tuple[float, int, int]

    def accuracy(self, section: str = TOTAL) -> float:
        correct, asked = self.analogies[section]
        return correct / asked if asked else float("nan")


def evaluate(wv: WordVectors, restrict_vocab: int = RESTRICT_VOCAB) -> Evaluation:
    return Evaluation(evaluate_analogies(wv, restrict_vocab=restrict_vocab),
                      evaluate_word_pairs(wv, gensim_test_file("wordsim353.tsv")),
                      evaluate_word_pairs(wv, gensim_test_file("simlex999.txt")))


def evaluation_markdown(ev: Evaluation) -> str:
    lines = ["| section | correct | asked | accuracy |", "|---|---:|---:|---:|"]
    for section, (correct, asked) in ev.analogies.items():
        name = f"**{section}**" if section == TOTAL else section
        lines.append(f"| {name} | {correct} | {asked} | {ev.accuracy(section):.1%} |" if asked
                     else f"| {name} | 0 | 0 | - |")
    lines += ["", "| word pairs | Spearman | pairs used / in file |", "|---|---:|---:|"]
    for name, (rho, used, total) in (("WordSim353", ev.wordsim), ("SimLex-999", ev.simlex)):
        lines.append(f"| {name} | {rho:.3f} | {used} / {total} |")
    return "\n".join(lines) + "\n"


def plot_neighbourhoods(wv: WordVectors, words: list[str], k: int, path: str | Path, title: str = "") -> Path:
    """PCA (SVD of the centred rows) of `words` and their k nearest neighbours, one colour per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [[w] + [n for n, _ in wv.neighbours(w, k)] for w in words]
    ids = [wv.id_of(w) for g in groups for w in g]
    points = wv.unit[ids] - wv.unit[ids].mean(0)
    _, _, vt = np.linalg.svd(points, full_matrices=False)
    xy = points @ vt[:2].T
    fig, ax = plt.subplots(figsize=(9, 7))
    colours = plt.get_cmap("tab10")
    row = 0
    for g, group in enumerate(groups):
        pts = xy[row:row + len(group)]
        ax.scatter(pts[:, 0], pts[:, 1], color=colours(g % 10), s=[60] + [18] * (len(group) - 1))
        for (x, y), w in zip(pts, group):
            ax.annotate(w, (x, y), fontsize=10 if w == group[0] else 8, color=colours(g % 10),
                        fontweight="bold" if w == group[0] else "normal", xytext=(3, 3), textcoords="offset points")
        row += len(group)
    ax.set_title(title or f"nearest {k} neighbours, PCA of unit vectors")
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, path, dpi=110)


def load_glove_folder(folder: str | Path) -> WordVectors:
    """GloVe vectors as the `glove-6b-50d` registry entry unpacks them: glove_6B_50d_emb.npy (rows) and
    glove_6B_index.parquet (one column of words, most frequent first)."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    emb = sorted(folder.glob("glove_*_emb.npy"))
    index = sorted(folder.glob("glove_*_index.parquet"))
    if not emb or not index:
        raise GptlabError(f"{folder}: expected glove_*_emb.npy and glove_*_index.parquet (gptlab models get glove-6b-50d)")
    words = [str(w) for w in pq.read_table(index[0]).column(0).to_pylist()]
    vectors = np.load(emb[0])
    if len(words) != len(vectors):
        raise GptlabError(f"{folder}: {len(words)} words but {len(vectors)} vectors")
    return WordVectors(words, vectors)
