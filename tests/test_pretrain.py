"""Pretraining: it learns, bits per byte is computed right, schedules, Muon grouping, gradient accumulation
and 2-process DDP equal one process, NaN stops with a diagnostic, SIGTERM saves a checkpoint.
All on CPU with tiny models on real text (Python stdlib source)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _pretrain_data import make_dataset
from gptlab.checkpoint import latest_valid_checkpoint, load_model_dir
from gptlab.common import GptlabError
from gptlab.data.loader import PackedLoader
from gptlab.train.metrics import read_metrics
from gptlab.model import GPT, GPTConfig
from gptlab.train.optim import build_optimizers, lr_multiplier
from gptlab.train.pretrain import PRESETS, PretrainConfig, evaluate, pretrain

REPO = Path(__file__).resolve().parents[1]


def tiny(data_dir: Path, out_dir: Path, **overrides) -> PretrainConfig:
    fields = dict(data_dir=str(data_dir), out_dir=str(out_dir), depth=1, seq_len=32, batch_size=4, num_steps=4,
                  warmup_steps=2, lr=3e-3, eval_every=0, eval_batches=2, sample_every=0, checkpoint_every=0,
                  keep_checkpoints=0, tensorboard=False, progress=False)
    fields.update(overrides)
    return PretrainConfig(**fields)


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("pretrain_data"))


@pytest.fixture(scope="module")
def accum_run(data_dir, tmp_path_factory) -> Path:
    """One process, micro-batches of 2 rows, 2 micro-batches per step (256 tokens/step), 3 steps."""
    out = tmp_path_factory.mktemp("accum")
    return pretrain(tiny(data_dir, out, batch_size=2, total_batch_tokens=128, num_steps=3))


def test_lr_schedules():
    cos = PretrainConfig(num_steps=100, warmup_steps=10, schedule="cosine", min_lr_frac=0.1)
    assert lr_multiplier(0, cos) == pytest.approx(0.1) and lr_multiplier(9, cos) == pytest.approx(1.0)
    assert lr_multiplier(10, cos) == pytest.approx(1.0)
    assert lr_multiplier(55, cos) == pytest.approx(0.55)  # halfway through the decay: (1 + 0.1) / 2
    assert lr_multiplier(100, cos) == pytest.approx(0.1)
    values = [lr_multiplier(s, cos) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))

    wsd = PretrainConfig(num_steps=100, warmup_steps=10, schedule="wsd", decay_frac=0.2, min_lr_frac=0.0)
    assert [lr_multiplier(s, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(89, wsd) == pytest.approx(0.5)
    assert lr_multiplier(99, wsd) == pytest.approx(0.0)


def test_presets_follow_the_depth_dial():
    assert (PRESETS["tiny"].depth, PRESETS["tiny"].seq_len) == (2, 256)
    gpt2 = PRESETS["gpt2"]
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(gpt2.depth, 50304, max_seq_len=gpt2.seq_len))
    assert 115e6 < model.num_params() < 135e6 and gpt2.seq_len == 1024 and gpt2.compile


def test_pretrain_learns_and_writes_outputs(data_dir, tmp_path, caplog):
    cfg = tiny(data_dir, tmp_path, batch_size=8, num_steps=30, warmup_steps=3, lr=1e-2, eval_every=15,
               eval_batches=4, sample_every=30, sample_tokens=8, tensorboard=True)
    final = pretrain(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 31))
    val = [r["val/loss"] for r in records if "val/loss" in r]
    assert len(val) == 3  # steps 0, 15, 30
    assert val[0] > math.log(400) - 0.3  # untrained: about uniform over the vocabulary
    assert val[-1] < val[0] - 0.8  # learned: 0.8 nats/token better on held-out text (measured: 1.08)
    samples = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sample at step 30")]
    assert len(samples) == 3  # one per prompt, through gptlab.infer.engine
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # the final model dir loads, and bits per byte = nats of the text targets / ln 2 / their UTF-8 bytes,
    # recomputed here from per-token losses and the decoded bytes of each target token (specials excluded)
    model, tok = load_model_dir(final)
    loader = PackedLoader(data_dir, "val", batch_size=8, seq_len=32)
    result = evaluate(model, loader, 2, torch.from_numpy(tok.token_bytes()), torch.autocast("cpu", enabled=False),
                      torch.device("cpu"))
    loader.rows_consumed = 0
    nats = text_nats = n_bytes = n_tokens = 0
    specials = set(tok.special_tokens.values())
    with torch.no_grad():
        for _ in range(2):
            x, y = loader.next_batch()
            _, loss = model(x, y)
            nats += loss.item() * y.numel()
            n_tokens += y.numel()
            per_token = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
            for target, value in zip(y.flatten().tolist(), per_token.tolist()):
                if target not in specials:
                    text_nats += value
                    n_bytes += len(tok.decode_bytes([target]))
    assert n_tokens > n_bytes / 10 and text_nats < nats  # the rows hold document boundaries, whose loss is left out
    assert result["val/loss"] == pytest.approx(nats / n_tokens, rel=1e-5)
    assert result["val/bpb"] == pytest.approx(text_nats / math.log(2) / n_bytes, rel=1e-5)
    assert result["val/loss"] == pytest.approx(val[-1], rel=0.05)  # same model as the last eval (other rows)


def test_muon_takes_block_matrices_and_learns(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path, optimizer="muon", batch_size=8, num_steps=8, warmup_steps=3, lr=1e-2,
               eval_every=8, eval_batches=4)
    model = GPT(GPTConfig.from_depth(1, 400, max_seq_len=32))
    adamw, muon = build_optimizers(model, cfg)
    assert isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    adamw_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert muon_names == {n for n, p in model.named_parameters() if n.startswith("model.layers.") and p.ndim == 2}
    assert adamw_names == {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                           "model.layers.0.post_attention_layernorm.weight"}
    no_decay = adamw.param_groups[1]
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])

    pretrain(cfg)
    val = [r["val/loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val/loss" in r]
    assert val[-1] < val[0] - 0.4  # measured: 0.67


def train_records(out_dir: Path) -> tuple[list[float], list[float]]:
    records = [r for r in read_metrics(out_dir / "metrics.jsonl") if "train/loss" in r]
    return [r["train/loss"] for r in records], [r["train/grad_norm"] for r in records]


def test_gradient_accumulation_equals_one_big_batch(accum_run, data_dir, tmp_path):
    big = pretrain(tiny(data_dir, tmp_path, batch_size=4, num_steps=3))
    # loss and gradient norm per step say the accumulated gradient is the mean over the whole batch
    # (Adam alone would hide a wrong scale); weights agree to a small fraction of one step's update
    # (lr 3e-3): Adam divides by sqrt(v), which magnifies float summation-order differences of tiny gradients
    (acc_loss, acc_norm), (big_loss, big_norm) = train_records(accum_run.parent), train_records(tmp_path)
    assert acc_loss == pytest.approx(big_loss, rel=1e-5) and acc_norm == pytest.approx(big_norm, rel=1e-4)
    a, b = load_file(accum_run / "model.safetensors"), load_file(big / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5)


def test_ddp_two_gloo_ranks_equal_single_process_accumulation(accum_run, data_dir, tmp_path):
    """2 ranks x micro-batch 2 read the same rows per step as 1 process x 2 micro-batches of 2."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gptlab.pretrain", "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--depth", "1",
           "--seq-len", "32", "--batch-size", "2", "--total-batch-tokens", "128", "--num-steps", "3",
           "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "0", "--eval-batches", "2",
           "--sample-every", "0", "--checkpoint-every", "0", "--tensorboard", "false", "--progress", "false"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks x 1 micro-batches" in proc.stderr
    ddp = load_file(tmp_path / "model" / "model.safetensors")
    single = load_file(accum_run / "model.safetensors")
    assert ddp.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=2e-6)
    (ddp_loss, ddp_norm), (single_loss, single_norm) = train_records(tmp_path), train_records(accum_run.parent)
    assert ddp_loss == pytest.approx(single_loss, rel=1e-6) and ddp_norm == pytest.approx(single_norm, rel=1e-5)


def test_fsdp_two_gloo_ranks_with_resume_equal_single_process_accumulation(accum_run, data_dir, tmp_path):
    """FSDP2 over 2 ranks, stopped after step 2 (its checkpoint gathered from the shards, a sample drawn from
    a gathered copy) and resumed (the full states sharded again) to step 3: the same weights, losses and
    AdamW moments, in the same checkpoint layout, as one process accumulating 2 micro-batches."""
    def run(steps: int, *extra: str) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "gptlab.pretrain", "--data-dir", str(data_dir), "--out-dir", str(tmp_path), "--depth", "1",
               "--seq-len", "32", "--batch-size", "2", "--total-batch-tokens", "128", "--num-steps", str(steps),
               "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "0", "--eval-batches", "2",
               "--sample-every", "2", "--sample-tokens", "4", "--checkpoint-every", "0", "--tensorboard", "false",
               "--progress", "false", "--fsdp", "true", *extra]
        proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    with pytest.raises(ValueError, match="--fsdp needs --optimizer adamw"):
        PretrainConfig(fsdp=True, optimizer="muon")
    first = run(2)
    assert "sample at step 2" in first and "FSDP: weights, gradients and AdamW state sharded over 2 ranks" in first
    assert "resumed from" in run(3, "--resume", "true")
    fsdp, single = load_file(tmp_path / "model" / "model.safetensors"), load_file(accum_run / "model.safetensors")
    assert fsdp.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(fsdp[k], single[k], rtol=0, atol=2e-6)
    (fsdp_loss, fsdp_norm), (single_loss, single_norm) = train_records(tmp_path), train_records(accum_run.parent)
    assert fsdp_loss == pytest.approx(single_loss, rel=1e-6) and fsdp_norm == pytest.approx(single_norm, rel=1e-5)
    moments = [torch.load(root / "checkpoints" / "step_00000003" / "trainer.pt", weights_only=True)["optimizers"]
               for root in (tmp_path, accum_run.parent)]
    for fsdp_opt, single_opt in zip(*moments):
        def listed(groups):  # the gathered state lists what AdamW keeps as tuples (betas)
            return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]
        assert listed(fsdp_opt["param_groups"]) == listed(single_opt["param_groups"])
        assert fsdp_opt["state"].keys() == single_opt["state"].keys()
        for i, state in single_opt["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fsdp_opt["state"][i][name], state[name], rtol=1e-4, atol=1e-9)


def test_nan_loss_stops_with_diagnostic_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        out = forward(self, idx, targets, **kw)
        if targets is not None:
            calls["n"] += 1
            if calls["n"] == 4:  # the 4th training step
                return out[0], out[1] * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    expected = r"loss became nan .*at step 3 .*last good loss \d+\.\d+.*step_00000002"
    with pytest.raises(GptlabError, match=expected):
        pretrain(tiny(data_dir, tmp_path, num_steps=6, checkpoint_every=2))
    kept = latest_valid_checkpoint(tmp_path / "checkpoints")
    assert kept.name == "step_00000002"
    assert all(torch.isfinite(t).all() for t in load_file(kept / "model.safetensors").values())


def test_sigterm_saves_a_checkpoint_then_resume_continues(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "gptlab.train.pretrain", "--data-dir", str(data_dir), "--out-dir", str(tmp_path),
           "--depth", "1", "--seq-len", "32", "--batch-size", "4", "--num-steps", "100000", "--eval-every", "0",
           "--sample-every", "0", "--checkpoint-every", "0", "--tensorboard", "false", "--progress", "false"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("train/loss") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    steps = [r["step"] for r in read_metrics(metrics) if "train/loss" in r]
    assert len(steps) >= 3
    ckpt = latest_valid_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step_{steps[-1]:08d}"
    assert "continue with --resume" in stderr

    # resume from it, finishing quickly (a smaller --num-steps than the interrupted run is allowed)
    pretrain(tiny(data_dir, tmp_path, resume=True, num_steps=steps[-1] + 1))
    assert [r["step"] for r in read_metrics(metrics) if "train/loss" in r] == steps + [steps[-1] + 1]
