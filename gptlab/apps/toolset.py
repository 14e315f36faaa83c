"""The built-in tools by name: `make_toolbox(["calculator", "python", ...], workspace)`, and `search`.

Design decisions
- The tools themselves live low in the layout (gptlab/tools: calculator, files, chart, the sandboxed
  python); `search` lives here because it reuses the RAG index (gptlab/apps/rag), an application module.
- `search` has two sources: a RAG index (`gptlab rag index`; hybrid BM25 + vector retrieval with the
  index's own embedder, `RagIndex.search`) when one is given, else BM25 (bm25s) over the text files of a
  folder, chunked the way the RAG index chunks (rag/chunking.py, ~200 words, 40 overlap; words stand in
  for tokens since no embedder is involved). The folder is read and indexed once, on the first query.
- A hit is shown as `[n] document (title) chars a-b: text`, the text cut at MAX_HIT_CHARS, so k hits fit
  an observation; the document name is relative to the folder (or as the index stored it).
"""

from __future__ import annotations

from pathlib import Path

from ..common import GptlabError
from ..tools import Tool, Toolbox, tool
from ..tools.calculator import calculator
from ..tools.files import chart_tool, check_workspace, file_tools
from ..tools.sandbox import python_tool

MAX_HIT_CHARS = 600
MAX_K = 20
CHUNK_WORDS, OVERLAP_WORDS = 200, 40

BUILTIN_TOOLS = {
    "calculator": "exact, safe arithmetic (no eval)",
    "python": "run Python code in an isolated sandbox (no network, read-only system, private workspace)",
    "search": "search a RAG index (--search-index) or, with BM25, the text files of a folder (--search-folder)",
    "chart": "draw a bar, line or scatter chart as a PNG in the workspace",
    "read_file": "read a text file in the workspace",
    "list_files": "list the files in the workspace",
    "write_file": "write a text file in the workspace",
}


class FolderSearch:
    """BM25 over the chunks of the text files of a folder, built on the first query."""

    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise GptlabError(f"search folder {folder} does not exist or is not a folder")
        self.folder = folder
        self._state = None  # (bm25s.BM25, chunks as (doc, title, start, end, text))

    def _build(self):
        import bm25s

        from .rag.chunking import chunk_text
        from .rag.readers import Unreadable, find_files, read_documents

        chunks = []
        for path in find_files([str(self.folder)]):
            try:
                documents = read_documents(path, path.read_bytes())
            except Unreadable:
                continue  # binary files are not searchable text
            for d in documents:
                name = Path(d.doc).relative_to(self.folder).as_posix() if d.doc == d.file else d.doc
                for span in chunk_text(d.text, lambda s: len(s.split()), CHUNK_WORDS, OVERLAP_WORDS):
                    chunks.append((name, d.title, span.start, span.end, d.text[span.start:span.end]))
        if not chunks:
            raise GptlabError(f"search folder {self.folder} holds no readable text")
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize([c[4] for c in chunks], stopwords="en", show_progress=False),
                        show_progress=False)
        return retriever, chunks

    def search(self, query: str, k: int) -> list[tuple]:
        import bm25s

        if self._state is None:
            self._state = self._build()
        retriever, chunks = self._state
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.ids[0]:
            return []
        indices, scores = retriever.retrieve(tokens, k=min(k, len(chunks)), show_progress=False)
        return [chunks[i] for i, s in zip(indices[0], scores[0]) if s > 0]


def search_tool(*, index: Path | None = None, folder: Path | None = None) -> Tool:
    """`search` over a RAG index directory, or else BM25 over a folder of text files."""
    if (index is None) == (folder is None):
        raise GptlabError("the search tool needs a RAG index (--search-index) or a folder (--search-folder), "
                          "exactly one")
    if index is not None:
        from .rag import RagIndex

        rag = RagIndex(index)  # GptlabError now if it is not an index; the embedder loads on the first query

        def find(query: str, k: int) -> list[tuple]:
            return [(h.doc, h.title, h.start, h.end, h.text) for h in rag.search(query, k=k)]
    else:
        find = FolderSearch(Path(folder)).search

    @tool
    def search(query: str, k: int = 5) -> str:
        """Search the document collection for passages about a query; returns the best passages with their source.

        Args:
            query: what to look for, in words
            k: how many passages to return (1-20)
        """
        if not query.strip():
            raise GptlabError("query must not be empty")
        if not 1 <= k <= MAX_K:
            raise GptlabError(f"k must be between 1 and {MAX_K}, got {k}")
        hits = find(query, k)
        if not hits:
            return "no passage matches the query"
        lines = []
        for number, (doc, title, start, end, text) in enumerate(hits, 1):
            text = " ".join(text.split())
            if len(text) > MAX_HIT_CHARS:
                text = text[:MAX_HIT_CHARS] + " [...]"
            lines.append(f"[{number}] {doc} ({title}) chars {start}-{end}: {text}")
        return "\n".join(lines)

    return search


def make_toolbox(names: list[str], workspace: Path, *, search_index: Path | None = None,
                 search_folder: Path | None = None, unsafe_local: bool = False) -> Toolbox:
    """A Toolbox holding the built-in tools `names` (see BUILTIN_TOOLS), bound to `workspace`."""
    unknown = [n for n in names if n not in BUILTIN_TOOLS]
    if unknown:
        raise GptlabError(f"unknown tool {unknown[0]!r} (known: {', '.join(BUILTIN_TOOLS)})")
    root = check_workspace(workspace)
    tools: list[Tool] = []
    files = {t.name: t for t in file_tools(root)}
    for name in dict.fromkeys(names):  # each once, in the order given
        if name == "calculator":
            tools.append(calculator)
        elif name == "python":
            tools.append(python_tool(root, unsafe_local=unsafe_local))
        elif name == "search":
            tools.append(search_tool(index=search_index, folder=search_folder))
        elif name == "chart":
            tools.append(chart_tool(root))
        else:
            tools.append(files[name])
    return Toolbox(tools)
