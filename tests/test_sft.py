"""SFT: which positions carry loss in packed rows (hand-checked), best-fit packing, the epoch loader, bad
inputs, a tiny model that learns from the task suite, LoRA SFT with exact resume, and a model whose
tokenizer lacks the chat tokens (an imported one). CPU, tiny random models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptlab.chat import CHAT_TEMPLATE, render, render_for_completion
from gptlab.checkpoint import IMPORTED_FILE, load_model_dir, save_model_dir
from gptlab.cli import main as cli_main
from gptlab.common import GptlabError
from gptlab.interop import export_hf
from gptlab.lora import ADAPTER_CONFIG, load_adapter
from gptlab.infer.generation_config import read_generation_config
from gptlab.train.metrics import read_metrics
from gptlab.model import GPT, GPTConfig
from gptlab.train.sft import (ConversationBatches, SFTConfig, add_chat_tokens, build_rows, load_conversations, pack,
                        render_and_fit, sft)
from gptlab.tokenizer import SPECIAL_TOKENS, Tokenizer

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
TOOL_CHAT = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "2+3?"},
             {"role": "assistant", "content": "", "tool_calls": [{"name": "calculator", "arguments": {"expression": "2+3"}}]},
             {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5."}]


def tiny_model_dir(tokenizer: Tokenizer, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=64, n_head=2, n_kv_head=2, head_dim=32,
                       intermediate_size=128, max_seq_len=160)
    return save_model_dir(path, GPT(config), tokenizer)


def tiny_config(model: Path, out: Path, **overrides) -> SFTConfig:
    fields = dict(model=str(model), out=str(out), num_conversations=48, val_conversations=12, seq_len=160,
                  batch_size=4, num_steps=4, warmup_steps=1, eval_every=0, gold_per_task=0, checkpoint_every=0,
                  keep_checkpoints=0, tensorboard=False, progress=False)
    return SFTConfig(**{**fields, **overrides})


def test_loss_positions_in_a_packed_row_hand_checked(small_tokenizer):
    tok = small_tokenizer
    sp = tok.special_id
    enc = tok.encode
    a, b = render(tok, CHAT), render(tok, TOOL_CHAT)
    # the layouts spelled out: everything the assistant writes is trained, nothing else
    hello = enc("Hello")
    assert a.ids == [tok.eot_id, sp("<|user_start|>"), *enc("Hi"), sp("<|user_end|>"), sp("<|assistant_start|>"),
                     *hello, sp("<|assistant_end|>")]
    call = enc('{"name": "calculator", "arguments": {"expression": "2+3"}}')
    b_ids = [tok.eot_id, sp("<|system_start|>"), *enc("Use tools."), sp("<|system_end|>"), sp("<|user_start|>"),
             *enc("2+3?"), sp("<|user_end|>"), sp("<|assistant_start|>"), sp("<|tool_call_start|>"), *call,
             sp("<|tool_call_end|>"), sp("<|tool_output_start|>"), *enc("5"), sp("<|tool_output_end|>"), *enc("5."),
             sp("<|assistant_end|>")]
    assert b.ids == b_ids
    trained_b = [sp("<|tool_call_start|>"), *call, sp("<|tool_call_end|>"), *enc("5."), sp("<|assistant_end|>")]

    seq_len, pad = len(a.ids) + len(b.ids) + 3, sp("<|pad|>")
    x, y = build_rows([a, b], [[0, 1]], seq_len, pad)
    row = a.ids + b.ids
    assert x[0].tolist() == row + [pad] * (seq_len - len(row))
    # target at position j is the token at j + 1 when trained, else -1
    trained_positions = [j for j, t in enumerate(y[0].tolist()) if t != -1]
    assert [y[0, j].item() for j in trained_positions] == hello + [sp("<|assistant_end|>")] + trained_b
    a_start = len(a.ids) - len(hello) - 2  # position of <|assistant_start|>: it predicts the first answer token
    assert trained_positions[:len(hello) + 1] == list(range(a_start, a_start + len(hello) + 1))
    # the boundary: a's <|assistant_end|> predicts b's <|endoftext|>, which is not trained
    assert y[0, len(a.ids) - 1].item() == -1 and x[0, len(a.ids)].item() == tok.eot_id
    # the tool output (written by the environment) and the prompt carry no loss
    p = len(a.ids) + b_ids.index(sp("<|tool_output_start|>"))
    out_len = len(enc("5"))
    assert (y[0, p - 1:p + out_len + 1] == -1).all()  # predicting the output block: untrained
    assert y[0, p + out_len + 1].item() == enc("5.")[0]  # after <|tool_output_end|> the assistant writes again
    assert (y[0, len(row) - 1:] == -1).all()  # padding carries no loss


def test_best_fit_decreasing_packing():
    # worked by hand: 5 | 4 | 3 -> row 0 (room 3, exact) | 3 -> row 1 | 2, 2 -> row 2 | 1 -> row 1 (room 1)
    assert pack([5, 4, 3, 3, 2, 2, 1], 8) == [[0, 2], [1, 3, 6], [4, 5]]
    lengths = [(i * 37) % 61 + 3 for i in range(200)]
    rows = pack(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= sum(lengths) / 64 * 1.1 + 1  # near the lower bound: little padding
    with pytest.raises(ValueError, match="exceeds"):
        pack([3, 9], 8)


def test_epoch_loader_covers_every_conversation_once_and_resumes(small_tokenizer):
    convs = [[{"role": "user", "content": f"Question {i}" + " more" * (i % 7)},
              {"role": "assistant", "content": f"Answer {i}."}] for i in range(40)]
    examples = [render(small_tokenizer, c) for c in convs]
    pad = small_tokenizer.special_id("<|pad|>")
    loader = ConversationBatches(examples, 48, 3, pad, seed=5)
    rows = loader.epoch_rows(0)
    assert sorted(i for r in rows for i in r) == list(range(40))
    assert loader.epoch_rows(1) != rows  # reshuffled every epoch
    for _ in range(2):
        loader.next_batch()
    state = loader.state_dict()
    n = len(rows) // 3 + 1
    expected = [loader.next_batch() for _ in range(n)]  # crosses into epoch 1
    assert loader.epoch == 1 and len(rows) > 6
    other = ConversationBatches(examples, 48, 3, pad, seed=5)
    other.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [other.next_batch() for _ in range(n)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_too_long_conversations_are_dropped_with_a_count(small_tokenizer, caplog):
    long_chat = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]
    kept, dropped = render_and_fit(small_tokenizer, [CHAT, long_chat, CHAT], 40, "training data")
    assert (len(kept), dropped) == (2, 1)
    assert "dropped 1 of 3 conversations longer than a row of 40 tokens" in caplog.text
    with pytest.raises(GptlabError, match="no conversation fits"):
        render_and_fit(small_tokenizer, [long_chat], 40, "training data")


def test_bad_jsonl_inputs_name_file_and_line(tmp_path):
    good = json.dumps({"messages": CHAT})
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(GptlabError, match=r"bad\.jsonl:3: not valid JSON"):
        load_conversations(SFTConfig(data=str(bad_json)))
    empty = tmp_path / "empty_turn.jsonl"
    empty.write_text(good + "\n" + json.dumps({"messages": [CHAT[0], {"role": "assistant", "content": "  "}]}) + "\n")
    with pytest.raises(GptlabError, match=r"empty_turn\.jsonl:2: message 2 \(assistant\): empty assistant message"):
        load_conversations(SFTConfig(data=str(empty)))
    one = tmp_path / "one.jsonl"
    one.write_text(good + "\n")
    with pytest.raises(GptlabError, match="at least 2"):
        load_conversations(SFTConfig(data=str(one)))
    with pytest.raises(GptlabError, match="unknown task 'nope'"):
        load_conversations(SFTConfig(tasks="identity,nope"))
    assert cli_main(["sft", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_jsonl_split_holds_out_conversations(tmp_path):
    path = tmp_path / "chats.jsonl"
    chats = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(30)]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    train, val = load_conversations(SFTConfig(data=str(path), val_conversations=100))
    assert (len(train), len(val)) == (27, 3)  # at most 10% held out
    assert sorted(c[0]["content"] for c in train + val) == sorted(c[0]["content"] for c in chats)


def test_sft_on_tasks_lowers_the_held_out_loss(small_tokenizer, tmp_path):
    base = tiny_model_dir(small_tokenizer, tmp_path / "base")
    cfg = tiny_config(base, tmp_path / "out", num_conversations=96, num_steps=24, lr=3e-3, eval_every=12,
                      gold_per_task=2, gold_max_tokens=8, tasks="identity,arithmetic")
    final = sft(cfg)
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    val = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
    assert [s for s, _ in val] == [0, 12, 24]
    assert val[-1][1] < val[0][1] - 1.0, val  # from ~ln(vocab) at random init
    assert len([r for r in records if "train/loss" in r]) == 24
    summary = json.loads((tmp_path / "out" / "sft.json").read_text())
    assert summary["train_conversations"] == 96 and summary["dropped_too_long"] == 0
    assert summary["final_val_loss"] == pytest.approx(val[-1][1])
    assert set(summary["gold_accuracy"]) == {"mean", "identity", "arithmetic"}
    model, tok = load_model_dir(final)
    assert tok.sha256 == small_tokenizer.sha256 and (tmp_path / "out" / "loss.png").is_file()
    # the model answers greedily by default, as its gold accuracy was measured (gptlab chat, gptlab serve)
    assert read_generation_config(final) == {"temperature": 0}
    base_state = load_file(base / "model.safetensors")
    assert not torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           base_state["model.layers.0.mlp.up_proj.weight"])


def test_lora_sft_resumes_exactly_and_saves_a_peft_adapter(small_tokenizer, tmp_path):
    base = tiny_model_dir(small_tokenizer, tmp_path / "base")
    lora = dict(lora_rank=4, lora_alpha=8.0, lora_lr=1e-2, num_steps=4, checkpoint_every=2, lora_dropout=0.1)
    full_run = sft(tiny_config(base, tmp_path / "a", **lora))
    # a second run that starts from the first run's step-2 checkpoint
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000002", tmp_path / "b" / "checkpoints" / "step_00000002")
    resumed = sft(tiny_config(base, tmp_path / "b", resume=True, **lora))
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "train/loss" in r] == [3, 4]
    a, b = load_file(full_run / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(GptlabError, match="holds checkpoints"):
        sft(tiny_config(base, tmp_path / "b", **lora))

    # only the adapted matrices changed, and base + adapter == the folded model
    base_state = load_file(base / "model.safetensors")
    assert torch.equal(a["model.norm.weight"], base_state["model.norm.weight"])
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base_state["model.layers.0.self_attn.q_proj.weight"])
    adapter_cfg = json.loads((tmp_path / "a" / "adapter" / ADAPTER_CONFIG).read_text())
    assert (adapter_cfg["r"], adapter_cfg["base_model_name_or_path"]) == (4, str(base))
    model, _ = load_model_dir(base)
    load_adapter(model, tmp_path / "a" / "adapter")
    folded, _ = load_model_dir(full_run)
    x = torch.randint(0, small_tokenizer.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), folded(x), atol=1e-5, rtol=1e-5)


def test_lora_on_an_int8_base_trains_and_resumes_exactly(small_tokenizer, tmp_path):
    base = tiny_model_dir(small_tokenizer, tmp_path / "base")
    lora = dict(lora_rank=4, lora_alpha=8.0, lora_lr=1e-2, num_steps=4, checkpoint_every=2, lora_base_dtype="int8")
    full_run = sft(tiny_config(base, tmp_path / "a", **lora))
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000002", tmp_path / "b" / "checkpoints" / "step_00000002")
    resumed = sft(tiny_config(base, tmp_path / "b", resume=True, **lora))
    a, b = load_file(full_run / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = load_file(tmp_path / "a" / "checkpoints" / "step_00000002" / "model.safetensors")
    assert ckpt["model.layers.0.self_attn.q_proj.weight_int8"].dtype == torch.int8  # the frozen base stays int8
    assert a["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # the folded model is float
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < losses[0]


def test_sft_on_a_model_whose_tokenizer_lacks_chat_tokens(corpus_texts, tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(corpus_texts, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    foreign = Tokenizer(hf.to_str())
    assert foreign.backend == "hf" and "<|user_start|>" not in foreign.special_tokens
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=foreign.vocab_size, n_layer=1, n_embd=64, n_head=2, n_kv_head=2, head_dim=32,
                          intermediate_size=128, max_seq_len=160, tie_embeddings=False))
    x = torch.tensor([foreign.encode("def main():\n    return 1")])
    before = model(x)

    tok = add_chat_tokens(model, foreign)
    added = [t for t in SPECIAL_TOKENS if t not in foreign.special_tokens]
    assert [tok.special_id(t) for t in added] == list(range(foreign.vocab_size, foreign.vocab_size + len(added)))
    assert model.config.vocab_size == tok.vocab_size == model.model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0]
    emb = model.model.embed_tokens.weight.detach()
    new_rows, old_rows = emb[foreign.vocab_size:], emb[:foreign.vocab_size]
    assert torch.cdist(new_rows, new_rows).add(torch.eye(len(added))).min() > 0  # distinct tokens
    # drawn around the old rows' mean with their spread (not noise of another scale)
    assert (new_rows - old_rows.mean(0)).abs().mean() < 3 * old_rows.std(0).mean()
    assert torch.equal(model(x)[..., :foreign.vocab_size], before)  # old tokens compute exactly as before
    assert tok.encode("<|user_start|>") != [tok.special_id("<|user_start|>")]  # still text unless allowed
    assert render(tok, CHAT).ids[1] == tok.special_id("<|user_start|>")

    # the whole stage runs on such a model dir (what `gptlab import` produces)
    torch.manual_seed(0)
    src = save_model_dir(tmp_path / "imported", GPT(GPTConfig(**{**model.config.to_dict(), "vocab_size": foreign.vocab_size})),
                         foreign)
    (src / IMPORTED_FILE).write_text(json.dumps({"source": "hub/model", "format": "hf", "bos_token": None,
                                                  "eos_token": "<|im_start|>", "chat_template": "{{ chatml }}"}))
    final = sft(tiny_config(src, tmp_path / "out", num_steps=2))
    # the tuned model speaks gptlab's format: no import record, prompted natively, exported with our template
    assert not (final / IMPORTED_FILE).exists()
    tuned, tuned_tok = load_model_dir(final)
    sp = tuned_tok.special_id
    assert tuned_tok.chat_template is None
    assert render_for_completion(tuned_tok, CHAT[:1]) == [tuned_tok.eot_id, sp("<|user_start|>"), *tuned_tok.encode("Hi"),
                                                          sp("<|user_end|>"), sp("<|assistant_start|>")]
    export_hf(final, tmp_path / "hf")
    tok_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE and tok_config["eos_token"] == "<|assistant_end|>"
    assert tuned_tok.special_id("<|assistant_end|>") == tok.special_id("<|assistant_end|>")
    assert tuned.config.vocab_size == tok.vocab_size


def test_masked_loss_equals_the_full_head_loss():
    """GPT.masked_loss runs the head at the trained positions only: the loss and every gradient equal
    forward's ignore-index loss over all positions (a float64 model; both compute the softmax in float32,
    as training does, hence the 1e-6 tolerances)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, head_dim=16,
                       intermediate_size=64, max_seq_len=24)
    model = GPT(config).double()
    x = torch.randint(0, 97, (3, 24))
    y = torch.randint(0, 97, (3, 24))
    y[torch.rand(3, 24) < 0.6] = -1
    y[1] = -1  # a row with nothing to train on
    results = []
    for loss_fn in (lambda: model(x, y)[1], lambda: model.masked_loss(x, y)):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (masked, masked_grads) = results
    assert masked == pytest.approx(full, rel=1e-6)
    for a, b in zip(full_grads, masked_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    kept = int((y != -1).sum())
    assert model.masked_loss(x, y, reduction="sum").item() == pytest.approx(full * kept, rel=1e-6)


def test_nan_loss_stops_with_a_diagnostic(small_tokenizer, tmp_path, monkeypatch):
    base = tiny_model_dir(small_tokenizer, tmp_path / "base")
    masked_loss, calls = GPT.masked_loss, {"n": 0}

    def poisoned(self, idx, targets, reduction="mean"):
        loss = masked_loss(self, idx, targets, reduction)
        if reduction == "mean":  # a training step (the held-out loss sums)
            calls["n"] += 1
            if calls["n"] == 3:  # the 3rd training step
                return loss * float("nan")
        return loss

    monkeypatch.setattr(GPT, "masked_loss", poisoned)
    with pytest.raises(GptlabError, match=r"SFT loss became nan .*at step 2 .*last good loss \d+\.\d+.*step_00000002"):
        sft(tiny_config(base, tmp_path / "out", checkpoint_every=2))
