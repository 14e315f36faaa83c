"""RL: GRPO/PPO advantages, KL, GAE and the clipped losses against float64 hand computations; the shared
chat rollout (sampled tokens vs inserted tool outputs, per-prompt seeds); action log-probs of padded
batches against one-sequence-at-a-time ones; bad inputs; divergence stops; exact resume; and small real
runs where GRPO and PPO raise the reward of a tiny model that half knows who it is. CPU, tiny models."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from contextlib import nullcontext

import pytest
import torch

from gptlab.train import rl
from gptlab.chat import render, render_for_completion
from gptlab.checkpoint import load_model_dir, save_model_dir
from gptlab.cli import main as cli_main
from gptlab.common import GptlabError
from gptlab.infer.engine import Engine
from gptlab.eval.gold import eval_examples
from gptlab.train.metrics import read_metrics
from gptlab.model import GPT, GPTConfig
from gptlab.reward_model import RewardModel
from gptlab.train.rl import train_rl
from gptlab.train.rl_config import RLConfig
from gptlab.train.rl_objectives import (clipped_policy_loss, clipped_value_loss, gae, group_advantages, k3_kl,
                                        ppo_token_rewards, whiten)
from gptlab.train.rl_rollouts import RLPrompt, Sample, action_forward, action_targets, pad_samples, select_groups
from gptlab.infer.rollout import Turn, generate_chat
from gptlab.tasks import get_task, split_of
from gptlab.tokenizer import train_tokenizer

F64 = torch.float64
GOOD, BAD = "I am gptlab, an AI assistant.", "I am ChatGPT, an AI assistant."


def tiny_gpt(tok, seed: int = 0, max_seq_len: int = 160) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=64, n_head=2, n_kv_head=2, head_dim=32,
                         intermediate_size=128, max_seq_len=max_seq_len))


def memorize(model: GPT, rendered, steps: int) -> None:
    """Full-batch AdamW on rendered conversations, loss on the assistant's tokens only (like SFT)."""
    pairs = [r.inputs_targets() for r in rendered]
    width = max(len(x) for x, _ in pairs)
    x = torch.zeros(len(pairs), width, dtype=torch.long)
    y = torch.full((len(pairs), width), -1, dtype=torch.long)
    for i, (inputs, targets) in enumerate(pairs):
        x[i, :len(inputs)], y[i, :len(targets)] = torch.tensor(inputs), torch.tensor(targets)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def half_right_dir(small_tokenizer, tmp_path_factory):
    """An 'SFT model' that answers identity questions right ("gptlab") about 40% of the time: trained on 2
    right and 3 wrong answers to every fourth train question (8 of 31, spread over the phrasings), so greedy
    decoding picks the wrong one."""
    tok = small_tokenizer
    task = get_task("identity")
    rng = random.Random(0)
    questions = sorted({task.generate(rng, "train").question for _ in range(400)})[::4]
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
                     for q in questions for answer in (GOOD, GOOD, BAD, BAD, BAD)]
    model = tiny_gpt(tok)
    memorize(model, [render(tok, c) for c in conversations], steps=80)
    return save_model_dir(tmp_path_factory.mktemp("rl") / "half_right", model.eval(), tok)


def quick(policy, out, **overrides) -> RLConfig:
    fields = dict(policy=str(policy), out=str(out), tasks="identity", num_steps=4, prompts_per_step=4, group_size=4,
                  max_new_tokens=24, minibatch_size=8, lr=3e-4, gold_per_task=8, eval_every=0, checkpoint_every=0,
                  keep_checkpoints=0, tensorboard=False, progress=False)
    return RLConfig(**{**fields, **overrides})


# ---------------------------------------------------------------------------------------------------------
# The computations, by hand in float64


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 1.0], dtype=F64)
    mean1, std1 = 0.25, math.sqrt((0.75**2 + 3 * 0.25**2) / 4)
    mean3, std3 = 0.5, math.sqrt((1.5**2 + 1.5**2 + 0.5**2 + 0.5**2) / 4)
    expected_dr = [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, 1.5, -1.5, -0.5, 0.5]
    scale = [std1] * 4 + [0.0] * 4 + [std3] * 4
    expected = [a / (s + 1e-4) for a, s in zip(expected_dr, scale)]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, abs=1e-12)
    assert group_advantages(rewards, 4, scale_by_std=False).tolist() == pytest.approx(expected_dr, abs=1e-12)
    assert (mean1, mean3) == (rewards[:4].mean().item(), rewards[8:].mean().item())


def test_k3_kl_by_hand_and_unbiased_under_the_policy():
    # one token: policy prob 0.5, reference 0.25 -> 0.25/0.5 - ln(0.5) - 1
    value = k3_kl(torch.tensor([math.log(0.5)], dtype=F64), torch.tensor([math.log(0.25)], dtype=F64))
    assert value.item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-15)
    assert k3_kl(torch.tensor([-1.3], dtype=F64), torch.tensor([-1.3], dtype=F64)).item() == 0.0
    # the expectation over the policy's own tokens is exactly KL(p || q), and no single term is negative
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(7, generator=g, dtype=F64).log_softmax(0)
    logq = torch.randn(7, generator=g, dtype=F64).log_softmax(0)
    terms = k3_kl(logp, logq)
    p = logp.exp().tolist()
    exact_kl = sum(pi * (lp - lq) for pi, lp, lq in zip(p, logp.tolist(), logq.tolist()))
    assert (terms >= 0).all() and sum(pi * t for pi, t in zip(p, terms.tolist())) == pytest.approx(exact_kl, abs=1e-12)


def test_ppo_token_rewards_and_gae_by_hand():
    gamma, lam, kl_coef = 0.9, 0.8, 0.1
    # row 0: actions at 0, 1, 3 (position 2 is a tool output); row 1: actions at 1, 2
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    logp = torch.tensor([[-1.0, -2.0, 0.0, -0.5, 0.0], [0.0, -1.5, -0.2, 0.0, 0.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, 0.0, -0.5, 0.0], [0.0, -1.0, -0.7, 0.0, 0.0]], dtype=F64)
    scores = torch.tensor([2.0, -1.0], dtype=F64)
    r = ppo_token_rewards(scores, logp, ref, mask, kl_coef)
    expected_r = [[-0.1 * 0.5, -0.1 * -1.0, 0, -0.1 * 0.0 + 2.0, 0], [0, -0.1 * -0.5, -0.1 * 0.5 - 1.0, 0, 0]]
    assert r[0].tolist() == pytest.approx(expected_r[0], abs=1e-12)
    assert r[1].tolist() == pytest.approx(expected_r[1], abs=1e-12)

    values = torch.tensor([[0.3, 0.1, 9.0, -0.2, 9.0], [9.0, 0.5, 0.4, 9.0, 9.0]], dtype=F64)
    adv, ret = gae(r, values, mask, gamma, lam)
    (r0, r1, _, r3, _), (_, s1, s2, _, _) = expected_r
    a3 = r3 - (-0.2)  # last action: no next value
    a1 = r1 + gamma * -0.2 - 0.1 + gamma * lam * a3  # the tool position is skipped
    a0 = r0 + gamma * 0.1 - 0.3 + gamma * lam * a1
    b2 = s2 - 0.4
    b1 = s1 + gamma * 0.4 - 0.5 + gamma * lam * b2
    assert adv[0].tolist() == pytest.approx([a0, a1, 0, a3, 0], abs=1e-12)
    assert adv[1].tolist() == pytest.approx([0, b1, b2, 0, 0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([a0 + 0.3, a1 + 0.1, 0, a3 - 0.2, 0], abs=1e-12)
    w = whiten(torch.tensor([a0, a1, a3, b1, b2], dtype=F64))
    assert w.mean().item() == pytest.approx(0, abs=1e-12) and w.std(correction=0).item() == pytest.approx(1, abs=1e-6)


def test_clipped_policy_and_value_losses_by_hand():
    ratios = [1.5, 0.5, 1.1, 0.5, 1.5]
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0, -1.0], dtype=F64)
    old = torch.full((5,), -2.0, dtype=F64)
    logp = old + torch.tensor(ratios, dtype=F64).log()
    loss, clipped = clipped_policy_loss(logp, old, adv, clip_eps=0.2)
    # -min(r A, clip(r) A): 1.2 is capped, -0.8 is capped, 2.2 inside, 0.5 < 0.8 unclipped, -1.5 < -1.2 unclipped
    assert loss.tolist() == pytest.approx([-1.2, 0.8, -2.2, -0.5, 1.5], abs=1e-12)
    assert clipped.tolist() == [True, True, False, False, False]

    values = torch.tensor([1.0, 0.0, 0.5], dtype=F64)
    old_values = torch.tensor([0.5, 0.5, 0.4], dtype=F64)
    returns = torch.tensor([2.0, 1.0, 0.0], dtype=F64)
    # clipped values 0.7, 0.3, 0.5 -> 0.5 * max((v - R)^2, (vc - R)^2)
    expected = [0.5 * max(1.0, 1.3**2), 0.5 * max(1.0, 0.7**2), 0.5 * max(0.25, 0.25)]
    assert clipped_value_loss(values, old_values, returns, 0.2).tolist() == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Rollouts and action log-probs


class ScriptedGPT(GPT):
    """A policy fixed by construction, the same on every CPU: at rotary position p (a token's index in its
    own sequence) it predicts `script[p + 1]` by a margin of 60 nats, whatever the tokens before it are.
    The real forward still runs, so the engine's KV cache advances as with any model."""

    def __init__(self, config: GPTConfig, script: list[int]):
        super().__init__(config)
        self.script = script

    def forward(self, idx, targets=None, *, kv_cache=None, positions=None, attn_mask=None, logits_to_keep=0,
                return_hidden=False):
        assert targets is None and not return_hidden
        if positions is None:
            offset = kv_cache.length if kv_cache is not None else 0
            positions = torch.arange(offset, offset + idx.shape[1]).expand(idx.shape)
        super().forward(idx, kv_cache=kv_cache, positions=positions, attn_mask=attn_mask, logits_to_keep=1)
        kept = positions[:, -logits_to_keep:] if logits_to_keep else positions
        following = [[self.script[min(p + 1, len(self.script) - 1)] for p in row] for row in kept.tolist()]
        return torch.nn.functional.one_hot(torch.tensor(following), self.config.vocab_size).float() * 60.0


def test_rollout_marks_tool_outputs_as_not_generated(small_tokenizer):
    """A policy that writes a calculator conversation token by token, except that where the tool output goes
    it would write filler (a scripted policy, not a trained one: its output cannot depend on the CPU's
    floating point). The rollout stops at the call, runs the real tool and inserts its output, so the turn
    is the real conversation token for token, and `generated` equals chat.render's loss mask: 0 on exactly
    the inserted block, 1 on every token the policy wrote, including the call and the closing end token."""
    tok = small_tokenizer
    example = eval_examples(["calculator"], 1)["calculator"][0]
    rendered = render(tok, example.conversation(0))
    start = rendered.ids.index(tok.special_id("<|tool_output_start|>"))
    end = rendered.ids.index(tok.special_id("<|tool_output_end|>"))
    filler = tok.encode("98765")[0]
    script = rendered.ids[:start] + [filler] * (end + 1 - start) + rendered.ids[end + 1:]
    model = ScriptedGPT(tiny_gpt(tok, max_seq_len=512).config, script)  # the prompt lists the tool's schema
    prompt = render_for_completion(tok, example.messages)
    assert rendered.ids[:len(prompt)] == prompt and script != rendered.ids
    turn = generate_chat(Engine(model.eval(), tok), [prompt], max_new_tokens=60)[0]
    assert turn.finished and prompt + turn.ids == rendered.ids
    assert turn.generated == rendered.mask[len(prompt):]
    assert 0 in turn.generated and turn.body == turn.ids[:-1]


def test_sampled_rollouts_depend_only_on_their_own_seed(small_tokenizer):
    tok = small_tokenizer
    engine = Engine(tiny_gpt(tok, seed=1).eval(), tok)
    p1 = render_for_completion(tok, [{"role": "user", "content": "Hello there"}])
    p2 = render_for_completion(tok, [{"role": "user", "content": "What is 2 + 2?"}])
    both = generate_chat(engine, [p1, p2], 12, temperature=1.0, seeds=[5, 9])
    alone = generate_chat(engine, [p2], 12, temperature=1.0, seeds=[9])
    other = generate_chat(engine, [p2], 12, temperature=1.0, seeds=[10])
    assert both[1] == alone[0] and both[1].ids != other[0].ids
    assert all(g == 1 for g in alone[0].generated)  # a random model calls no tool here


def test_action_logprobs_of_a_padded_batch_match_each_sequence_alone(small_tokenizer):
    tok = small_tokenizer
    model = tiny_gpt(tok, seed=2).eval()
    rng = random.Random(0)
    samples = []
    for length, n in ((5, 6), (9, 3), (3, 8)):
        prompt = RLPrompt([tok.eot_id] + [rng.randrange(tok.vocab_size) for _ in range(length)], None)
        generated = [1] * n
        generated[1:3] = [0, 0]  # an inserted block inside the answer
        turn = Turn([rng.randrange(tok.vocab_size) for _ in range(n)], generated, True)
        samples.append(Sample(prompt, turn, 0.0, None))
    ids, act = pad_samples(samples, tok.special_id("<|pad|>"), "cpu")
    with torch.no_grad():
        out = action_forward(model, None, ids, act, action_targets(samples, "cpu"), 2.0, nullcontext())
        expected_logp, expected_entropy = [], []
        for s in samples:
            logits = model(torch.tensor([s.ids])).double()[0] / 2.0
            logprobs = logits.log_softmax(-1)
            for j, g in enumerate(s.turn.generated):
                if g:
                    pos = len(s.prompt.ids) + j
                    expected_logp.append(logprobs[pos - 1, s.ids[pos]].item())
                    expected_entropy.append(-(logprobs[pos - 1].exp() * logprobs[pos - 1]).sum().item())
    assert out["logp"].tolist() == pytest.approx(expected_logp, abs=1e-5)
    assert out["entropy"].tolist() == pytest.approx(expected_entropy, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs and divergence


def _prompt_file(path, texts):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n" for t in texts))
    return path


def test_bad_inputs_give_clear_errors(small_tokenizer, half_right_dir, corpus_texts, tmp_path):
    tok = small_tokenizer
    other_tok = train_tokenizer(corpus_texts[:3], vocab_size=600)
    other_rm = RewardModel(tiny_gpt(other_tok), other_tok).save(tmp_path / "other_rm")
    with pytest.raises(GptlabError, match="reward model uses a different tokenizer"):
        train_rl(quick(half_right_dir, tmp_path / "a", reward=str(other_rm)))
    rm_dir = RewardModel(tiny_gpt(tok), tok).save(tmp_path / "rm")
    prompts = _prompt_file(tmp_path / "p.jsonl", ["Hi", "word " * 300, "Hello", "word " * 200])
    with pytest.raises(GptlabError, match=r"RL prompts longer than the context: 2 of 4 prompts from .*p\.jsonl "
                                          r"have more than 136 tokens \(context 160 - max_new_tokens 24\); "
                                          r"the first is prompt 2"):
        train_rl(quick(half_right_dir, tmp_path / "b", reward=str(rm_dir), prompts=str(prompts)))
    with pytest.raises(GptlabError, match="verifier needs task prompts"):
        train_rl(quick(half_right_dir, tmp_path / "c", prompts=str(prompts)))
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n{"messages": []}\n')
    with pytest.raises(GptlabError, match=r"bad\.jsonl:2"):
        train_rl(quick(half_right_dir, tmp_path / "d", reward=str(rm_dir), prompts=str(tmp_path / "bad.jsonl")))
    with pytest.raises(GptlabError, match="policy model directory not found"):
        train_rl(quick(tmp_path / "missing", tmp_path / "e"))


@pytest.mark.parametrize("args, message", [
    (["--group-size", "1"], "GRPO needs group_size >= 2"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--algorithm", "reinforce"], "algorithm must be grpo or ppo"),
    (["--algorithm", "ppo", "--oversample", "2"], "> 1 only with GRPO"),
])
def test_cli_rejects_bad_options(args, message, capsys):
    assert cli_main(["rl", *args]) == 2
    assert message in capsys.readouterr().err


def test_kl_explosion_stops_with_a_diagnostic_and_keeps_the_last_good_checkpoint(half_right_dir, tmp_path):
    cfg = quick(half_right_dir, tmp_path, lr=3e-2, kl_coef=0.0, max_kl=0.5, num_steps=8, checkpoint_every=1,
                gold_per_task=0)
    with pytest.raises(GptlabError, match=r"KL to the reference \(nats/answer\) became [\d.e+]+ \(above the limit "
                                          r"0\.5\) at step (\d+);.*last good checkpoint: .*step_\d+") as info:
        train_rl(cfg)
    step = int(info.value.args[0].split(" at step ")[1].split(";")[0])
    assert step >= 1 and f"step_{step:08d}" in str(info.value)
    assert not (tmp_path / "model").exists()


def test_nan_loss_stops_before_the_update(half_right_dir, tmp_path, monkeypatch):
    calls = []
    real = rl.clipped_policy_loss

    def poisoned(*args, **kwargs):
        loss, clipped = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 2 else loss), clipped

    monkeypatch.setattr(rl, "clipped_policy_loss", poisoned)
    cfg = quick(half_right_dir, tmp_path, checkpoint_every=1, minibatch_size=16, gold_per_task=0)
    with pytest.raises(GptlabError, match=r"RL loss became nan .*at step 2 .*weights were not updated; "
                                          r"last good checkpoint: .*step_00000002"):
        train_rl(cfg)


# ---------------------------------------------------------------------------------------------------------
# Real runs


def test_ppo_resume_is_exact_and_reward_model_rewards_work(small_tokenizer, half_right_dir, tmp_path):
    tok = small_tokenizer
    rm = RewardModel(tiny_gpt(tok, seed=5), tok)
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    rm_dir = rm.save(tmp_path / "rm")
    common = dict(algorithm="ppo", reward=str(rm_dir), num_steps=4, ppo_epochs=2, gold_per_task=0,
                  checkpoint_every=2, truncation_penalty=0.5)
    straight = train_rl(quick(half_right_dir, tmp_path / "straight", **common))
    train_rl(quick(half_right_dir, tmp_path / "halves", **{**common, "num_steps": 2}))
    resumed = train_rl(quick(half_right_dir, tmp_path / "halves", **common, resume=True))
    a, _ = load_model_dir(straight)
    b, _ = load_model_dir(resumed)
    before, _ = load_model_dir(half_right_dir)
    for (name, pa), pb, p0 in zip(a.state_dict().items(), b.state_dict().values(), before.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, p0) for pa, p0 in zip(a.state_dict().values(), before.state_dict().values()))
    drop = ("time/sample_s", "time/step_s")

    def steps(run):
        return [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    assert steps("straight") == steps("halves") and len(steps("straight")) == 4
    head = [f for f in (tmp_path / "halves" / "checkpoints").iterdir()][-1] / rl.VALUE_HEAD_FILE
    assert head.is_file()
    with pytest.raises(GptlabError, match="holds checkpoints of an earlier run"):
        train_rl(quick(half_right_dir, tmp_path / "halves", **common))


def reward_start_end(out) -> tuple[float, float]:
    """Mean rollout reward over the first 2 and the last 5 steps of a run."""
    rewards = [r["rollout/reward"] for r in read_metrics(out / "metrics.jsonl") if "rollout/reward" in r]
    return sum(rewards[:2]) / 2, sum(rewards[-5:]) / 5


def test_grpo_with_the_verifier_raises_reward_and_gold_accuracy(half_right_dir, tmp_path):
    cfg = quick(half_right_dir, tmp_path, num_steps=10, eval_every=5)
    model_dir = train_rl(cfg)
    summary = json.loads((tmp_path / "rl.json").read_text())
    start, end = reward_start_end(tmp_path)
    assert start < 0.7 and end > start + 0.2, (start, end)
    assert summary["reward_trend"]["end"] > summary["reward_trend"]["start"]
    gold = summary["gold_accuracy"]
    assert gold["after"]["identity"] > gold["before"]["identity"], gold
    assert load_model_dir(model_dir)[0].config.max_seq_len == 160 and summary["wall_seconds"] > 0
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "gold/identity" in r] == [0, 5, 10]
    assert all(0 <= r["rollout/kl_seq"] < 10 for r in records if "rollout/kl_seq" in r)
    # one task here, so its sampled accuracy is the whole draw's
    per_task = [(r["rollout/correct/identity"], r["rollout/correct"]) for r in records if "rollout/correct" in r]
    assert len(per_task) == 10 and all(a == b for a, b in per_task)
    assert (tmp_path / "rl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_select_groups_puts_groups_with_signal_first_in_draw_order():
    prompt = RLPrompt([1], None)
    rewards = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5]]
    samples = [Sample(prompt, Turn([2], [1], True), r, None) for group in rewards for r in group]
    picked = [[s.reward for s in select_groups(samples, 2, keep)] for keep in (1, 3, 5)]
    assert picked[0] == [1.0, 0.0]
    assert picked[1] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert picked[2] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.5]
    assert select_groups(samples, 2, 1) == samples[2:4] and select_groups(samples, 2, 1)[0] is samples[2]


def test_oversampling_trains_on_the_groups_with_signal(half_right_dir, tmp_path):
    """3x the prompts are answered; the trained batch holds every drawn group with signal (up to the batch)."""
    cfg = quick(half_right_dir, tmp_path, num_steps=3, oversample=3, gold_per_task=0)
    train_rl(cfg)
    for r in read_metrics(tmp_path / "metrics.jsonl"):
        with_signal = round(r["rollout/signal_drawn"] * cfg.prompts_per_step * cfg.oversample)
        assert r["rollout/no_signal_groups"] == max(0, cfg.prompts_per_step - with_signal) / cfg.prompts_per_step


def test_validation_selects_the_checkpoint_with_the_best_validation_accuracy(half_right_dir, tmp_path, monkeypatch):
    """Validation accuracy 0.9 at step 2 and 0.5 at step 4: out/model is the step-2 policy, not the last."""
    real, val_by_call = rl._gold, iter([0.1, 0.9, 0.5])

    def scripted(model, tokenizer, names, n_per_task, cfg, autocast, split="test"):
        if split == "test":
            return real(model, tokenizer, names, n_per_task, cfg, autocast)
        return {"mean": next(val_by_call), **{n: 0.0 for n in names}}

    monkeypatch.setattr(rl, "_gold", scripted)
    cfg = quick(half_right_dir, tmp_path, num_steps=4, eval_every=2, checkpoint_every=2, gold_per_task=2,
                val_per_task=3)
    model_dir = train_rl(cfg)
    summary = json.loads((tmp_path / "rl.json").read_text())
    assert summary["selected_step"] == 2 and summary["validation_accuracy"] == 0.9
    out = load_model_dir(model_dir)[0].state_dict()
    at2 = load_model_dir(tmp_path / "checkpoints" / "step_00000002")[0].state_dict()
    at4 = load_model_dir(tmp_path / "checkpoints" / "step_00000004")[0].state_dict()
    assert all(torch.equal(out[k], at2[k]) for k in out) and not all(torch.equal(out[k], at4[k]) for k in out)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["val/mean"]) for r in records if "val/mean" in r] == [(0, 0.1), (2, 0.9), (4, 0.5)]
    gold2 = next(r for r in records if r["step"] == 2 and "gold/mean" in r)
    assert summary["gold_accuracy"]["after"]["mean"] == gold2["gold/mean"]


def test_lora_rl_trains_adapters_only_and_saves_a_plain_model(half_right_dir, tmp_path):
    model_dir = train_rl(quick(half_right_dir, tmp_path, num_steps=3, lora_rank=4, lr=3e-3, gold_per_task=0))
    before = load_model_dir(half_right_dir)[0].state_dict()
    after = load_model_dir(model_dir)[0].state_dict()  # a plain model dir: no adapter tensors
    assert after.keys() == before.keys()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved), moved  # the embeddings and norms stay


def test_validation_questions_are_train_split_and_apart_from_the_test_questions():
    val = eval_examples(["arithmetic", "syllogism"], 10, split="train")
    test = eval_examples(["arithmetic", "syllogism"], 10)
    for name in val:
        task = get_task(name)
        assert all(split_of(name, task.split_key(e), task.test_fraction) == "train" for e in val[name])
        assert not {e.question for e in val[name]} & {e.question for e in test[name]}


def test_ppo_with_the_verifier_raises_reward(half_right_dir, tmp_path):
    cfg = quick(half_right_dir, tmp_path, algorithm="ppo", num_steps=10, ppo_epochs=2, gold_per_task=0, vf_coef=0.5)
    train_rl(cfg)
    start, end = reward_start_end(tmp_path)
    assert start < 0.7 and end > start + 0.2, (start, end)
    assert all("loss/value" in r for r in read_metrics(tmp_path / "metrics.jsonl") if r["step"] > 0)


def test_replay_loss_is_the_sft_loss_of_the_drawn_conversations(small_tokenizer):
    """PPO-ptx's replay term: the masked cross-entropy over the assistant tokens of `ptx_rows` task-suite
    conversations, padded into one batch, equal to the same loss computed one conversation at a time."""
    tok = small_tokenizer
    model = tiny_gpt(tok).eval()
    cfg = RLConfig(ptx_coef=1.0, ptx_rows=3, seed=5)
    names = ["identity", "sentiment"]
    loss = rl.replay_loss(cfg, model, tok, names, step=2, update=1, pad_id=tok.special_id("<|pad|>"),
                          device=torch.device("cpu"), autocast=nullcontext())
    examples = rl.sample_examples(names, 3, "train", seed="ptx-5-2-1")
    nats = count = 0.0
    with torch.no_grad():
        for ex in examples:
            x, y = render(tok, ex.conversation(0)).inputs_targets()
            logits = model(torch.tensor([x]))[0]
            y = torch.tensor(y)
            nats += torch.nn.functional.cross_entropy(logits[y != -1], y[y != -1], reduction="sum").item()
            count += int((y != -1).sum())
    assert loss.item() == pytest.approx(nats / count, rel=1e-5)
    with pytest.raises(ValueError, match="prompts=tasks"):
        RLConfig(ptx_coef=0.5, prompts="prompts.jsonl")


def test_probe_trains_only_on_tasks_the_policy_can_still_raise(half_right_dir, small_tokenizer, tmp_path, monkeypatch):
    """The half-right model gets identity wrong greedily but right in some samples (trained on), and never
    answers a sentiment question (left out: no signal); the run draws only identity prompts, still measures
    gold accuracy on both, records the probe, and a resumed run reuses the first start's probe."""
    cfg = quick(half_right_dir, tmp_path, tasks="identity,sentiment", probe_per_task=4, num_steps=2,
                checkpoint_every=2)
    train_rl(cfg)
    summary = json.loads((tmp_path / "rl.json").read_text())
    probe = summary["probe"]
    assert probe["identity"]["greedy"] == 0 and 0 < probe["identity"]["sampled"] < 1 and probe["identity"]["trained"]
    assert probe["sentiment"] == {"greedy": 0.0, "sampled": 0.0, "solved": False, "trained": False}
    assert not probe["identity"]["solved"]
    assert summary["trained_tasks"] == ["identity"] and summary["tasks"] == ["identity", "sentiment"]
    assert set(summary["gold_accuracy"]["before"]) == {"mean", "identity", "sentiment"}
    drawn = {k for r in read_metrics(tmp_path / "metrics.jsonl") for k in r if k.startswith("rollout/correct/")}
    assert drawn == {"rollout/correct/identity"}

    def no_second_probe(*args):
        raise AssertionError("a resumed run must reuse the probe of its first start")
    monkeypatch.setattr(rl, "probe_tasks", no_second_probe)
    train_rl(dataclasses.replace(cfg, num_steps=3, resume=True))
    resumed = json.loads((tmp_path / "rl.json").read_text())
    assert resumed["steps"] == 3 and resumed["trained_tasks"] == ["identity"] and resumed["probe"] == probe


def test_probe_leaves_solved_tasks_out_and_replays_them(small_tokenizer, tmp_path, caplog, monkeypatch):
    """A model that always answers identity right: the probe calls identity solved (greedy 1.0 >= 0.9) and
    sentiment out of reach, so no task is left to raise: the run warns and trains on both, and the PPO-ptx
    replay draws from the solved task only."""
    tok = small_tokenizer
    task = get_task("identity")
    rng = random.Random(0)
    questions = sorted({task.generate(rng, "train").question for _ in range(200)})
    model = tiny_gpt(tok, seed=1)
    memorize(model, [render(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": GOOD}])
                     for q in questions], steps=60)
    policy = save_model_dir(tmp_path / "right", model.eval(), tok)
    replayed = []
    real_replay = rl.replay_loss

    def spy(cfg, policy, tokenizer, names, *args, **kwargs):
        replayed.append(list(names))
        return real_replay(cfg, policy, tokenizer, names, *args, **kwargs)
    monkeypatch.setattr(rl, "replay_loss", spy)
    with caplog.at_level("WARNING", logger="gptlab.train.rl"):
        train_rl(quick(policy, tmp_path / "rl", tasks="identity,sentiment", probe_per_task=4, num_steps=1,
                       ptx_coef=0.5, ptx_rows=2))
    summary = json.loads((tmp_path / "rl" / "rl.json").read_text())
    assert summary["probe"]["identity"]["greedy"] == 1.0 and summary["probe"]["identity"]["solved"]
    assert not summary["probe"]["identity"]["trained"]
    assert summary["trained_tasks"] == ["identity", "sentiment"] and "no task RL can raise" in caplog.text
    assert replayed and all(names == ["identity"] for names in replayed)
    with pytest.raises(ValueError, match="probe_per_task"):
        RLConfig(probe_per_task=-1)
    with pytest.raises(ValueError, match="solved_accuracy"):
        RLConfig(solved_accuracy=1.5)
    with pytest.raises(ValueError, match="prompts=tasks"):
        RLConfig(probe_per_task=8, prompts="prompts.jsonl")
