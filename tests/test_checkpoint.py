"""Training checkpoints: exact resume, checksums, fallback past corrupt checkpoints, mismatch errors,
keep-last-N, atomic saves, RNG state round trip. Trains tiny models on real text (Python stdlib source)."""

from __future__ import annotations

import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _pretrain_data import make_dataset
from gptlab import checkpoint as ckpt_mod
from gptlab.checkpoint import (CHECKSUMS, checkpoint_dirs, latest_valid_checkpoint, load_training_checkpoint,
                               rng_state, save_training_checkpoint, set_rng_state, verify_checkpoint)
from gptlab.common import GptlabError, sha256_file
from gptlab.train.metrics import read_metrics
from gptlab.model import GPT, GPTConfig
from gptlab.train.optim import build_optimizers
from gptlab.train.pretrain import PretrainConfig, pretrain
from gptlab.tokenizer import Tokenizer, train_tokenizer


def tiny(data_dir: Path, out_dir: Path, **overrides) -> PretrainConfig:
    fields = dict(data_dir=str(data_dir), out_dir=str(out_dir), depth=1, seq_len=32, batch_size=4, num_steps=6,
                  warmup_steps=2, lr=3e-3, eval_every=0, eval_batches=2, sample_every=0, checkpoint_every=3,
                  keep_checkpoints=0, tensorboard=False, progress=False)
    fields.update(overrides)
    return PretrainConfig(**fields)


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "train/loss" in r}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ckpt_data"))


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory) -> Path:
    """6 uninterrupted steps with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("full_run")
    pretrain(tiny(data_dir, out))
    return out


def test_resume_continues_exactly(full_run, data_dir, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(full_run / "checkpoints" / "step_00000003", tmp_path / "checkpoints" / "step_00000003")
    pretrain(tiny(data_dir, tmp_path, resume=True))
    full, resumed = train_losses(full_run), train_losses(tmp_path)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert sorted(resumed) == [4, 5, 6]  # the resumed run did not retrain steps 1-3
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]  # bitwise on CPU
    a, b = weights(full_run / "model"), weights(tmp_path / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_files_and_checksums(full_run):
    assert [p.name for p in checkpoint_dirs(full_run / "checkpoints")] == ["step_00000003", "step_00000006"]
    ckpt = full_run / "checkpoints" / "step_00000006"
    listed = dict(line.split("  ")[::-1] for line in (ckpt / CHECKSUMS).read_text().splitlines())
    assert set(listed) == {"gptlab.json", "model.safetensors", "tokenizer.json", "trainer.json", "trainer.pt"}
    assert all(sha256_file(ckpt / name) == digest for name, digest in listed.items())
    assert not list((full_run / "checkpoints").glob(".*"))  # no temp dirs left behind


def test_corrupt_checkpoint_is_named_and_resume_falls_back(full_run, data_dir, tmp_path):
    shutil.copytree(full_run / "checkpoints", tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / "step_00000006"
    weights_file = newest / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the tensors
    weights_file.write_bytes(bytes(data))
    with pytest.raises(GptlabError, match=r"step_00000006/model\.safetensors is corrupt"):
        verify_checkpoint(newest)
    assert latest_valid_checkpoint(tmp_path / "checkpoints").name == "step_00000003"

    # --resume skips the corrupt step-6 checkpoint, continues from step 3 and lands on the same weights
    pretrain(tiny(data_dir, tmp_path, resume=True))
    assert sorted(train_losses(tmp_path)) == [4, 5, 6]
    a, b = weights(full_run / "model"), weights(tmp_path / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_and_missing_files_are_detected(full_run, tmp_path):
    ckpt = tmp_path / "step_00000003"
    shutil.copytree(full_run / "checkpoints" / "step_00000003", ckpt)
    state = ckpt / "trainer.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(GptlabError, match=r"trainer\.pt is corrupt"):
        verify_checkpoint(ckpt)
    (ckpt / CHECKSUMS).unlink()
    with pytest.raises(GptlabError, match="no SHA256SUMS"):
        verify_checkpoint(ckpt)
    assert latest_valid_checkpoint(tmp_path) is None


def test_existing_checkpoints_are_never_silently_replaced(full_run, data_dir, tmp_path):
    shutil.copytree(full_run / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(GptlabError, match="checkpoints of an earlier run .*--resume"):
        pretrain(tiny(data_dir, tmp_path))
    for ckpt in checkpoint_dirs(tmp_path / "checkpoints"):
        (ckpt / "gptlab.json").write_text("{}")
    with pytest.raises(GptlabError, match="no checkpoint .* passes its checksums"):
        pretrain(tiny(data_dir, tmp_path, resume=True))
    assert len(checkpoint_dirs(tmp_path / "checkpoints")) == 2


def test_checkpoint_of_another_model_or_tokenizer_is_refused(full_run, data_dir, tmp_path):
    shutil.copytree(full_run / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(GptlabError, match="different model config"):
        pretrain(tiny(data_dir, tmp_path, depth=2, resume=True))

    ckpt = full_run / "checkpoints" / "step_00000003"
    run_tok = Tokenizer.load(data_dir.parent / "tokenizer.json")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    other_tok = train_tokenizer([(stdlib / "os.py").read_text()], run_tok.vocab_size)
    assert other_tok.sha256 != run_tok.sha256
    model = GPT(GPTConfig.from_depth(1, other_tok.vocab_size, max_seq_len=32))
    with pytest.raises(GptlabError, match="different tokenizer"):
        load_training_checkpoint(ckpt, model, other_tok, build_optimizers(model, tiny(data_dir, tmp_path)))


def _small_model_and_tokenizer(data_dir: Path):
    tok = Tokenizer.load(data_dir.parent / "tokenizer.json")
    model = GPT(GPTConfig.from_depth(1, tok.vocab_size, max_seq_len=32))
    return model, tok


def test_keep_last_n(data_dir, tmp_path):
    model, tok = _small_model_and_tokenizer(data_dir)
    opts = build_optimizers(model, tiny(data_dir, tmp_path))
    for step in (1, 2, 3, 4):
        save_training_checkpoint(tmp_path, step, model, tok, optimizers=opts, rng_states=[rng_state()],
                                 meta={}, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000003", "step_00000004"]


def test_failed_save_leaves_no_checkpoint(data_dir, tmp_path, monkeypatch):
    model, tok = _small_model_and_tokenizer(data_dir)
    opts = build_optimizers(model, tiny(data_dir, tmp_path))
    save_training_checkpoint(tmp_path, 1, model, tok, optimizers=opts, rng_states=[rng_state()], meta={})

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    with pytest.raises(OSError):
        save_training_checkpoint(tmp_path, 2, model, tok, optimizers=opts, rng_states=[rng_state()], meta={})
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000001"]
    assert latest_valid_checkpoint(tmp_path).name == "step_00000001"


def test_rng_states_round_trip(data_dir, tmp_path):
    model, tok = _small_model_and_tokenizer(data_dir)
    opts = build_optimizers(model, tiny(data_dir, tmp_path))
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    path = save_training_checkpoint(tmp_path, 7, model, tok, optimizers=opts, rng_states=[rng_state()],
                                    meta={"note": "x"})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    meta = load_training_checkpoint(path, model, tok, opts)
    assert meta["step"] == 7 and meta["note"] == "x"
    set_rng_state(meta["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
