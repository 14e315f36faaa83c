"""`gptlab rag index|search|ask|eval`: the command line over `RagIndex`, `answer` and the evaluation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..llm import add_llm_args, llm_from_args
from .answer import MIN_SIMILARITY, answer
from .embedders import open_embedder
from .store import ANN_THRESHOLD, RETRIEVERS, RagIndex


def _embedder_for(args: argparse.Namespace):
    """The embedder the flags name, or None: let the index load the one it was built with."""
    if args.embedder is None:
        return None
    return open_embedder(args.embedder, base_url=args.embed_base_url, api_key=args.embed_api_key)


def _add_embedder_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--embedder", default=default,
                   help="sentence-transformers folder or registry name, or openai:MODEL with --embed-base-url "
                        + (f"(default: {default})" if default else "(default: the one the index was built with)"))
    p.add_argument("--embed-base-url", default=None, help="OpenAI-compatible endpoint for an openai:MODEL embedder")
    p.add_argument("--embed-api-key", default=None, help="API key for --embed-base-url (default: $OPENAI_API_KEY)")


def _add_retrieval_args(p: argparse.ArgumentParser, k: int) -> None:
    p.add_argument("--retriever", choices=RETRIEVERS, default="hybrid", help="default: %(default)s")
    p.add_argument("-k", "--top-k", type=int, default=k, help="chunks to retrieve (default: %(default)s)")
    p.add_argument("--source", default=None, help="only chunks from files matching this glob, e.g. '*.md'")


def _cmd_index(args: argparse.Namespace) -> None:
    embedder = _embedder_for(args)
    index = RagIndex(args.index, embedder, create=True, chunk_tokens=args.chunk_tokens, overlap=args.overlap,
                     ann_threshold=args.ann_threshold)
    stats = index.update(args.paths, field=args.field, progress=not args.quiet)
    if args.verbose:
        for name, reason in stats.skipped:
            print(f"skipped {name}: {reason}", file=sys.stderr)
        for name in stats.empty:
            print(f"empty {name}", file=sys.stderr)
    print(stats.line())


def _print_sources(hits, cited=()) -> None:
    for number, hit in enumerate(hits, 1):
        mark = "*" if number in cited else " "
        print(f"{mark}[{number}] {hit.doc} chars {hit.start}-{hit.end} ({hit.title}; score {hit.score:.4f}, "
              f"similarity {hit.similarity:.3f})")


def _cmd_search(args: argparse.Namespace) -> None:
    index = RagIndex(args.index, _embedder_for(args))
    hits = index.search(args.query, k=args.top_k, retriever=args.retriever, source=args.source)
    for number, hit in enumerate(hits, 1):
        print(f"{number}. score {hit.score:.4f} similarity {hit.similarity:.3f}  {hit.doc} [{hit.start}:{hit.end}]")
        print(f"   {hit.title}: " + " ".join(hit.text.split())[:300])


def _cmd_ask(args: argparse.Namespace) -> None:
    index = RagIndex(args.index, _embedder_for(args))
    llm = llm_from_args(args)
    result = answer(index, llm, args.question, k=args.top_k, retriever=args.retriever, source=args.source,
                    min_similarity=args.min_similarity, max_tokens=args.max_tokens, temperature=args.temperature,
                    on_text=lambda delta: print(delta, end="", flush=True))
    print()
    if result.sources:
        print("\nSources (* cited):")
        _print_sources(result.sources, result.cited)


def _cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import run_eval

    llm = llm_from_args(args) if (args.model or args.base_url) else None
    result = run_eval(args.index, args.qa, args.out, retrievers=args.retrievers.split(","), limit=args.limit,
                      llm=llm, answer_n=args.answer_n, k=args.top_k, embedder=_embedder_for(args),
                      min_similarity=args.min_similarity, progress=not args.quiet)
    print((Path(args.out) / "eval.md").read_text(), end="")
    print(f"({result['questions']} questions over {result['chunks']} chunks; report in {args.out})")


def register(sub) -> None:
    p = sub.add_parser("rag", help="retrieval-augmented generation: index documents, search, ask with "
                                   "citations, evaluate")
    commands = p.add_subparsers(dest="rag_command", required=True, metavar="ACTION")

    ix = commands.add_parser("index", help="index text/Markdown/HTML/JSONL/Parquet/PDF files (incremental)")
    ix.add_argument("paths", nargs="+", help="files, folders (recursive) and globs")
    ix.add_argument("--index", required=True, help="index directory (created if missing)")
    ix.add_argument("--field", default="text", help="text field of JSONL records / Parquet rows (default: text)")
    ix.add_argument("--chunk-tokens", type=int, default=200, help="chunk size in embedder tokens, for a new index")
    ix.add_argument("--overlap", type=int, default=40, help="chunk overlap in tokens, for a new index")
    ix.add_argument("--ann-threshold", type=int, default=ANN_THRESHOLD,
                    help="build an ANN vector index past this many chunks (default: %(default)s)")
    ix.add_argument("-v", "--verbose", action="store_true", help="name the skipped and empty files")
    ix.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_embedder_args(ix, None)
    ix.set_defaults(func=_cmd_index)

    se = commands.add_parser("search", help="top-k chunks for a query, with scores")
    se.add_argument("--index", required=True)
    se.add_argument("-q", "--query", required=True)
    _add_retrieval_args(se, 5)
    _add_embedder_args(se, None)
    se.set_defaults(func=_cmd_search)

    ask = commands.add_parser("ask", help="answer a question from the index with numbered citations (streams)")
    ask.add_argument("--index", required=True)
    ask.add_argument("-q", "--question", required=True)
    ask.add_argument("--max-tokens", type=int, default=256)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--min-similarity", type=float, default=MIN_SIMILARITY,
                     help="below this best cosine, answer 'I don't know' (default: %(default)s, for MiniLM)")
    _add_retrieval_args(ask, 5)
    _add_embedder_args(ask, None)
    add_llm_args(ask)
    ask.set_defaults(func=_cmd_ask)

    ev = commands.add_parser("eval", help="recall@k / MRR per retriever and EM / F1 RAG vs closed-book")
    ev.add_argument("--index", required=True, help="index directory (built from the questions' contexts if missing)")
    ev.add_argument("--qa", required=True, help="SQuAD JSON or JSONL {question, answers, context?}")
    ev.add_argument("--out", default="rag-eval", help="report directory (default: %(default)s)")
    ev.add_argument("--retrievers", default=",".join(RETRIEVERS), help="default: %(default)s")
    ev.add_argument("--limit", type=int, default=None, help="first N questions only")
    ev.add_argument("--answer-n", type=int, default=50, help="questions answered by the model (default: %(default)s)")
    ev.add_argument("-k", "--top-k", type=int, default=3, help="sources given to the model (default: %(default)s)")
    ev.add_argument("--min-similarity", type=float, default=MIN_SIMILARITY)
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_embedder_args(ev, None)
    add_llm_args(ev)
    ev.set_defaults(func=_cmd_eval)
