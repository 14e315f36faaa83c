"""Reward model: the Bradley-Terry loss against a hand computation, the readout at the last real token
whatever the padding, training on generated task preferences (loss falls, held-out accuracy above chance),
exact resume, save/load, the CLI, and the tokenizer checks."""

import json
import math
import shutil

import pytest
import torch

from _preference_models import tiny_model_dir
from gptlab.train import preference_fit
from gptlab.chat import render
from gptlab.checkpoint import CHECKSUMS, load_model_dir
from gptlab.cli import main as cli_main
from gptlab.common import GptlabError
from gptlab.train.metrics import read_metrics
from gptlab.train.preferences import PreferenceSet, default_preferences
from gptlab.reward_model import RewardModel
from gptlab.train.loop import batch_indices
from gptlab.train.preference_fit import bradley_terry_loss
from gptlab.train.reward import RewardConfig, train_reward_model
from gptlab.tokenizer import train_tokenizer

QUICK = dict(tasks="sentiment,arithmetic", train_prompts=64, val_prompts=24, batch_size=4, num_steps=24, lr=2e-3,
             warmup_steps=2, eval_every=12, checkpoint_every=12, tensorboard=False, progress=False)


@pytest.fixture(scope="module")
def base_dir(small_tokenizer, tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("rm") / "base", small_tokenizer)


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "run"
    return out, train_reward_model(RewardConfig(model=str(base_dir), out=str(out), **QUICK))


def test_bradley_terry_loss_matches_hand_computation():
    scores = torch.tensor([1.0, 0.2, -0.5, 0.3, 0.9], dtype=torch.float64)
    # set 0: a ranking of three (3 pairs); set 1: one pair where the worse completion scores higher
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 4]])
    pair_set = torch.tensor([0, 0, 0, 1])
    loss, margins = bradley_terry_loss(scores, pairs, pair_set)

    def nll(d):  # -log sigmoid(d)
        return math.log1p(math.exp(-d))

    expected = 0.5 * ((nll(0.8) + nll(1.5) + nll(0.7)) / 3 + nll(-0.6))
    assert loss.dtype == torch.float64 and abs(loss.item() - expected) < 1e-12
    assert torch.allclose(margins, torch.tensor([0.8, 1.5, 0.7, -0.6], dtype=torch.float64))


def test_readout_is_the_last_real_token_whatever_the_padding(base_dir):
    gpt, tok = load_model_dir(base_dir)
    rm = RewardModel(gpt, tok)
    torch.manual_seed(1)
    torch.nn.init.normal_(rm.head.weight)
    convs = [[{"role": "user", "content": "Is it good?"}, {"role": "assistant", "content": "Yes."}],
             [{"role": "user", "content": "What is 3 + 4 + 10?"},
              {"role": "assistant", "content": "It is 17, clearly."}]]
    seqs = [render(tok, c).ids for c in convs]
    assert all(s[-1] == tok.special_id("<|assistant_end|>") for s in seqs)
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([s]))[0] for s in seqs])
        # the readout is the head on the final hidden state of the last token
        manual = torch.stack([rm.head(gpt(torch.tensor([s]), return_hidden=True)[0, -1])[0] for s in seqs])
        assert torch.allclose(alone, manual, atol=1e-6)
        width = max(map(len, seqs)) + 3
        for side in ("right", "left"):
            ids = torch.full((2, width), 7)  # an ordinary token as padding: only the mask may hide it
            mask = torch.zeros(2, width, dtype=torch.bool)
            for r, s in enumerate(seqs):
                where = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
                ids[r, where], mask[r, where] = torch.tensor(s), True
            assert torch.allclose(rm(ids, mask), alone, atol=1e-5), side
        assert torch.allclose(rm.score(convs), alone, atol=1e-5)
        # the score reads the answer: a different last answer token changes it
        changed = seqs[0][:-2] + [100 if seqs[0][-2] != 100 else 101, seqs[0][-1]]
        assert abs(rm(torch.tensor([changed]))[0] - alone[0]) > 1e-4


def test_training_lowers_loss_and_beats_chance_on_held_out_preferences(trained):
    out, final = trained
    records = read_metrics(out / "metrics.jsonl")
    train, val = [r for r in records if "train/loss" in r], [r for r in records if "val/loss" in r]
    # the first step's loss is measured before any update: a zero head scores every completion 0
    assert train[0]["step"] == 1 and abs(train[0]["train/loss"] - math.log(2)) < 1e-6
    assert train[0]["train/accuracy"] == 0.5  # all ties
    assert val[-1]["step"] == QUICK["num_steps"] and val[-1]["val/loss"] < math.log(2) - 0.1
    assert val[-1]["val/accuracy"] > 0.7  # chance is 0.5 (held-out = the tasks' test split)
    meta = json.loads((final / "reward.json").read_text())
    assert meta["held_out_pairwise_accuracy"] == val[-1]["val/accuracy"]
    # the bias centres the best-ranked held-out completions on 0 (the loss cannot see it)
    rm = RewardModel.load(final)
    best = [p.prompt + c for p in default_preferences(QUICK["tasks"], QUICK["val_prompts"], "test", 0)
            for c in p.tiers[0]]
    assert abs(rm.score(best).mean().item()) < 1e-4


def test_save_load_round_trip_and_tokenizer_checks(trained, base_dir, small_tokenizer, corpus_texts, tmp_path):
    _, final = trained
    rm = RewardModel.load(final)
    conv = [[{"role": "user", "content": "Is the review positive? Loved it."},
             {"role": "assistant", "content": "Positive."}]]
    copy = tmp_path / "copy"
    rm.save(copy)
    assert torch.equal(RewardModel.load(copy).score(conv), rm.score(conv))
    rm.check_policy(small_tokenizer)  # the same tokenizer passes
    other = train_tokenizer(corpus_texts[:3], vocab_size=600)
    with pytest.raises(GptlabError, match="reward model uses a different tokenizer"):
        rm.check_policy(other)
    meta = json.loads((copy / "reward.json").read_text())
    (copy / "reward.json").write_text(json.dumps({**meta, "tokenizer_sha256": other.sha256}))
    with pytest.raises(GptlabError, match=r"reward\.json is corrupt"):  # the directory's SHA256SUMS covers it
        RewardModel.load(copy)
    (copy / CHECKSUMS).unlink()  # a directory without checksums: the tokenizer check still guards it
    with pytest.raises(GptlabError, match="different tokenizer"):
        RewardModel.load(copy)
    with pytest.raises(GptlabError, match="reward model metadata"):
        RewardModel.load(base_dir)  # a plain model directory has no head


def test_resume_reproduces_an_uninterrupted_run(trained, base_dir, tmp_path):
    """Straight run (the fixture) vs a run cut after its step-12 checkpoint and resumed."""
    out, final = trained
    cut = tmp_path / "cut"
    shutil.copytree(out / "checkpoints" / "step_00000012", cut / "checkpoints" / "step_00000012")
    with pytest.raises(GptlabError, match="pass --resume true"):
        train_reward_model(RewardConfig(model=str(base_dir), out=str(cut), **QUICK))
    resumed = train_reward_model(RewardConfig(model=str(base_dir), out=str(cut), resume=True, **QUICK))
    a, b = RewardModel.load(final), RewardModel.load(resumed)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_batch_order_is_a_function_of_the_step():
    epoch = [i for step in range(5) for i in batch_indices(step, 4, 20, seed=3)]
    assert sorted(epoch) == list(range(20))  # each set once per epoch
    assert batch_indices(6, 4, 20, seed=3) == batch_indices(6, 4, 20, seed=3) != batch_indices(6, 4, 20, seed=4)
    # a batch that straddles two epochs ends epoch 0 and starts epoch 1 exactly where smaller batches would
    three = [batch_indices(step, 8, 20, seed=0) for step in range(3)]
    assert sorted(three[0] + three[1] + three[2][:4]) == list(range(20))
    assert three[2][4:] == batch_indices(5, 4, 20, seed=0)


def test_cli_trains_from_a_jsonl_file_and_reports_bad_input(base_dir, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Is {n} even?", "chosen": f"{'Yes' if n % 2 == 0 else 'No'}, {n} is "
             f"{'even' if n % 2 == 0 else 'odd'}.", "rejected": "I cannot answer that question."} for n in range(20)]
    rows.append({"prompt": "Rank these.", "ranked": ["First.", "Second.", "Third.", "Fourth."]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cli"
    code = cli_main(["rm", "--model", str(base_dir), "--out", str(out), "--data", str(data), "--num-steps", "3",
                     "--batch-size", "4", "--eval-every", "0", "--tensorboard", "false", "--progress", "false"])
    assert code == 0 and (out / "model" / "reward_head.safetensors").is_file()
    assert capsys.readouterr().out.strip() == str(out / "model")
    data.write_text(data.read_text() + json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}) + "\n")
    code = cli_main(["rm", "--model", str(base_dir), "--out", str(tmp_path / "cli2"), "--data", str(data)])
    assert code == 2
    assert f"error: {data}:22: chosen and rejected are the same completion" in capsys.readouterr().err


def test_policy_samples_join_the_training_data(base_dir, monkeypatch):
    gpt, tok = load_model_dir(base_dir)
    calls = []

    def fake_sampled(policy, tokenizer, examples, k, temperature, max_new_tokens, seed):
        calls.append((policy, len(examples), k, temperature, max_new_tokens))
        return [PreferenceSet(examples[0].messages, [[[{"role": "assistant", "content": examples[0].answer_text}]],
                                                     [[{"role": "assistant", "content": "no"}]]])]

    monkeypatch.setattr(preference_fit, "sampled_preferences", fake_sampled)
    cfg = RewardConfig(tasks="arithmetic", train_prompts=5, val_prompts=3, policy_samples=4, sample_prompts=7,
                       sample_temperature=0.8, max_new_tokens=12)
    train, val = preference_fit.load_preference_data(cfg, gpt, tok)
    assert calls == [(gpt, 7, 4, 0.8, 12)]
    assert len(train) == 6 and len(val) == 3 and train[-1].tiers[1] == [[{"role": "assistant", "content": "no"}]]
