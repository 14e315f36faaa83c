"""Shared fixtures: small real text (Python's own stdlib source and a few multilingual lines) and a small
tokenizer trained on it once per session. Everything here is made on the fly or read from installed packages."""

import sysconfig
from pathlib import Path

import pytest
import torch

from gptlab.tokenizer import train_tokenizer

# The test models are tiny: one intra-op thread avoids oversubscribing CI's 2 cores (measured: the engine
# tests took 72 s with the default threads on a loaded 2-core machine and 14 s with one).
torch.set_num_threads(1)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module whose figures must not depend on it, restored after: commands run
    in-process (`--threads`) may have changed the session's setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
MULTILINGUAL = [
    "Le cœur a ses raisons que la raison ne connaît point.",
    "天下大势，分久必合，合久必分。",
    "Съешь же ещё этих мягких французских булок.",
    "emoji 🎉🚀 and flags 🇫🇷, zero-width\u200bjoiner, tabs\t\tand  spaces   end",
]


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    """About 400 KB of real text: a dozen stdlib modules plus multilingual lines."""
    names = ["argparse.py", "textwrap.py", "csv.py", "json/decoder.py", "json/encoder.py", "difflib.py",
             "string.py", "shlex.py", "heapq.py", "bisect.py", "random.py", "statistics.py"]
    return [(STDLIB / n).read_text(encoding="utf-8") for n in names] + MULTILINGUAL


@pytest.fixture(scope="session")
def small_tokenizer(corpus_texts):
    return train_tokenizer(corpus_texts, vocab_size=1024)


@pytest.fixture(scope="session")
def tokenizer_file(small_tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    small_tokenizer.save(path)
    return path
