"""Evaluation: log-likelihood choice scoring against a float64 hand computation, models trained for a few
seconds to prefer known continuations and answers (so greedy generation, tool calls and the checkers are
exercised end to end without stubs), the exact few-shot and fake-assistant prompts, accuracy accounting,
bits per byte, the report files and the CLI's errors. Data: tokenizers trained on Python stdlib source."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from _pretrain_data import make_dataset

from gptlab.chat import render, render_for_completion, response_text
from gptlab.checkpoint import save_model_dir
from gptlab.cli import main as cli_main
from gptlab.common import GptlabError
from gptlab.data.loader import PackedLoader
from gptlab.infer.engine import Engine
from gptlab.eval.choice import choice_credit, load_choice_items, multiple_choice_accuracy, parse_choice_item, score_choices
from gptlab.eval.gold import (
    ASSISTANT_HEADER,
    STYLES,
    chat_messages,
    draw_shots,
    eval_examples,
    gold_accuracy,
    pairwise_accuracy,
    preference_pairs,
    shot_answer,
)
from gptlab.eval.loss import val_bits_per_byte
from gptlab.eval.report import evaluate_model, write_report
from gptlab.model import GPT, GPTConfig
from gptlab.tasks import get_task
from gptlab.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(data dir, tokenizer) of a small prepared dataset (stdlib source, 400-token vocabulary)."""
    root = tmp_path_factory.mktemp("evaldata")
    data_dir = make_dataset(root, vocab_size=400)
    return data_dir, Tokenizer.load(root / "tokenizer.json")


@pytest.fixture(scope="module")
def tok(dataset):
    return dataset[1]


def tiny_gpt(tok, seed: int = 0, max_seq_len: int = 256) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=64, n_head=2, n_kv_head=2, head_dim=32,
                         intermediate_size=128, max_seq_len=max_seq_len))


def memorize(model: GPT, sequences: list[list[int]] | list[tuple[list[int], list[int]]], steps: int = 150) -> float:
    """Train on token sequences, or (inputs, targets) pairs with -1 on untrained targets, as one padded
    full batch with AdamW, so that they are memorized; returns the final loss."""
    pairs = [s if isinstance(s, tuple) else (s[:-1], s[1:]) for s in sequences]
    width = max(len(inputs) for inputs, _ in pairs)
    x = torch.zeros(len(pairs), width, dtype=torch.long)
    y = torch.full((len(pairs), width), -1, dtype=torch.long)
    for r, (inputs, targets) in enumerate(pairs):
        x[r, :len(inputs)] = torch.tensor(inputs)
        y[r, :len(targets)] = torch.tensor(targets)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


# ---------------------------------------------------------------------------------------------------------
# Multiple choice


def test_parse_choice_item_moves_space_into_continuation():
    item = parse_choice_item("The keys to the cabinet {are|is} on the table.", "grammar")
    assert item.prompt == "The keys to the cabinet"
    assert item.continuations == (" are on the table.", " is on the table.")
    assert item.answer == 0
    arithmetic = parse_choice_item("2 + 3 = {5|6|7}", "arithmetic")
    assert arithmetic.prompt == "2 + 3 =" and arithmetic.continuations == (" 5", " 6", " 7")
    sentiment = parse_choice_item("Review: Dull.\nSentiment: {negative|positive}", "sentiment")
    assert sentiment.prompt == "Review: Dull.\nSentiment:" and sentiment.continuations[0] == " negative"
    for bad in ["no braces here", "{a|b} and {c|d}", "one {choice} only", "empty {a|}", "same {a|a}"]:
        with pytest.raises(GptlabError, match="choice item"):
            parse_choice_item(bad, "x")


def test_embedded_choice_table_covers_the_categories():
    items = load_choice_items()
    counts = {}
    for item in items:
        counts[item.category] = counts.get(item.category, 0) + 1
    assert set(counts) == {"grammar", "lexical_semantics", "world_knowledge", "sentiment", "translation",
                           "arithmetic"}
    assert all(20 <= n <= 40 for n in counts.values()), counts
    assert len({item.text for item in items}) == len(items)  # no duplicated item
    with pytest.raises(GptlabError, match="unknown choice categories"):
        load_choice_items(categories=["grammar", "astrology"])


def test_choice_credit_counts_ties_as_random_tie_break():
    assert choice_credit([-1.0, -2.0], 0) == 1.0
    assert choice_credit([-2.0, -1.0], 0) == 0.0
    assert choice_credit([-1.0, -1.0], 0) == 0.5
    assert choice_credit([-3.0, -3.0, -3.0], 1) == pytest.approx(1 / 3)
    assert choice_credit([-3.0, -3.0, -1.0], 0) == 0.0


def test_choice_scores_match_float64_computation(tok):
    model = tiny_gpt(tok, seed=1)
    with torch.no_grad():  # larger weights than the init, so log-probs differ clearly between alternatives
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
    items = load_choice_items(categories=["grammar", "sentiment"])[::7] + [parse_choice_item("3 * 3 = {9|6|33}", "a")]
    scored = score_choices(Engine(model, tok), items, batch_size=3)  # several batches of unequal lengths
    reference = GPT(model.config).double()
    reference.load_state_dict(model.state_dict())
    for item, row in zip(items, scored):
        expected = []
        for continuation in item.continuations:
            prompt_ids = [tok.eot_id, *tok.encode(item.prompt)]
            cont_ids = tok.encode(continuation)
            ids = torch.tensor([prompt_ids + cont_ids])
            with torch.no_grad():
                logprobs = F.log_softmax(reference(ids)[0], dim=-1)
            expected.append(sum(logprobs[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(cont_ids)))
        assert row["logprobs"] == pytest.approx(expected, abs=2e-4)
        assert row["bytes"] == [len(c.encode()) for c in item.continuations]
    assert len({round(lp, 3) for row in scored for lp in row["logprobs"]}) > len(scored)  # not degenerate


def test_uniform_model_scores_exactly_the_token_count_baselines(tok):
    """With all weights zero every token costs ln V, so accuracy must equal the fewest-tokens baseline."""
    model = tiny_gpt(tok)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = multiple_choice_accuracy(model, tok, batch_size=64)
    assert len(result["items"]) == len(load_choice_items())
    for row in result["items"]:
        assert row["tokens"] == [len(tok.encode(c)) for c in parse_choice_item(row["text"], "x").continuations]
        assert (row["credit"], row["credit_norm"]) == (row["baseline"], row["baseline_norm"])
    overall = result["overall"]
    assert overall["accuracy"] == overall["baseline"] and overall["accuracy_norm"] == overall["baseline_norm"]
    assert overall["chance"] == 0.5 and overall["baseline"] != 0.5  # the table is not token-count neutral


def test_trained_model_picks_the_sentence_it_saw(tok):
    model = tiny_gpt(tok)
    sentences = ["The keys to the cabinet are on the table.", "The French word for cat is chat."]
    sequences = [[tok.eot_id, *tok.encode(s)] for s in sentences]
    # both open with "The ": the token after it is a 50/50 guess even for a perfect memorizer, so the mean loss
    # cannot go below 2 ln 2 over all targets (0.033 here). 50 steps got within 0.004 of that floor (a former
    # `< 0.05` bar left 0.013 of margin, 0.051 was seen with another tokenizer); 150 get within 0.001
    floor = 2 * math.log(2) / sum(len(s) - 1 for s in sequences)
    assert floor < memorize(model, sequences, steps=150) < floor + 0.01
    items = [parse_choice_item("The keys to the cabinet {are|is} on the table.", "grammar"),
             parse_choice_item("The keys to the cabinet {is|are} on the table.", "grammar"),  # wrong answer first
             parse_choice_item("The French word for cat is {chat|chien}.", "translation")]
    result = multiple_choice_accuracy(model, tok, items)
    assert [row["credit"] for row in result["items"]] == [1.0, 0.0, 1.0]
    assert result["categories"]["grammar"]["accuracy"] == 0.5
    translation = result["categories"]["translation"]
    assert {k: translation[k] for k in ("n", "correct", "accuracy", "stderr", "accuracy_norm", "chance")} == \
        {"n": 1, "correct": 1.0, "accuracy": 1.0, "stderr": 0.0, "accuracy_norm": 1.0, "chance": 0.5}
    assert result["overall"]["accuracy"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------
# Prompts


SHOTS = [("What is 2 + 3?", "2 + 3 = 5."), ("Name the capital city of France.", "The capital of France is Paris.")]


def test_fewshot_prompt_is_exactly_as_documented():
    assert STYLES["qa"].prompt("What is 7 - 4?", SHOTS) == (
        "Q: What is 2 + 3?\nA: 2 + 3 = 5.\n\n"
        "Q: Name the capital city of France.\nA: The capital of France is Paris.\n\n"
        "Q: What is 7 - 4?\nA:")
    assert STYLES["qa"].prompt("What is 7 - 4?") == "Q: What is 7 - 4?\nA:"
    assert STYLES["qa"].stops == ("\n\n", "\nQ:")


def test_fake_assistant_document_prompt():
    assert STYLES["assistant"].prompt("What is 7 - 4?", SHOTS[:1]) == (
        "The following is a conversation between a user and an AI assistant. The assistant is helpful, "
        "honest and knowledgeable, and it answers every question correctly and concisely.\n\n"
        "User: What is 2 + 3?\nAssistant: 2 + 3 = 5.\n\n"
        "User: What is 7 - 4?\nAssistant:")
    assert STYLES["assistant"].prompt("Hi?") == ASSISTANT_HEADER + "User: Hi?\nAssistant:"
    assert STYLES["assistant"].stops == ("\n\n", "\nUser:")


def test_gold_accuracy_uses_train_shots_in_the_documented_prompt(tok):
    result = gold_accuracy(None, tok, ["arithmetic", "knowledge"], 3, mode="base", shots=2, style="qa",
                           samples=3, responses=lambda e: "")
    examples = eval_examples(["arithmetic", "knowledge"], 3)
    for sample, example in zip(result["samples"], examples["arithmetic"] + examples["knowledge"]):
        shots = draw_shots(example, 2, seed=0, index=examples[example.task].index(example))
        assert all(s.metadata["split"] == "train" and s.question != example.question for s in shots)
        assert len({s.question for s in shots}) == 2
        expected = STYLES["qa"].prompt(example.question, [(s.question, response_text(s.reference[0])) for s in shots])
        assert sample["prompt"] == expected
        assert shot_answer(shots[0]) in sample["prompt"]
    assert all(e.metadata["split"] == "test" for es in examples.values() for e in es)


def test_chat_messages_put_shots_after_the_system_message():
    example = eval_examples(["calculator"], 1)["calculator"][0]
    assert chat_messages(example) == example.messages
    shot = draw_shots(example, 1, seed=0, index=0)[0]
    messages = chat_messages(example, [shot])
    assert messages[0] == example.messages[0] and messages[0]["role"] == "system"
    assert messages[1] == {"role": "user", "content": shot.question}
    assert messages[2:-1] == shot.reference[0]  # tool call, tool output, final answer
    assert messages[-1] == example.messages[-1]


# ---------------------------------------------------------------------------------------------------------
# Gold accuracy


def test_gold_accuracy_accounting_with_given_responses(tok):
    calls = {"n": 0}

    def alternate(example):  # the reference for every other question, a task's bad response otherwise
        calls["n"] += 1
        if calls["n"] % 2:
            return response_text(example.reference[0])
        return response_text(get_task(example.task).bad_responses(example, random.Random(0))[0])

    tasks = ["arithmetic", "knowledge", "sentiment", "extraction"]
    for mode in ("base", "chat"):
        result = gold_accuracy(None, tok, tasks, 4, mode=mode, responses=alternate)
        assert {name: (t["n"], t["correct"]) for name, t in result["tasks"].items()} == {t: (4, 2) for t in tasks}
        assert result["accuracy"] == 0.5
        assert result["tasks"]["arithmetic"]["stderr"] == pytest.approx(math.sqrt(0.25 / 4))
    perfect = gold_accuracy(None, tok, None, 3, responses=lambda e: response_text(e.reference[0]), samples=1)
    assert perfect["accuracy"] == 1.0 and len(perfect["tasks"]) >= 9
    assert [s["correct"] for s in perfect["samples"]] == [True] * len(perfect["tasks"])


def test_identity_questions_are_distinct_and_capped(tok):
    examples = eval_examples(["identity"], 50)["identity"]
    assert 0 < len(examples) < 50  # the identity task has only a handful of test questions
    assert len({e.question for e in examples}) == len(examples)


def test_chat_gold_accuracy_end_to_end_with_tool_calls(tok):
    """A model trained on conversations with correct answers (one through a calculator call) and wrong ones.
    Greedy chat generation must reproduce them, running the tool, and score exactly 1 of 2 per task."""
    examples = eval_examples(["arithmetic", "calculator"], 2)
    (a_good, a_bad), (c_good, c_bad) = examples["arithmetic"], examples["calculator"]
    rng = random.Random(0)
    wrong_text = get_task("arithmetic").bad_responses(a_bad, rng)[0]
    ignored_tool = get_task("calculator").bad_responses(c_bad, rng)[2]  # calls the tool, then misreports it
    assert ignored_tool[0]["tool_calls"]
    # the model is trained on FAKE tool outputs (the answer never depends on them), so the real output in
    # the transcript shows that the tool ran during generation
    assert c_good.conversation(0)[-2] == {"role": "tool", "content": c_good.answer_text}
    # varied digits, so that the model learns the answer does not depend on them (with four repeated-digit
    # outputs, a one-layer model copied digits of the unseen real output into its answer)
    fakes = ("31415", "27182", "16180", "14142", "57721", "69314", "30102", "47712")
    fake_outputs = []
    for fake in fakes:
        fake_outputs.append(c_good.conversation(0))
        fake_outputs[-1][-2] = {"role": "tool", "content": fake}
    conversations = [a_good.conversation(0), a_bad.messages + wrong_text, *fake_outputs,
                     c_bad.messages + ignored_tool]
    model = tiny_gpt(tok, max_seq_len=512)  # the calculator's system prompt lists the tool's schema
    # trained like SFT: loss on what the assistant writes only (not on questions or tool outputs)
    assert memorize(model, [render(tok, c).inputs_targets() for c in conversations], steps=300) < 0.05
    result = gold_accuracy(model, tok, ["arithmetic", "calculator"], 2, mode="chat", max_new_tokens=100,
                           samples=2)
    assert {name: t["correct"] for name, t in result["tasks"].items()} == {"arithmetic": 1, "calculator": 1}
    calc_good = result["samples"][2]
    assert calc_good["correct"] and calc_good["gold"] == c_good.answer_text
    assert f"<|tool_call_end|><|tool_output_start|>{c_good.answer_text}<|tool_output_end|>" in calc_good["response"]
    assert not any(fake in calc_good["response"] for fake in fakes)
    assert calc_good["prompt"] == tok.decode(render_for_completion(tok, c_good.messages))


def test_base_gold_accuracy_end_to_end(tok):
    """A model trained on the exact 1-shot qa document of one test question answers it; greedy decoding
    stops at the blank line, so the answer is read without what the model would write next."""
    example, other = eval_examples(["word_problems"], 2)["word_problems"]
    documents = []
    for index, ex in enumerate((example, other)):
        shots = draw_shots(ex, 1, seed=0, index=index)
        prompt = STYLES["qa"].prompt(ex.question, [(s.question, shot_answer(s)) for s in shots])
        answer = shot_answer(ex) if ex is example else "I am not sure."
        documents.append([tok.eot_id, *tok.encode(prompt), *tok.encode(f" {answer}\n\nQ: What")])
    model = tiny_gpt(tok, max_seq_len=512)
    assert memorize(model, documents, steps=150) < 0.05
    result = gold_accuracy(model, tok, ["word_problems"], 2, mode="base", shots=1, style="qa", max_new_tokens=96)
    assert result["tasks"]["word_problems"]["correct"] == 1
    first = result["samples"][0]
    assert first["correct"] and first["response"] == " " + shot_answer(example)  # cut before "\n\nQ:"


# ---------------------------------------------------------------------------------------------------------
# Reward-model hook


def test_pairwise_accuracy_accounting():
    pairs = preference_pairs(["arithmetic", "knowledge"], 5)
    assert len(pairs) == 10
    chosen = {json.dumps(c) for _, c, _ in pairs}
    oracle = pairwise_accuracy(lambda convs: [float(json.dumps(c) in chosen) for c in convs],
                               ["arithmetic", "knowledge"], 5)
    assert oracle["accuracy"] == 1.0 and oracle["tasks"]["knowledge"]["n"] == 5
    inverted = pairwise_accuracy(lambda convs: [-float(json.dumps(c) in chosen) for c in convs],
                                 ["arithmetic", "knowledge"], 5)
    assert inverted["accuracy"] == 0.0
    constant = pairwise_accuracy(lambda convs: [0.0] * len(convs), ["arithmetic"], 4)
    assert constant["accuracy"] == 0.5  # ties count half
    with pytest.raises(GptlabError, match="returned 1 scores"):
        pairwise_accuracy(lambda convs: [0.0], ["arithmetic"], 2)
    for task, chosen_conv, rejected_conv in pairs:  # chosen answers pass the checker, rejected ones fail
        example = _example_of(task, chosen_conv)
        start = len(example.messages)
        assert rejected_conv[:start] == example.messages
        assert get_task(task).check(example, response_text(chosen_conv[start:]))
        assert not get_task(task).check(example, response_text(rejected_conv[start:]))


def _example_of(task, conversation):
    """The test example whose prompt starts `conversation` (for checking the pairs)."""
    for example in eval_examples([task], 5)[task]:
        if conversation[:len(example.messages)] == example.messages:
            return example
    raise AssertionError("pair prompt not among the test examples")


# ---------------------------------------------------------------------------------------------------------
# Bits per byte, report, CLI


def test_val_bits_per_byte_matches_hand_computation(dataset):
    data_dir, tok = dataset
    model = tiny_gpt(tok, max_seq_len=64).eval()
    result = val_bits_per_byte(model, tok, data_dir, num_batches=2, batch_size=3, seq_len=32)
    x, y = PackedLoader(data_dir, "val", 6, 32).rows(0, 6)
    with torch.no_grad():
        nats = F.cross_entropy(model(x).double().flatten(0, 1), y.flatten(), reduction="sum").item()
    nbytes = sum(len(tok.id_to_bytes(t)) if t != tok.eot_id else 0 for t in y.flatten().tolist())
    assert result["loss"] == pytest.approx(nats / y.numel(), rel=1e-5)
    assert result["bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert result["tokens"] == 6 * 32 and not model.training  # pretrain.evaluate's model.train() undone
    capped = val_bits_per_byte(model, tok, data_dir, num_batches=10**6, batch_size=4, seq_len=64)
    assert capped["batches"] == PackedLoader(data_dir, "val", 4, 64).n_windows // 4  # never repeats windows
    with pytest.raises(GptlabError, match="context window"):
        val_bits_per_byte(model, tok, data_dir, seq_len=65)
    other_tok = train_tokenizer(["abc abd abe"] * 9, 280)
    with pytest.raises(GptlabError, match="different tokenizer"):
        val_bits_per_byte(tiny_gpt(other_tok), other_tok, data_dir)


def test_cli_writes_json_and_markdown_report(dataset, tmp_path, capsys):
    data_dir, tok = dataset
    model_dir = save_model_dir(tmp_path / "run" / "model", tiny_gpt(tok, max_seq_len=128), tok)
    rc = cli_main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--tasks", "arithmetic,identity",
                   "--n-per-task", "2", "--shots", "1", "--max-new-tokens", "6", "--val-batches", "2"])
    assert rc == 0
    out = tmp_path / "run" / "eval"
    report = json.loads((out / "eval.json").read_text())
    assert report["model_dir"] == str(model_dir) and report["mode"] == "base"
    assert report["val"]["bpb"] > 0 and report["val"]["batches"] == 2
    assert set(report["choices"]["categories"]) >= {"grammar", "arithmetic"}
    assert [g["style"] for g in report["gold"]] == ["qa", "assistant"]
    assert all(set(g["tasks"]) == {"arithmetic", "identity"} and g["shots"] == 1 for g in report["gold"])
    markdown = (out / "eval.md").read_text()
    for heading in ["## Validation", "## Multiple choice", "## Gold accuracy: qa prompts, 1-shot",
                    "## Gold accuracy: assistant prompts, 1-shot", "## Sample transcripts: assistant prompts"]:
        assert heading in markdown
    assert report["gold"][1]["samples"][0]["prompt"].startswith(ASSISTANT_HEADER)
    assert str(out / "eval.md") in capsys.readouterr().out


def test_write_report_and_chat_mode_defaults(tok, tmp_path):
    result = evaluate_model(tiny_gpt(tok, max_seq_len=128), tok, "chat", ["arithmetic"], 2, choices=False,
                            max_new_tokens=4)
    assert [g["style"] for g in result["gold"]] == ["chat"] and result["gold"][0]["shots"] == 0
    assert "val" not in result and "choices" not in result
    json_path, md_path = write_report(result, tmp_path / "r")
    assert json.loads(json_path.read_text())["gold"][0]["tasks"]["arithmetic"]["n"] == 2
    assert "<|assistant_start|>" in md_path.read_text()  # chat transcripts show the special tokens


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arithmetic,nope"], "unknown task 'nope'"),
    (["--tasks", "identity", "--shots", "40"], "task 'identity' has only 31 distinct train examples"),
    (["--mode", "instruct"], "unknown mode 'instruct'"),
    (["--styles", "qa,poem"], "unknown prompt style 'poem'"),
    (["--n-per-task", "0"], "n_per_task must be >= 1"),
])
def test_cli_bad_inputs_give_one_line_errors(args, message, tok, tmp_path, capsys):
    model_dir = save_model_dir(tmp_path / "model", tiny_gpt(tok, max_seq_len=64), tok)
    rc = cli_main(["eval", "--model", str(model_dir), "--choices", "false", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_missing_model_dir(tmp_path, capsys):
    assert cli_main(["eval", "--model", str(tmp_path / "nowhere")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert cli_main(["eval"]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_cli_reports_reward_model_pairwise_accuracy(dataset, tmp_path):
    """`--reward-model` loads a `gptlab.train.reward.RewardModel` directory. Its head starts at zero, so every
    conversation gets the same reward and every pair is a tie: exactly 50% by the tie rule."""
    from gptlab.reward_model import RewardModel

    _, tok = dataset
    model_dir = save_model_dir(tmp_path / "policy", tiny_gpt(tok, max_seq_len=64), tok)
    reward_dir = RewardModel(tiny_gpt(tok, seed=3, max_seq_len=512), tok).save(tmp_path / "rm")
    rc = cli_main(["eval", "--model", str(model_dir), "--reward-model", str(reward_dir), "--tasks", "arithmetic",
                   "--n-per-task", "3", "--mode", "chat", "--max-new-tokens", "2", "--choices", "false",
                   "--out", str(tmp_path / "report")])
    assert rc == 0
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert report["reward"]["n"] == 3 and report["reward"]["accuracy"] == 0.5
    assert report["reward_model_dir"] == str(reward_dir)
    assert "## Reward model: held-out pairwise accuracy" in (tmp_path / "report" / "eval.md").read_text()
