"""`gptlab rag eval`: retrieval recall@k and MRR per retriever, and answer exact match / F1 with retrieval
against the same model closed-book, on SQuAD-format questions.

Design decisions
- Input: SQuAD JSON (data / paragraphs / qas, as SQuAD 1.1 and SQuAD-shifts ship) or JSONL lines
  {question, answers, context?, title?}, answers being strings or {text} objects.
- If --index is not an index yet, it is built from the question file's contexts: one Markdown file per
  article (its title as heading, paragraphs separated by blank lines) in DIR/corpus, indexed as usual.
- A retrieved chunk is relevant when it contains a gold answer (SQuAD-normalised substring, the "has
  answer" criterion of Karpukhin et al., DPR, EMNLP 2020) and, when the question's context is known, shares
  a run of 8 normalised words with it (so the same answer string in another article does not count).
  recall@k: share of questions with a relevant chunk in the top k; MRR: mean of 1/rank of the first
  relevant chunk in the top 10 (0 if none).
- Exact match and F1 follow the official SQuAD v2.0 evaluation script: lower case, punctuation and the
  articles a/an/the removed, whitespace collapsed; F1 over word multisets; the maximum over the gold
  answers. (prompting.normalise_text differs on purpose: it turns punctuation into spaces.) Citation
  markers like [1] are removed from a reply before scoring.
"""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ...common import GptlabError, atomic_write_json, iter_jsonl, read_json, save_figure
from .answer import MIN_SIMILARITY, SHORT_INSTRUCTIONS, answer, closed_book
from .store import RETRIEVERS, Hit, RagIndex

RECALL_AT = (1, 5, 10)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


@dataclass
class QA:
    question: str
    answers: list[str]
    context: str | None = None
    title: str = ""


# ---- SQuAD metrics --------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (lower, no punctuation, no articles, single spaces)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_score(metric, prediction: str, answers: list[str]) -> float:
    return max(metric(prediction, gold) for gold in answers)


def strip_citations(text: str) -> str:
    return re.sub(r"\[\d+(?:\s*,\s*\d+)*\]", " ", text)


# ---- questions ------------------------------------------------------------------------------------------
def _answers(value, where: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    texts = [item.get("text") if isinstance(item, dict) else item for item in items]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise GptlabError(f"{where}: answers must be a non-empty list of strings or {{text}} objects")
    return texts


def load_qa(path: str | Path) -> list[QA]:
    """Questions from a SQuAD JSON file or a JSONL file (see the module docstring)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        out = []
        for where, record in iter_jsonl(path, "question file"):
            if not isinstance(record, dict) or not isinstance(record.get("question"), str):
                raise GptlabError(f"{where}: expected an object with a 'question' string")
            if "answers" not in record and "answer" not in record:
                raise GptlabError(f"{where}: no 'answers' field")
            out.append(QA(record["question"], _answers(record.get("answers", record.get("answer")), where),
                          record.get("context"), record.get("title") or ""))
        return out
    data = read_json(path, "question file")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise GptlabError(f"{path}: expected SQuAD JSON ({{'data': [{{'paragraphs': [{{'context', 'qas'}}]}}]}}) "
                          f"or a .jsonl file")
    out = []
    for a, article in enumerate(data["data"]):
        title = article.get("title") or f"article {a}"
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            for q, qa in enumerate(paragraph.get("qas", [])):
                where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}]"
                if qa.get("is_impossible") or not qa.get("answers"):
                    continue  # SQuAD 2.0 unanswerable questions: no gold span to retrieve
                out.append(QA(qa["question"], _answers(qa["answers"], where), paragraph.get("context"), title))
    if not out:
        raise GptlabError(f"{path}: no answerable questions")
    return out


def write_contexts(questions: list[QA], folder: Path) -> int:
    """One Markdown file per article (`# title`, then its distinct contexts, blank-line separated), so the
    title reaches the chunks' metadata and the prompt's source headers; returns the article count."""
    articles: dict[str, list[str]] = {}
    for qa in questions:
        if qa.context and qa.context not in articles.setdefault(qa.title or "untitled", []):
            articles[qa.title or "untitled"].append(qa.context)
    if not articles:
        raise GptlabError("the questions carry no contexts to build an index from: give an existing --index")
    folder.mkdir(parents=True, exist_ok=True)
    for number, (title, contexts) in enumerate(articles.items()):
        text = f"# {title}\n\n" + "\n\n".join(c.strip() for c in contexts) + "\n"
        (folder / f"article-{number:05d}.md").write_text(text, encoding="utf-8")
    return len(articles)


# ---- retrieval ------------------------------------------------------------------------------------------
def _ngrams(words: list[str], n: int = 8) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def is_relevant(hit: Hit, qa: QA) -> bool:
    text = f" {normalize_answer(hit.text)} "
    if not any(f" {normalize_answer(a)} " in text for a in qa.answers):
        return False
    if qa.context is None:
        return True
    return bool(_ngrams(text.split()) & _ngrams(normalize_answer(qa.context).split()))


def retrieval_metrics(index: RagIndex, questions: list[QA], retriever: str, progress: bool = True) -> dict:
    from tqdm import tqdm

    found_at = []  # 1-based rank of the first relevant chunk, or None
    started = time.perf_counter()
    for qa in tqdm(questions, desc=f"retrieval ({retriever})", disable=not progress):
        hits = index.search(qa.question, k=max(RECALL_AT), retriever=retriever)
        found_at.append(next((rank for rank, hit in enumerate(hits, 1) if is_relevant(hit, qa)), None))
    n = len(questions)
    metrics = {f"recall@{k}": sum(r is not None and r <= k for r in found_at) / n for k in RECALL_AT}
    metrics["mrr"] = sum(1 / r for r in found_at if r is not None) / n
    metrics["seconds_per_query"] = (time.perf_counter() - started) / n
    return metrics


def answer_metrics(index: RagIndex, llm, questions: list[QA], k: int = 3, max_tokens: int = 32,
                   min_similarity: float = MIN_SIMILARITY, progress: bool = True) -> tuple[dict, list[dict]]:
    """EM/F1 of RAG (hybrid retrieval, top k) and of the same model closed-book, and the per-question rows."""
    from tqdm import tqdm

    rows = []
    for qa in tqdm(questions, desc="answers", disable=not progress):
        rag = answer(index, llm, qa.question, k=k, max_tokens=max_tokens, instructions=SHORT_INSTRUCTIONS,
                     min_similarity=min_similarity).text
        book = closed_book(llm, qa.question, max_tokens=max_tokens)
        rows.append({"question": qa.question, "answers": qa.answers, "rag": rag, "closed_book": book})
    metrics = {}
    for mode in ("rag", "closed_book"):
        preds = [strip_citations(row[mode]) for row in rows]
        metrics[mode] = {name: sum(best_score(metric, p, r["answers"]) for p, r in zip(preds, rows)) / len(rows)
                         for name, metric in (("exact_match", exact_match), ("f1", f1_score))}
    return metrics, rows


# ---- report ---------------------------------------------------------------------------------------------
def markdown_report(retrieval: dict[str, dict], answers: dict | None, n_questions: int, n_answered: int) -> str:
    lines = [f"Retrieval on {n_questions} questions (relevant = contains a gold answer and overlaps its context):", "",
             "| retriever | " + " | ".join(f"recall@{k}" for k in RECALL_AT) + " | MRR@10 | s/query |",
             "|---|" + "---:|" * (len(RECALL_AT) + 2)]
    for name, m in retrieval.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[f'recall@{k}']:.3f}" for k in RECALL_AT)
                     + f" | {m['mrr']:.3f} | {m['seconds_per_query']:.3f} |")
    if answers:
        lines += ["", f"Answers on {n_answered} questions (SQuAD exact match and F1, max over gold answers):", "",
                  "| mode | exact match | F1 |", "|---|---:|---:|"]
        for mode, m in answers.items():
            lines.append(f"| {mode.replace('_', '-')} | {m['exact_match']:.3f} | {m['f1']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_report(retrieval: dict[str, dict], answers: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if answers else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(retrieval))
    for i, (name, m) in enumerate(retrieval.items()):
        xs = [x + i * width for x in range(len(RECALL_AT) + 1)]
        ax.bar(xs, [m[f"recall@{k}"] for k in RECALL_AT] + [m["mrr"]], width, label=name)
    ax.set_xticks([x + width * (len(retrieval) - 1) / 2 for x in range(len(RECALL_AT) + 1)],
                  [f"recall@{k}" for k in RECALL_AT] + ["MRR@10"])
    ax.set_ylim(0, 1.15)  # room for the legend above the bars
    ax.set_title("retrieval")
    ax.legend(loc="upper center", ncol=len(retrieval), fontsize="small")
    if answers:
        ax = axes[0][1]
        modes = list(answers)
        for i, metric in enumerate(("exact_match", "f1")):
            ax.bar([x + i * 0.4 for x in range(len(modes))], [answers[m][metric] for m in modes], 0.4,
                   label=metric.replace("_", " "))
        ax.set_xticks([x + 0.2 for x in range(len(modes))], [m.replace("_", "-") for m in modes])
        ax.set_ylim(0, 1.15)
        ax.set_title("answers")
        ax.legend(loc="upper center", ncol=2, fontsize="small")
    save_figure(fig, path, dpi=120)


def run_eval(index_dir: str, qa_file: str, out: str, retrievers=RETRIEVERS, limit: int | None = None,
             llm=None, answer_n: int = 50, k: int = 3, embedder=None, progress: bool = True,
             min_similarity: float = MIN_SIMILARITY) -> dict:
    """The whole evaluation; writes OUT/eval.md, eval.png, eval.json and returns the results."""
    questions = load_qa(qa_file)
    if limit:
        questions = questions[:limit]
    index_path = Path(index_dir)
    if not (index_path / "rag.json").is_file():
        write_contexts(questions, index_path / "corpus")
        RagIndex(index_path, embedder, create=True).update([str(index_path / "corpus")], progress=progress)
    index = RagIndex(index_path, embedder)
    retrieval = {name: retrieval_metrics(index, questions, name, progress) for name in retrievers}
    answers, rows = (None, [])
    if llm is not None and answer_n > 0:
        answers, rows = answer_metrics(index, llm, questions[:answer_n], k=k, min_similarity=min_similarity,
                                       progress=progress)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = markdown_report(retrieval, answers, len(questions), len(rows))
    (out_dir / "eval.md").write_text(report, encoding="utf-8")
    plot_report(retrieval, answers, out_dir / "eval.png")
    result = {"questions": len(questions), "chunks": len(index), "retrieval": retrieval, "answers": answers,
              "answer_rows": rows}
    atomic_write_json(out_dir / "eval.json", result)
    return result


