"""Preference data: the JSONL formats (TRL pairs, implicit prompts, K-way rankings), all-pairs expansion,
errors that name file:line, task-suite preferences, ranking of model samples by the gold checkers, and the
token layout (completion mask, batching)."""

import json

import pytest
import torch

from gptlab.train import preferences
from gptlab.chat import render_for_completion, response_text
from gptlab.common import GptlabError
from gptlab.model import GPT, GPTConfig
from gptlab.train.preferences import (PreferenceSet, collate, default_preferences, encode_set, parse_preference,
                                read_preferences_jsonl, row_offsets, sampled_preferences, write_preferences_jsonl)
from gptlab.tasks import get_task, sample_examples


def assistant(text):
    return [{"role": "assistant", "content": text}]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_ranked_set_of_four_expands_to_six_pairs():
    pset = parse_preference({"prompt": "Best city?", "ranked": ["Paris.", "Rome.", "Oslo.", "No idea."]})
    assert [c[0]["content"] for c in pset.completions()] == ["Paris.", "Rome.", "Oslo.", "No idea."]
    assert pset.pairs() == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    # tiers: 2 references above 3 bad responses = 6 pairs, none inside a tier
    tiers = PreferenceSet([{"role": "user", "content": "q"}],
                          [[assistant("a"), assistant("b")], [assistant("x"), assistant("y"), assistant("z")]])
    assert tiers.pairs() == [(0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]


def test_trl_formats():
    explicit = parse_preference({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."})
    assert explicit.prompt == [{"role": "user", "content": "Hi?"}]
    assert explicit.tiers == [[assistant("Hello!")], [assistant("Go away.")]]
    conversational = parse_preference({
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]})
    assert conversational.prompt[0]["role"] == "system" and conversational.tiers[1] == [assistant("5")]
    user = {"role": "user", "content": "Capital of France?"}
    implicit = parse_preference({"chosen": [user, {"role": "assistant", "content": "Paris."}],
                                 "rejected": [user, {"role": "assistant", "content": "Lyon."}]})
    assert implicit.prompt == [user] and implicit.tiers == [[assistant("Paris.")], [assistant("Lyon.")]]
    # a tool-using completion is a list of assistant/tool messages
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"name": "calculator", "arguments": {"expression": "2*3"}}]}
    tool = parse_preference({"prompt": "2*3?", "chosen": [call, {"role": "tool", "content": "6"},
                                                           {"role": "assistant", "content": "6."}],
                             "rejected": "7."})
    assert len(tool.tiers[0][0]) == 3


def test_bad_records_name_file_and_line(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    cases = [
        ("{not json", r":2: not valid JSON"),
        (json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}), r":2: chosen and rejected are the same"),
        (json.dumps({"prompt": "p", "ranked": ["a", "b", "a"]}), r":2: completions 0 and 2 are identical"),
        (json.dumps({"prompt": "p", "ranked": ["only"]}), r":2: 'ranked' must be a list of at least 2"),
        (json.dumps({"prompt": "p", "chosen": "a"}), r":2: expected 'prompt' \+ 'chosen' \+ 'rejected'"),
        (json.dumps({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}),
         r":2: chosen must start with an assistant message"),
        (json.dumps({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}),
         r":2: message 1 \(assistant\)"),
        (json.dumps([1, 2]), r":2: expected a JSON object"),
        (json.dumps({"prompt": "p", "tiers": [["a", "b"]]}), r":2: 'tiers' must be a list of at least 2"),
        (json.dumps({"prompt": "p", "tiers": [["a"], []]}), r":2: 'tiers' must be a list of at least 2 non-empty"),
        (json.dumps({"prompt": "p", "tiers": [["a", "b"], ["c", "a"]]}), r":2: completions 0 and 3 are identical"),
        (json.dumps({"prompt": "p", "tiers": [["a"], [7]]}), r":2: tiers\[1\]\[0\] must be a string"),
        (json.dumps({"tiers": [["a"], ["b"]]}), r":2: a 'tiers' record needs a 'prompt'"),
    ]
    for i, (line, pattern) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", [good, line])
        with pytest.raises(GptlabError, match=rf"bad{i}\.jsonl{pattern}"):
            read_preferences_jsonl(path)
    with pytest.raises(GptlabError, match="preference file not found"):
        read_preferences_jsonl(tmp_path / "missing.jsonl")
    path = write_jsonl(tmp_path / "ok.jsonl", [good, "", {"prompt": "q", "ranked": ["x", "y", "z"]}])
    assert [len(s.pairs()) for s in read_preferences_jsonl(path)] == [1, 3]


def test_written_preferences_read_back_as_the_same_sets(tmp_path):
    """Every set survives a JSONL round trip in the simplest format that expresses it: the task suite's
    tiered sets (with tool calls), a K-way ranking and a TRL pair."""
    sets = default_preferences("all", 40, "train", seed=5)
    sets += [parse_preference({"prompt": "Best city?", "ranked": ["Paris.", "Rome.", "Oslo."]}),
             parse_preference({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."})]
    assert any(len(c) > 1 for s in sets for c in s.completions())  # tool-using completions included
    path = tmp_path / "prefs.jsonl"
    assert write_preferences_jsonl(path, sets) == len(sets)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [next(k for k in ("tiers", "ranked", "chosen") if k in r) for r in records[-3:]] == ["tiers", "ranked",
                                                                                              "chosen"]
    back = read_preferences_jsonl(path)
    assert [(s.prompt, s.tiers) for s in back] == [(s.prompt, s.tiers) for s in sets]


def test_tasks_export_writes_what_the_stages_train_on(tmp_path, capsys):
    from gptlab.chat import read_messages_jsonl
    from gptlab.cli import main
    from gptlab.train.sft import task_conversations

    prefs, convs = tmp_path / "p.jsonl", tmp_path / "c.jsonl"
    assert main(["tasks", "export", "--kind", "preferences", "--n", "30", "--seed", "2", "--out", str(prefs)]) == 0
    expected = default_preferences("all", 30, "train", 2)
    assert [(s.prompt, s.tiers) for s in read_preferences_jsonl(prefs)] == [(s.prompt, s.tiers) for s in expected]
    assert main(["tasks", "export", "--kind", "sft", "--n", "25", "--split", "test", "--tasks", "sentiment,identity",
                 "--out", str(convs)]) == 0
    assert list(read_messages_jsonl(convs)) == task_conversations(["sentiment", "identity"], 25, "test", 0)
    assert main(["tasks", "export", "--kind", "sft", "--tasks", "nope", "--out", str(convs)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["tasks", "list"]) == 0 and "syllogism" in capsys.readouterr().out


def test_task_preferences_rank_references_above_bad_responses():
    sets = default_preferences("arithmetic,sentiment,calculator", 30, "test", seed=1)
    examples = sample_examples(["arithmetic", "sentiment", "calculator"], 30, "test", seed="1-test")
    assert len(sets) == 30
    for pset, example in zip(sets, examples):
        assert pset.prompt == example.messages and len(pset.tiers) == 2
        task = get_task(example.task)
        assert all(task.check(example, response_text(c)) for c in pset.tiers[0])
        assert len(pset.tiers[1]) >= 3 and not any(task.check(example, response_text(c)) for c in pset.tiers[1])
        assert len(pset.pairs()) == len(pset.tiers[0]) * len(pset.tiers[1])
    assert default_preferences("arithmetic", 5, "test", seed=1)[0].prompt != \
        default_preferences("arithmetic", 5, "train", seed=1)[0].prompt


def test_model_samples_are_ranked_by_the_gold_checker(small_tokenizer, monkeypatch):
    examples = sample_examples(["arithmetic"], 3, "train", seed=4)
    answers = [int(e.answer_text) for e in examples]
    scripted = [[f"It is {answers[0]}.", f"It is {answers[0] + 1}.", f"It is {answers[0]}.", "", "I don't know."],
                [f"{answers[1]}", f"= {answers[1]}"],  # all correct: no comparison, dropped
                [f"{answers[2] + 3}", f"The answer is {answers[2]}."]]
    calls = []

    def fake_generate(model, tokenizer, exs, params, samples_per_prompt=1, batch_size=32):
        calls.append((len(exs), samples_per_prompt, params.temperature))
        return scripted

    monkeypatch.setattr(preferences, "generate_completions", fake_generate)
    sets = sampled_preferences(None, small_tokenizer, examples, k=5, temperature=0.7)
    assert calls == [(3, 5, 0.7)]
    assert len(sets) == 2
    assert sets[0].tiers == [[assistant(f"It is {answers[0]}.")],  # duplicate and empty samples dropped
                             [assistant(f"It is {answers[0] + 1}."), assistant("I don't know.")]]
    assert sets[1].tiers == [[assistant(f"The answer is {answers[2]}.")], [assistant(f"{answers[2] + 3}")]]


def test_generate_completions_samples_k_per_prompt_reproducibly(small_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=2,
                          head_dim=16, intermediate_size=64, max_seq_len=128))
    examples = sample_examples(["sentiment"], 2, "train", seed=0)
    params = preferences.SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    first = preferences.generate_completions(model, small_tokenizer, examples, params, samples_per_prompt=3)
    again = preferences.generate_completions(model, small_tokenizer, examples, params, samples_per_prompt=3)
    assert first == again and [len(t) for t in first] == [3, 3]
    assert len({t for texts in first for t in texts}) > 1  # distinct seeds per sample


def test_completion_mask_marks_only_what_the_assistant_writes(small_tokenizer):
    tok = small_tokenizer
    example = sample_examples(["calculator"], 1, "train", seed=0)[0]
    pset = preferences.task_preferences([example])[0]
    encoded = encode_set(tok, pset)
    prompt_ids = render_for_completion(tok, example.messages)
    end = tok.special_id("<|assistant_end|>")
    for ids, mask in zip(encoded.ids, encoded.completion_mask):
        assert ids[:len(prompt_ids)] == prompt_ids and not any(mask[:len(prompt_ids)])
        assert ids[-1] == end and mask[-1] == 1
    # the tool-using reference: its tool call is trained on, the tool's output is not
    ids, mask = encoded.ids[0], encoded.completion_mask[0]
    out_start, out_end = tok.special_id("<|tool_output_start|>"), tok.special_id("<|tool_output_end|>")
    i, j = ids.index(out_start), ids.index(out_end)
    assert not any(mask[i:j + 1]) and mask[ids.index(tok.special_id("<|tool_call_start|>"))] == 1
    masked_text = tok.decode([t for t, m in zip(ids, mask) if m])
    assert masked_text.startswith("<|tool_call_start|>")
    assert masked_text.endswith(f"{example.answer_text}.<|assistant_end|>")


def test_collate_lays_out_each_completion_once(small_tokenizer):
    sets = [encode_set(small_tokenizer, parse_preference({"prompt": "p", "ranked": ["a", "bb b", "c c c", "d"]})),
            encode_set(small_tokenizer, parse_preference({"prompt": "q?", "chosen": "yes", "rejected": "no no"}))]
    offsets = row_offsets(sets)
    assert offsets == [0, 4, 6]
    batch = collate(sets, [1, 0], offsets, pad_id=0)
    assert batch.ids.shape[0] == 6 and batch.rows.tolist() == [4, 5, 0, 1, 2, 3]
    assert batch.pairs.tolist() == [[0, 1], [2, 3], [2, 4], [2, 5], [3, 4], [3, 5], [4, 5]]
    assert batch.pair_set.tolist() == [0] + [1] * 6
    for row, global_row in enumerate(batch.rows.tolist()):
        s, k = (1, global_row - 4) if global_row >= 4 else (0, global_row)
        n = len(sets[s].ids[k])
        assert batch.ids[row, :n].tolist() == sets[s].ids[k] and batch.attn_mask[row].sum() == n
        assert batch.completion_mask[row, :n].tolist() == sets[s].completion_mask[k]
        assert not batch.completion_mask[row, n:].any()



def test_preferences_from_a_hugging_face_dataset_folder(tmp_path):
    """TRL-style preference datasets load through `datasets` (a save_to_disk folder here; `hf:NAME` is the
    same code on the Hub) and read exactly like the JSONL file with the same records."""
    import datasets

    records = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
                "chosen": [{"role": "assistant", "content": f"{2 * i}."}],
                "rejected": [{"role": "assistant", "content": f"{2 * i + 1}."}]} for i in range(5)]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "prefs"))
    from_hf = read_preferences_jsonl(tmp_path / "prefs")
    from_jsonl = read_preferences_jsonl(write_jsonl(tmp_path / "prefs.jsonl", records))
    assert [(s.prompt, s.tiers) for s in from_hf] == [(s.prompt, s.tiers) for s in from_jsonl]
    datasets.Dataset.from_list([{**records[0], "rejected": records[0]["chosen"]}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(GptlabError, match=r"bad\[0\]: .*same"):
        read_preferences_jsonl(tmp_path / "bad")
