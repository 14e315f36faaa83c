"""`data prepare` shards and the packed batch loader: exact contents, resume after a crash, refusal to
overwrite other data, loader determinism, epoch coverage, rank sharding and exact resume."""

import json
import textwrap

import numpy as np
import pytest
import torch

from gptlab.cli import main
from gptlab.common import GptlabError, atomic_write_bytes
from gptlab.data import prepare as prepare_mod
from gptlab.data.loader import PackedLoader
from gptlab.data.mixture import load_mixture
from gptlab.data.prepare import PrepareConfig, prepare
from gptlab.data.shards import open_split


@pytest.fixture
def mixture_file(tmp_path, corpus_texts):
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(corpus_texts):
        (src / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    path = tmp_path / "mix.toml"
    path.write_text(textwrap.dedent("""
        name = "test"
        val_fraction = 0.1
        [[sources]]
        name = "code"
        kind = "text"
        paths = ["src/*.txt"]
        doc_unit = "paragraph"
        max_doc_chars = 3000
    """))
    return path


def run_prepare(mixture_file, tokenizer_file, out, **kw):
    return prepare(PrepareConfig(mixture=str(mixture_file), tokenizer=str(tokenizer_file), out=str(out),
                                 shard_tokens=kw.pop("shard_tokens", 4000), **kw))


def test_shards_hold_every_document_exactly(mixture_file, tokenizer_file, small_tokenizer, tmp_path):
    out = run_prepare(mixture_file, tokenizer_file, tmp_path / "data")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["dtype"] == "uint16" and len(meta["splits"]["train"]["shards"]) > 3
    mixture = load_mixture(mixture_file)
    for split in ("train", "val"):
        tokens, _ = open_split(out, split)
        stream = tokens.slice(0, len(tokens)).astype(np.int64)
        eot = small_tokenizer.eot_id
        assert stream[0] == eot
        boundaries = np.flatnonzero(stream == eot).tolist() + [len(stream)]
        decoded = [small_tokenizer.decode(stream[a + 1:b].tolist()) for a, b in zip(boundaries, boundaries[1:])]
        expected = [d.text for d in mixture.documents(split)]
        assert decoded == expected
        assert tokens.bytes == sum(len(t.encode()) for t in expected) and tokens.docs == len(expected)


def test_resume_after_crash_gives_identical_shards(mixture_file, tokenizer_file, tmp_path, monkeypatch):
    clean = run_prepare(mixture_file, tokenizer_file, tmp_path / "clean")
    real_flush = prepare_mod._flush
    calls = {"n": 0}

    def crashing_flush(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C while the third shard was being written
        return real_flush(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "_flush", crashing_flush)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(mixture_file, tokenizer_file, tmp_path / "resumed")
    partial = json.loads((tmp_path / "resumed" / "meta.json").read_text())
    assert not partial["complete"] and len(partial["splits"]["train"]["shards"]) == 2
    monkeypatch.setattr(prepare_mod, "_flush", real_flush)
    resumed = run_prepare(mixture_file, tokenizer_file, tmp_path / "resumed")
    clean_meta = json.loads((clean / "meta.json").read_text())
    resumed_meta = json.loads((resumed / "meta.json").read_text())
    assert clean_meta["splits"] == resumed_meta["splits"]
    for shard in clean_meta["splits"]["train"]["shards"] + clean_meta["splits"]["val"]["shards"]:
        assert (clean / shard["file"]).read_bytes() == (resumed / shard["file"]).read_bytes()


def test_other_inputs_are_refused_without_force(mixture_file, tokenizer_file, tmp_path, corpus_texts):
    out = run_prepare(mixture_file, tokenizer_file, tmp_path / "data")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(GptlabError, match="prepared from other inputs"):
        run_prepare(mixture_file, tokenizer_file, out, shard_tokens=9999)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    run_prepare(mixture_file, tokenizer_file, out, shard_tokens=1 << 20, force=True)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_00000.bin", "val_00000.bin"]


def test_truncated_shard_is_detected(mixture_file, tokenizer_file, tmp_path):
    out = run_prepare(mixture_file, tokenizer_file, tmp_path / "data")
    shard = out / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(GptlabError, match="train_00001.bin is missing or truncated"):
        open_split(out, "train")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    import os

    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old contents")

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new contents that never land")
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temp file left behind


def test_prepare_cli_and_missing_tokenizer(mixture_file, tokenizer_file, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "prepare", "--mixture", str(mixture_file), "--tokenizer", str(tokenizer_file),
                 "--out", str(out), "--shard-tokens", "100000"]) == 0
    assert "code" in capsys.readouterr().out  # the per-source statistics table
    assert main(["data", "prepare", "--mixture", str(mixture_file), "--tokenizer", str(tmp_path / "no.json"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "error: tokenizer not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_texts):
    from gptlab.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("loader")
    src = folder / "src"
    src.mkdir()
    for i, text in enumerate(corpus_texts):
        (src / f"d{i}.txt").write_text(text)
    (folder / "mix.toml").write_text('val_fraction = 0.1\n[[sources]]\nname = "s"\nkind = "text"\n'
                                     'paths = ["src/*.txt"]\ndoc_unit = "paragraph"\nmax_doc_chars = 2000\n')
    tok = train_tokenizer(corpus_texts, 600)
    tok.save(folder / "tok.json")
    return run_prepare(folder / "mix.toml", folder / "tok.json", folder / "data", shard_tokens=3000)


def test_rows_are_windows_of_the_stream(prepared):
    loader = PackedLoader(prepared, "train", batch_size=4, seq_len=32, seed=1)
    stream = loader.tokens.slice(0, len(loader.tokens)).astype(np.int64)
    x, y = loader.next_batch()
    assert x.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y, row in zip(x, y, range(4)):
        start = loader._window(row) * 32
        assert row_x.tolist() == stream[start:start + 32].tolist()
        assert row_y.tolist() == stream[start + 1:start + 33].tolist()


def test_deterministic_for_seed_and_step(prepared):
    a = PackedLoader(prepared, "train", 4, 16, seed=7)
    b = PackedLoader(prepared, "train", 4, 16, seed=7)
    c = PackedLoader(prepared, "train", 4, 16, seed=8)
    batches_a = [a.next_batch()[0] for _ in range(5)]
    assert all(torch.equal(p, b.next_batch()[0]) for p in batches_a)
    assert not all(torch.equal(p, c.next_batch()[0]) for p in batches_a)


def test_every_window_once_per_epoch(prepared):
    loader = PackedLoader(prepared, "train", 1, 64, seed=3)
    n = loader.n_windows
    seen = [loader._window(r) for r in range(n)]
    assert sorted(seen) == list(range(n))
    assert [loader._window(r) for r in range(n, 2 * n)] != seen  # a new order in the next epoch


def test_ranks_partition_the_global_batch(prepared):
    world = 3
    single = PackedLoader(prepared, "train", batch_size=2 * world, seq_len=16, seed=5)
    ranks = [PackedLoader(prepared, "train", 2, 16, seed=5, rank=r, world_size=world) for r in range(world)]
    for _ in range(4):
        whole = single.next_batch()[0]
        parts = torch.cat([loader.next_batch()[0] for loader in ranks])
        assert torch.equal(whole, parts)


def test_exact_resume_from_state_dict(prepared):
    loader = PackedLoader(prepared, "train", 3, 16, seed=11)
    for _ in range(7):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    expected = [loader.next_batch() for _ in range(5)]
    resumed = PackedLoader(prepared, "train", 3, 16, seed=11)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (resumed.next_batch() for _ in range(5))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(GptlabError, match="seq_len"):
        PackedLoader(prepared, "train", 3, 32, seed=11).load_state_dict(state)


def test_val_is_sequential_and_loader_errors(prepared):
    val = PackedLoader(prepared, "val", 2, 16)
    assert [val._window(r) for r in range(5)] == list(range(5))
    with pytest.raises(GptlabError, match="fewer than seq_len"):
        PackedLoader(prepared, "val", 1, 10**7)
    with pytest.raises(GptlabError, match="no split"):
        PackedLoader(prepared, "test", 1, 8)
    with pytest.raises(GptlabError, match="rank 2 outside"):
        PackedLoader(prepared, "train", 1, 8, rank=2, world_size=2)
