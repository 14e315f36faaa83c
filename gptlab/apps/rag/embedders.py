"""Text embedders: a sentence-transformers model folder (all-MiniLM-L6-v2 by default) or an OpenAI-compatible
`/v1/embeddings` endpoint, behind one small interface that the index and the tests share.

Design decisions
- An embedder has a `name` and a `dim`, both recorded in the index when it is created; opening the index
  with another embedder is a GptlabError naming both (vectors from two models are not comparable).
- Vectors are L2-normalised float32, so cosine similarity is a dot product and scores from different
  embedders read on the same [-1, 1] scale (the "I don't know" threshold is a cosine).
- `count_tokens` is the embedder's own tokenizer where it has one (the chunker budgets in it: see
  chunking.py); an endpoint has none, so it uses ceil(UTF-8 bytes / 4), the same estimate as apps.llm.
- sentence-transformers is imported lazily and run with HF_HUB_OFFLINE=1: the model is a local folder
  (registry name -> `gptlab models get` cache), and nothing may reach the Hub behind the user's back.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np

from ...common import GptlabError

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
OPENAI_PREFIX = "openai:"


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised."""

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes in the model's input."""


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class SentenceTransformerEmbedder:
    """A sentence-transformers model folder (or a registry name that resolves to one)."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 64):
        from ..models import resolve_model_dir

        folder = resolve_model_dir(model)
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise GptlabError(f"{folder} is not a sentence-transformers model folder (no modules.json or config.json)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a "Loading weights" bar on every open is noise here
        self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        self.name = str(model)
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())  # the method's name changed in sentence-transformers 6
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])


class OpenAIEmbedder:
    """An OpenAI-compatible `/v1/embeddings` endpoint (OpenAI, vLLM, llama.cpp's server, TEI ...)."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, batch_size: int = 128,
                 http_client=None):
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                    http_client=http_client, max_retries=0 if http_client else 2)
        self.model = model
        self.name = OPENAI_PREFIX + model
        self.batch_size = batch_size
        self.dim = int(self.embed(["dimension probe"]).shape[1])

    def embed(self, texts: list[str]) -> np.ndarray:
        import openai

        rows = []
        for start in range(0, len(texts), self.batch_size):
            try:
                response = self.client.embeddings.create(model=self.model, input=texts[start:start + self.batch_size])
            except openai.APIError as e:
                raise GptlabError(f"embeddings endpoint {self.client.base_url} failed: {e}") from None
            rows.extend(item.embedding for item in sorted(response.data, key=lambda item: item.index))
        if not rows:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        return normalise_rows(np.array(rows, dtype=np.float32))

    def count_tokens(self, text: str) -> int:
        return math.ceil(len(text.encode("utf-8")) / 4)


def open_embedder(spec: str = DEFAULT_EMBEDDER, base_url: str | None = None, api_key: str | None = None,
                  device: str = "cpu") -> Embedder:
    """`openai:MODEL` (with `base_url`) for an endpoint; otherwise a sentence-transformers folder or registry name."""
    if spec.startswith(OPENAI_PREFIX):
        return OpenAIEmbedder(spec[len(OPENAI_PREFIX):], base_url=base_url, api_key=api_key)
    if base_url is not None:
        raise GptlabError(f"--embed-base-url is for an endpoint model: give --embedder openai:MODEL, not {spec!r}")
    return SentenceTransformerEmbedder(spec, device=device)
