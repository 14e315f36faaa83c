"""Training checkpoints: exact resume, checksums, fallback past corrupt checkpoints, mismatch errors,
keep-last-N, atomic saves, RNG state round trip. Model directories: checksums verified on every load, with
a verification stamp that skips rehashing until a file changes. Trains tiny models on real text (Python
stdlib source)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _pretrain_data import make_dataset
from gptlab import checkpoint as ckpt_mod
from gptlab.checkpoint import (CHECKSUMS, IMPORTED_FILE, VERIFIED_STAMP, checkpoint_dirs, latest_valid_checkpoint,
                               load_model_dir, load_training_checkpoint, read_checksums, rng_state, save_model_dir,
                               save_training_checkpoint, set_rng_state, verify_checkpoint, verify_checksums)
from gptlab.interop import export_hf, import_model
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


# ---- model directories ----------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def model_dir(data_dir, tmp_path) -> Path:
    torch.manual_seed(0)
    return save_model_dir(tmp_path / "model", *_small_model_and_tokenizer(data_dir))


def flip_tensor_bytes(path: Path, n: int, seed: int = 0) -> None:
    """Invert `n` bytes of a safetensors file's tensor data (not its header, so it still parses), in place."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # an 8-byte header length, the JSON header, then the tensors
    for i in random.Random(seed).sample(range(start, len(data)), n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_weights_are_named_by_load_model_dir_and_the_cli(model_dir, tmp_path):
    assert set(read_checksums(model_dir)) == {"model.safetensors", "tokenizer.json", "gptlab.json"}
    # cloned: on the CPU the loaded tensors share the file's memory map, so rewriting the file would change them
    original = {k: v.clone() for k, v in load_model_dir(model_dir)[0].state_dict().items()}
    flip_tensor_bytes(model_dir / "model.safetensors", 100)
    with pytest.raises(GptlabError, match=r"model file .*/model/model\.safetensors is corrupt"):
        load_model_dir(model_dir)

    proc = subprocess.run([sys.executable, "-m", "gptlab.cli", "sample", "--model", str(model_dir), "--prompt", "def",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and proc.stdout == ""
    assert f"error: model file {model_dir}/model.safetensors is corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr

    # without SHA256SUMS (a model dir from before checksums) the same damage loads: only the checksums catch it
    (model_dir / CHECKSUMS).unlink()
    damaged, _ = load_model_dir(model_dir)
    assert any(not torch.equal(v, original[k]) for k, v in damaged.state_dict().items())


def test_loading_a_model_does_not_import_the_compiler(model_dir):
    """The meta-device skeleton is not randomly initialised: torch's meta normal_ imports torch._dynamo and
    sympy (50 MB of RSS in `gptlab sample`, checkpoint.py `_NoRandomInit`). In a fresh process, as in sample."""
    script = ("import sys, torch; before = 'torch._dynamo' in sys.modules\n"
              "from gptlab.checkpoint import load_for_inference, load_model_dir\n"
              f"load_for_inference({str(model_dir)!r}); load_model_dir({str(model_dir)!r})\n"
              "print(before, 'torch._dynamo' in sys.modules, 'sympy' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    before, dynamo, sympy = proc.stdout.split()
    if before == "True":
        pytest.skip("this torch imports torch._dynamo with torch itself")
    assert (dynamo, sympy) == ("False", "False")


def test_edited_or_missing_files_are_named(model_dir, tmp_path):
    def damaged_copy(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(model_dir, copy)
        return copy

    config = damaged_copy("config")
    meta = json.loads((config / "gptlab.json").read_text())
    meta["model"]["rope_theta"] *= 2  # a config that still loads, and would compute something else
    (config / "gptlab.json").write_text(json.dumps(meta))
    with pytest.raises(GptlabError, match=r"model file .*/config/gptlab\.json is corrupt"):
        load_model_dir(config)

    tokenizer = damaged_copy("tokenizer")
    tok = json.loads((tokenizer / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {t: (i + 1) % len(tok["model"]["vocab"]) for t, i in tok["model"]["vocab"].items()}
    (tokenizer / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(GptlabError, match=r"model file .*/tokenizer/tokenizer\.json is corrupt"):
        load_model_dir(tokenizer)

    missing = damaged_copy("missing")
    (missing / "tokenizer.json").unlink()
    with pytest.raises(GptlabError, match=r"model file missing: .*/missing/tokenizer\.json \(listed in SHA256SUMS\)"):
        load_model_dir(missing)

    bad_manifest = damaged_copy("bad_manifest")
    (bad_manifest / CHECKSUMS).write_text((model_dir / CHECKSUMS).read_text() + "not a checksum line\n")
    with pytest.raises(GptlabError, match=r"bad_manifest/SHA256SUMS:4: not a"):
        load_model_dir(bad_manifest)

    load_model_dir(damaged_copy("intact"))  # a plain copy verifies (new inodes: hashed afresh)


def test_hf_export_and_import_carry_checksums(model_dir, tmp_path):
    export_hf(model_dir, tmp_path / "hf")
    assert set(read_checksums(tmp_path / "hf")) == {"model.safetensors", "config.json", "generation_config.json",
                                                    "tokenizer.json", "tokenizer_config.json"}
    imported = import_model(tmp_path / "hf", tmp_path / "imported")
    assert IMPORTED_FILE in read_checksums(imported)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-2}))
    with pytest.raises(GptlabError, match=r"Hugging Face model file .*/hf/config\.json is corrupt"):
        import_model(tmp_path / "hf", tmp_path / "again")


def test_verification_stamp_skips_rehashing_until_a_file_changes(model_dir, monkeypatch):
    hashed = []
    real_file_digest = hashlib.file_digest

    def counting_file_digest(f, digest):
        hashed.append(Path(f.name).name)
        return real_file_digest(f, digest)

    monkeypatch.setattr(ckpt_mod.hashlib, "file_digest", counting_file_digest)
    # files changed in the last RECENT_NS are verified but not stamped (clock-tick granularity)
    monkeypatch.setattr(ckpt_mod, "RECENT_NS", 3600 * 10**9)
    assert verify_checksums(model_dir, "model") and not (model_dir / VERIFIED_STAMP).exists()
    monkeypatch.setattr(ckpt_mod, "RECENT_NS", 0)
    hashed.clear()
    assert verify_checksums(model_dir, "model")
    assert sorted(hashed) == ["gptlab.json", "model.safetensors", "tokenizer.json"]
    hashed.clear()
    load_model_dir(model_dir)  # a cached load hashes nothing
    assert hashed == []

    # same size, different content, its mtime set back to what the stamp recorded: the ctime still moves
    weights = model_dir / "model.safetensors"
    before = weights.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity, so the rewrite gets a later ctime
    flip_tensor_bytes(weights, 1)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    with pytest.raises(GptlabError, match=r"model\.safetensors is corrupt"):
        load_model_dir(model_dir)
    assert hashed == ["model.safetensors"]  # the other files' stamps still hold

    # a new mtime invalidates the stamp too (content restored, so the file verifies and is stamped again)
    flip_tensor_bytes(weights, 1)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    hashed.clear()
    load_model_dir(model_dir)
    load_model_dir(model_dir)
    assert hashed == ["model.safetensors"]

    (model_dir / VERIFIED_STAMP).write_text("{not json")  # a damaged stamp only costs a rehash
    hashed.clear()
    load_model_dir(model_dir)
    assert sorted(hashed) == ["gptlab.json", "model.safetensors", "tokenizer.json"]


def test_reward_model_dir_lists_its_head(data_dir, tmp_path):
    from gptlab.reward_model import HEAD_FILE, REWARD_META, RewardModel

    rm = RewardModel(*_small_model_and_tokenizer(data_dir))
    path = rm.save(tmp_path / "rm")
    assert {HEAD_FILE, REWARD_META} <= set(read_checksums(path))
    head = path / HEAD_FILE
    head.write_bytes(head.read_bytes()[:-4] + b"\x00\x00\x80\x3f")  # the bias: 0.0 -> 1.0, still a valid file
    with pytest.raises(GptlabError, match=r"reward_head\.safetensors is corrupt"):
        RewardModel.load(path)
