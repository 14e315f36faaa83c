"""The emergence and probes labs on a small hand-built sweep folder (random-init models saved as runs, with
checkpoints), including a missing, a foreign and an unlisted run; the teacher-forced answer metrics agree
with the engine's continuation scoring; the shipped probes load."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from _pretrain_data import make_dataset
from gptlab.checkpoint import save_model_dir
from gptlab.infer.engine import Engine
from gptlab.lab.emergence import run_emergence, score_answer
from gptlab.lab.probes import classify_tokens, probe_accuracy, probe_items, run_probes
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import Tokenizer, train_tokenizer

CATEGORIES = {"grammar", "lexical_semantics", "world_knowledge", "sentiment", "translation", "arithmetic"}


def tiny_model(tokenizer: Tokenizer, depth: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_depth(depth, tokenizer.vocab_size, max_seq_len=64)).eval()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """sweep.json with two finished runs (the larger with two checkpoints), a listed run that never finished,
    a listed run trained with another tokenizer, and an unlisted folder under runs/."""
    root = tmp_path_factory.mktemp("probe_sweep")
    data_dir = make_dataset(root / "dataset")
    tokenizer = Tokenizer.load(root / "dataset" / "tokenizer.json")
    sweep = root / "sweep"
    (sweep / "runs" / "stranger").mkdir(parents=True)
    shutil.copy(root / "dataset" / "tokenizer.json", sweep / "tokenizer.json")
    runs = []
    for depth in (1, 2):
        model = tiny_model(tokenizer, depth, depth)
        name = f"d{depth}w64-2s"
        save_model_dir(sweep / "runs" / name / "model", model, tokenizer)
        for step in (1, 2):
            save_model_dir(sweep / "runs" / name / "checkpoints" / f"step_{step}", model, tokenizer)
        runs.append({"name": name, "role": "fit", "depth": depth, "width": 64, "n_params": model.num_params(),
                     "tokens": 128, "flops": depth * 1e6})
    other = train_tokenizer(["completely different text " * 50], 300)
    save_model_dir(sweep / "runs" / "d3w64-2s" / "model", tiny_model(other, 1, 0), other)
    runs += [{"name": "d3w64-2s", "role": "fit", "n_params": 10, "tokens": 128, "flops": 1.0},
             {"name": "d4w64-2s", "role": "fit", "n_params": 20, "tokens": 128, "flops": 2.0}]
    (sweep / "sweep.json").write_text(json.dumps({"format": 1, "data_dir": str(data_dir), "batch_tokens": 64,
                                                  "runs": runs}))
    return sweep


def test_shipped_probes_cover_six_categories():
    items = probe_items()
    counts = Counter(item.category for item in items)
    assert set(counts) == CATEGORIES and len(items) >= 250 and min(counts.values()) >= 30
    assert len({item.text for item in items}) == len(items)  # no duplicates
    assert all(len(item.continuations) == 2 and item.answer == 0 for item in items)


def test_answer_metrics_match_engine_scoring(small_tokenizer):
    model = tiny_model(small_tokenizer, 1, 0)
    prompt, answer = "Q: What is 2 + 3?\nA:", " 5, said the parser"
    engine = Engine(model, small_tokenizer)
    metrics = score_answer(engine, prompt, answer)
    reference = engine.score([prompt], [answer])[0]
    n = len(small_tokenizer.encode(answer))
    assert metrics["answer_tokens"] == n
    assert metrics["loglik"] == pytest.approx(reference.logprob / n, abs=1e-4)
    assert metrics["exact_match"] == float(reference.is_greedy)
    assert 0.0 <= metrics["exact_match"] <= metrics["token_accuracy"] <= 1.0


def test_probes_score_on_a_tiny_model(small_tokenizer):
    items = [i for i in probe_items() if i.category in ("arithmetic", "grammar")][:20]
    result = probe_accuracy(tiny_model(small_tokenizer, 1, 0), small_tokenizer, items)
    assert result["overall"]["n"] == 20 and sum(result[c]["n"] for c in result if c != "overall") == 20
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result.values())


def test_token_classes():
    losses = np.array([[0.2, 5.0, 8.0, 3.0],   # smallest model
                       [0.1, 3.0, 7.5, 2.0],
                       [0.1, 2.0, 7.0, 4.0]])  # largest
    classes = classify_tokens(losses)
    assert classes["easy"].tolist() == [True, False, False, False]
    assert classes["improving"].tolist() == [False, True, False, False]  # token 3 is best at the middle size
    assert classes["hard"].tolist() == [False, False, True, False]


def test_probes_and_emergence_on_a_sweep_folder(sweep, tmp_path, caplog):
    items = probe_items()  # two of each category, through --items (a probes file of one's own)
    lines = [f"[{c}]\nitems = {json.dumps([i.text for i in items if i.category == c][:2], ensure_ascii=False)}"
             for c in sorted(CATEGORIES)]
    (tmp_path / "few.toml").write_text("\n".join(lines), encoding="utf-8")
    result = run_probes(sweep, tmp_path / "probes", text_rows=2, items_path=tmp_path / "few.toml")
    assert [r["run"] for r in result["by_size"]] == ["d1w64-2s", "d2w64-2s"]
    assert result["checkpoints_of"] == "d2w64-2s" and [r["step"] for r in result["by_step"]] == [1, 2]
    assert set(result["by_size"][0]["probes"]) == CATEGORIES | {"overall"}
    assert result["tokens"] == 2 * 64 and (tmp_path / "probes" / "tokens.txt").read_text().startswith("held-out")
    for png in ("probes.png", "token_losses.png"):
        assert (tmp_path / "probes" / png).stat().st_size > 1000
    assert "skipped run d4w64-2s: no model directory" in caplog.text
    assert "skipped run d3w64-2s: its tokenizer is not the sweep's" in caplog.text
    assert "stranger: not a run of" in caplog.text

    results = run_emergence(sweep, tmp_path / "emergence", tasks=("arithmetic", "knowledge"), n=3, shots=1)
    assert len(results) == 2
    for r in results:
        for task in ("arithmetic", "knowledge"):
            m = r["tasks"][task]
            assert 0.0 <= m["exact_match"] <= m["token_accuracy"] <= 1.0 and m["loglik"] < 0
    assert (tmp_path / "emergence" / "emergence.png").stat().st_size > 1000
