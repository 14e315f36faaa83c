"""DPO: the loss against a hand computation, sequence log-probabilities over completion tokens only (checked
against the engine's independent scorer), a tiny model whose chosen-vs-rejected margin grows, resume
guards, and the CLI with gold accuracy before/after."""

import json
import math
from contextlib import nullcontext

import pytest
import torch

from _preference_models import tiny_model_dir
from gptlab.checkpoint import load_model_dir
from gptlab.cli import main as cli_main
from gptlab.common import GptlabError
from gptlab.train.dpo import DPOConfig, implicit_reward, reference_logprobs, sequence_logprobs, train_dpo
from gptlab.infer.engine import Engine
from gptlab.train.metrics import read_metrics
from gptlab.train.preferences import by_length, collate, default_preferences, encode_sets, parse_preference, row_offsets
from gptlab.reward_model import RewardModel
from gptlab.train.preference_fit import bradley_terry_loss

QUICK = dict(tasks="sentiment,arithmetic", train_prompts=48, val_prompts=16, batch_size=4, num_steps=20, lr=2e-3,
             warmup_steps=2, eval_every=10, checkpoint_every=10, gold_prompts=6, max_new_tokens=8,
             tensorboard=False, progress=False)


@pytest.fixture(scope="module")
def base_dir(small_tokenizer, tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("dpo") / "base", small_tokenizer, seed=1)


def test_dpo_loss_matches_hand_computation():
    beta = 0.1
    policy = torch.tensor([-10.0, -14.0, -9.5, -20.0, -21.0], dtype=torch.float64)
    reference = torch.tensor([-11.0, -13.0, -9.0, -19.0, -22.5], dtype=torch.float64)
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 4]])  # a ranking of 3, then one chosen/rejected pair
    loss, margins = bradley_terry_loss(implicit_reward(policy, reference, beta), pairs, torch.tensor([0, 0, 0, 1]))

    def term(c, r):  # -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
        z = beta * ((policy[c] - reference[c]) - (policy[r] - reference[r])).item()
        return -math.log(1 / (1 + math.exp(-z)))

    expected = 0.5 * ((term(0, 1) + term(0, 2) + term(1, 2)) / 3 + term(3, 4))
    assert loss.dtype == torch.float64 and abs(loss.item() - expected) < 1e-12
    assert abs(margins[0].item() - beta * (1.0 - (-1.0))) < 1e-12


def test_sequence_logprobs_sum_completion_tokens_only(base_dir):
    model, tok = load_model_dir(base_dir)
    sets = encode_sets(tok, [parse_preference({"prompt": "Is 4 even?", "chosen": "Yes, 4 is even.", "rejected": "No."}),
                             parse_preference({"prompt": "Say hi to my friend Bob please.",
                                               "ranked": ["Hi Bob!", "Hello.", "Bye."]})], 192, "test")
    batch = collate(sets, [0, 1], row_offsets(sets), pad_id=0)
    with torch.no_grad():
        got = sequence_logprobs(model, batch.ids, batch.completion_mask)
    prompts, continuations = [], []
    for s in sets:
        for ids, mask in zip(s.ids, s.completion_mask):
            start = mask.index(1)
            assert all(mask[start:])  # plain-text completions: every token after the prompt is trained on
            prompts.append(ids[:start])
            continuations.append(ids[start:])
    expected = [s.logprob for s in Engine(model, tok).score(prompts, continuations)]
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2, 3, 7])
def test_scoring_by_length_groups_equals_one_padded_batch(base_dir, groups):
    """`by_length` (rows sorted by length, each group padded to its own longest row) gives the scores and
    gradients of one call on the whole right-padded batch: float64 model, DPO log-probs and reward model."""
    model, tok = load_model_dir(base_dir, dtype=torch.float64)
    sets = encode_sets(tok, [parse_preference({"prompt": "Is 4 even?", "chosen": "Yes, 4 is even.", "rejected": "No."}),
                             parse_preference({"prompt": "Say hi to my friend Bob please, and be brief about it.",
                                               "ranked": ["Hi Bob!", "Hello there, Bob, my friend's friend.", "Bye."]}),
                             parse_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5, or so I think."})],
                       192, "test")
    batch = collate(sets, [0, 1, 2], row_offsets(sets), pad_id=0)
    lengths = batch.attn_mask.sum(1)
    assert lengths.unique().numel() == len(lengths)  # every row its own length: the groups really differ
    reward_model = RewardModel(model, tok).double()
    torch.nn.init.normal_(reward_model.head.weight)
    weights = torch.linspace(-1, 1, len(lengths), dtype=torch.float64)  # any loss that tells the rows apart
    scorers = {"dpo": lambda ids, _, mask: sequence_logprobs(model, ids, mask),
               "rm": lambda ids, attn_mask, _: reward_model(ids, attn_mask)}
    for name, scorer in scorers.items():
        results = []
        for grouped in (False, True):
            model.zero_grad()
            scores = by_length(scorer, batch, groups) if grouped else scorer(batch.ids, batch.attn_mask,
                                                                             batch.completion_mask)
            (weights * scores).sum().backward()
            results.append((scores.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (whole, whole_grads), (by_groups, group_grads) = results
        assert torch.allclose(by_groups, whole, atol=1e-10), name
        assert len(group_grads) == len(whole_grads) > 0
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(group_grads, whole_grads)), name


def test_dpo_increases_the_chosen_vs_rejected_margin(base_dir, small_tokenizer, tmp_path):
    out = tmp_path / "run"
    final = train_dpo(DPOConfig(model=str(base_dir), out=str(out), **QUICK))
    records = read_metrics(out / "metrics.jsonl")
    train, val = [r for r in records if "train/loss" in r], [r for r in records if "val/loss" in r]
    # the first step's loss is measured before any update: the policy is the reference, every implicit reward 0
    assert abs(train[0]["train/loss"] - math.log(2)) < 1e-5 and abs(train[0]["train/margin"]) < 1e-4
    assert val[-1]["val/margin"] > 0.1 and val[-1]["val/accuracy"] > 0.7
    # the margin measured directly on the training pairs, before and after, from the saved models
    start, _ = load_model_dir(base_dir)
    trained, tok = load_model_dir(final)
    sets = encode_sets(tok, default_preferences(QUICK["tasks"], QUICK["train_prompts"], "train", 0), 192, "train")
    before = reference_logprobs(start, sets, 8, 0, "cpu", nullcontext())
    after = reference_logprobs(trained, sets, 8, 0, "cpu", nullcontext())
    offsets = row_offsets(sets)
    pairs = torch.tensor([(offsets[i] + a, offsets[i] + b) for i, s in enumerate(sets) for a, b in s.pairs])

    def mean_margin(logprobs):
        return (logprobs[pairs[:, 0]] - logprobs[pairs[:, 1]]).mean().item()

    assert mean_margin(after) > mean_margin(before) + 1.0
    summary = json.loads((out / "dpo.json").read_text())
    assert summary["gold_prompts_per_task"] == 3  # 6 gold prompts over the 2 tasks
    assert 0 <= summary["gold_accuracy_before"] <= 1 and 0 <= summary["gold_accuracy_after"] <= 1
    assert summary["held_out_implicit_reward_margin"] == val[-1]["val/margin"]
    # resuming continues from the newest checkpoint: the gold figure before DPO is carried over, not re-measured
    with pytest.raises(GptlabError, match="pass --resume true"):
        train_dpo(DPOConfig(model=str(base_dir), out=str(out), **QUICK))
    resumed = train_dpo(DPOConfig(model=str(base_dir), out=str(out), resume=True, **{**QUICK, "num_steps": 22}))
    assert json.loads((out / "dpo.json").read_text())["gold_accuracy_before"] == summary["gold_accuracy_before"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r][-3:] == [20, 21, 22]
    assert resumed == final


def test_cli_dpo_and_bad_input(base_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["dpo", "--model", str(base_dir), "--out", str(out), "--tasks", "sentiment", "--train-prompts", "8",
                     "--val-prompts", "4", "--num-steps", "2", "--gold-prompts", "0", "--beta", "0.5",
                     "--tensorboard", "false", "--progress", "false"])
    assert code == 0 and (out / "model" / "model.safetensors").is_file()
    assert json.loads((out / "dpo.json").read_text())["config"]["beta"] == 0.5
    capsys.readouterr()
    assert cli_main(["dpo", "--model", str(base_dir), "--out", str(tmp_path / "x"), "--beta", "0"]) == 2
    assert "beta must be positive" in capsys.readouterr().err
    assert cli_main(["dpo", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "model config not found" in capsys.readouterr().err
