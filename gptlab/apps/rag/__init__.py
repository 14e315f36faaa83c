"""Retrieval-augmented generation: `RagIndex` (index and search) and `answer` (grounded answers with citations)."""

from .answer import Answer, answer
from .store import Hit, IndexStats, RagIndex

__all__ = ["Answer", "Hit", "IndexStats", "RagIndex", "answer"]
