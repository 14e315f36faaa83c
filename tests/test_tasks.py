"""Task suite: per task determinism, disjoint train/test splits, references pass and bad responses fail
their checkers, everything renders in the chat format; hand-written edge cases per checker; the safe
calculator; the registry and the mixture sampler."""

import dataclasses
import json
import operator
import random
import re

import pytest

from gptlab.chat import render, response_text
from gptlab.common import GptlabError
from gptlab.tasks import TASKS, Example, Task, get_task, register, sample_examples, split_of, task_names
from gptlab.tasks.checks import find_json_object, final_number, mentions
from gptlab.tasks.spelling import spelled_letters
from gptlab.tools import Toolbox
from gptlab.tools.calculator import calculate, calculator

EXPECTED_TASKS = {"arithmetic", "calculator", "word_problems", "spelling", "knowledge", "sentiment", "syllogism",
                  "extraction", "identity"}
N = 150  # examples per split per task in the generic checks


def test_registry_has_every_task():
    assert EXPECTED_TASKS <= set(TASKS)
    with pytest.raises(GptlabError, match=r"unknown task 'nope' \(available: .*arithmetic"):
        get_task("nope")
    with pytest.raises(ValueError, match="unique name"):
        register(type("Again", (Task,), {"name": "arithmetic"}))


def _draw(task, split, seed, n=N):
    rng = random.Random(seed)
    return [task.generate(rng, split) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(TASKS))  # a newly added task is checked too
def test_generation_is_deterministic(name):
    task = get_task(name)
    first, again = _draw(task, "train", 7, 20), _draw(task, "train", 7, 20)
    assert [dataclasses.asdict(e) for e in first] == [dataclasses.asdict(e) for e in again]
    other = _draw(task, "train", 8, 20)
    assert [e.messages for e in other] != [e.messages for e in first]


@pytest.mark.parametrize("name", sorted(TASKS))  # a newly added task is checked too
def test_train_and_test_are_disjoint(name):
    task = get_task(name)
    train, test = _draw(task, "train", 1), _draw(task, "test", 2)
    train_keys, test_keys = {task.split_key(e) for e in train}, {task.split_key(e) for e in test}
    assert train_keys.isdisjoint(test_keys)
    assert {e.question for e in train}.isdisjoint(e.question for e in test)
    assert all(e.metadata["split"] == "train" for e in train) and all(e.metadata["split"] == "test" for e in test)
    assert len(test_keys) >= 4  # the test split is not degenerate


@pytest.mark.parametrize("name", sorted(TASKS))  # a newly added task is checked too
def test_references_pass_and_bad_responses_fail(name, small_tokenizer):
    task = get_task(name)
    rng = random.Random(3)
    for example in _draw(task, "train", 3) + _draw(task, "test", 4):
        assert example.task == name and example.reference and example.answer_text
        for i, reference in enumerate(example.reference):
            assert task.check(example, response_text(reference)), (example.question, reference)
            render(small_tokenizer, example.conversation(i))  # valid, complete chat conversations
        bad = task.bad_responses(example, rng)
        assert len(bad) >= 3
        for response in bad:
            assert not task.check(example, response_text(response)), (example.question, response)
            render(small_tokenizer, example.messages + response)


@pytest.mark.parametrize("name", sorted(TASKS))  # a newly added task is checked too
def test_every_reference_passes_its_checker(name):
    """The checkers are strict about wrong answers that contain the right token; they must still accept every
    reference answer (the SFT data and the reward model's chosen side) over many examples of both splits."""
    task = get_task(name)
    for split, seed in (("train", 21), ("test", 22)):
        for example in _draw(task, split, seed, 1000):
            for reference in example.reference:
                assert task.check(example, response_text(reference)), (example.question, reference)


def _judge(task_name, example, right, wrong):
    """Assert that every reply in `right` passes and every reply in `wrong` fails the task's checker."""
    task = get_task(task_name)
    assert [r for r in right if not task.check(example, r)] == []
    assert [w for w in wrong if task.check(example, w)] == []


def _find(name, predicate):
    """The first generated example satisfying `predicate`, from either split."""
    rng = random.Random(0)
    for _ in range(3000):
        for split in ("train", "test"):
            example = get_task(name).generate(rng, split)
            if predicate(example):
                return example
    raise AssertionError(f"no {name} example matched")


def test_number_checkers_read_the_final_number():
    task = get_task("arithmetic")
    ex = _find("arithmetic", lambda e: int(e.answer_text) > 3)
    a = int(ex.answer_text)
    assert task.check(ex, f"The answer is {a}.")
    assert task.check(ex, f"{a}")
    assert task.check(ex, f"Hmm, {a + 1}? No: it is {a}.0")
    assert not task.check(ex, f"It is {a}, or maybe {a + 1}.")
    assert not task.check(ex, f"{a - 1}")
    assert not task.check(ex, "I don't know.")
    calc = get_task("calculator")
    ex = _find("calculator", lambda e: int(e.answer_text) >= 1000)
    a = int(ex.answer_text)
    assert calc.check(ex, f"The result is {a:,}.")  # thousands separators
    assert not calc.check(ex, f"The result is {a + 1:,}.")  # exact for large numbers
    assert final_number("-12 and 3.5") == 3.5 and final_number("from -7") == -7 and final_number("none") is None
    assert final_number("three or four", words=True) == 4 and final_number("three or four") is None


def test_spelling_checker_edge_cases():
    task = get_task("spelling")
    ex = _find("spelling", lambda e: e.metadata["kind"] == "spell" and e.metadata["word"] == "banana")
    for good in ["b-a-n-a-n-a", "B A N A N A", "It is spelled b, a, n, a, n, a.", "Sure! B-A-N-A-N-A. Hope that helps"]:
        assert task.check(ex, good), good
    for bad in ["banana", "b-a-n-a-n", "b-a-n-a-n-a-s", "b-a-n-a-n-a, no wait: b-a-n-n-a", "B A N A N A I think"]:
        assert not task.check(ex, bad), bad
    assert spelled_letters("x") is None
    ex = _find("spelling", lambda e: e.metadata["kind"] == "count" and e.metadata["word"] == "seventeen"
               and e.metadata["letter"] == "e")
    assert task.check(ex, "There are four e's in seventeen.")  # the word itself is not read as the number
    assert task.check(ex, "4")
    assert not task.check(ex, "seventeen has 3 e's")


def test_knowledge_checker_edge_cases():
    task = get_task("knowledge")
    ex = _find("knowledge", lambda e: e.metadata["subject"] == "Brazil")
    assert task.check(ex, "brasilia")  # case and accents do not matter
    assert task.check(ex, "The capital is Brasília, in the centre-west.")
    assert not task.check(ex, "Rio de Janeiro")
    assert not task.check(ex, "Brasília or Buenos Aires")  # hedging between answers
    assert not task.check(ex, "Brasíliaville")
    assert mentions("Washington, D.C. is", "washington, d.c.") and not mentions("Romeo", "Rome")


def test_knowledge_bad_responses_name_train_answers_only():
    """A test fact's answer never appears in fine-tuning data, not even on the rejected side: every wrong
    answer in a bad response (either split) is a train fact's, and the test facts' answers do occur."""
    from gptlab.tasks.knowledge import FACTS

    task = get_task("knowledge")
    split = {f.answers[0]: split_of("knowledge", f"{f.relation}: {f.subject}", task.test_fraction) for f in FACTS}
    rng, seen_test_answers = random.Random(3), set()
    for example in sample_examples(["knowledge"], 400, "train", seed=3) + sample_examples(["knowledge"], 100, "test",
                                                                                           seed=3):
        if example.metadata["split"] == "test":
            seen_test_answers.add(example.answer_text)
        texts = [response_text(response) for response in task.bad_responses(example, rng)]
        wrong = {answer for answer in split for text in texts if answer != example.answer_text and mentions(text, answer)}
        assert wrong and all(split[a] == "train" for a in wrong), (example.question, wrong)
    assert len(seen_test_answers) > 5


def test_syllogism_checker_edge_cases():
    task = get_task("syllogism")
    pos = _find("syllogism", lambda e: not e.metadata["negative"] and e.metadata["property"] == "mortal")
    name = pos.metadata["name"]
    assert task.check(pos, f"{name} is mortal.") and task.check(pos, f"Therefore {name.lower()} must be MORTAL")
    assert not task.check(pos, f"{name} is immortal.")
    assert not task.check(pos, f"{name} isn't mortal.")
    assert not task.check(pos, f"We can't tell whether {name} is mortal.")
    neg = _find("syllogism", lambda e: e.metadata["negative"] and e.metadata["yes_no"])
    name, prop = neg.metadata["name"], neg.metadata["property"]
    assert task.check(neg, f"No, {name} is not {prop}.") and task.check(neg, "No.")
    assert task.check(neg, f"{name} cannot be {prop}.") and task.check(neg, f"{name} isn't {prop}.")
    assert not task.check(neg, "Yes.") and not task.check(neg, f"No, {name} is {prop}.")
    assert not task.check(neg, f"{name} is {prop}.")


def test_sentiment_extraction_identity_edge_cases():
    sentiment = get_task("sentiment")
    ex = _find("sentiment", lambda e: e.answer_text == "positive")
    assert sentiment.check(ex, "POSITIVE") and sentiment.check(ex, "I'd say this review is positive overall.")
    assert not sentiment.check(ex, "Not positive.") and not sentiment.check(ex, "positive or negative")
    assert not sentiment.check(ex, "positively glowing")  # the label itself is required

    extraction = get_task("extraction")
    ex = _find("extraction", lambda e: e.metadata["kind"] == "person")
    fields = ex.metadata["fields"]
    natural = (f'Here you go:\n```json\n{{"city": "{fields["city"].upper()}", "name": "{fields["name"]}", '
               f'"age": "{fields["age"]}", "job": "x"}}\n```')
    assert extraction.check(ex, natural)  # any key order, case-insensitive text, "34" for 34, extra keys
    assert not extraction.check(ex, natural.replace(f'"{fields["age"]}"', f'"{fields["age"] + 1}"'))
    assert not extraction.check(ex, natural.replace('"age"', '"years"'))
    assert find_json_object('x {"a": 1} y {"b": 2}') == {"a": 1} and find_json_object("{oops}") is None

    identity = get_task("identity")
    ex = _find("identity", lambda e: True)
    assert identity.check(ex, "Hi! I'm GPTLab, your friendly assistant.")
    assert not identity.check(ex, "I am an assistant built on gptlab? No, I am not gptlab.")
    assert not identity.check(ex, "gptlab")


def test_number_checkers_reject_the_right_number_in_a_wrong_answer():
    ex = _find("arithmetic", lambda e: int(e.answer_text) > 3 and len(e.metadata["numbers"]) == 2)
    a, expr = int(ex.answer_text), ex.metadata["expression"]
    _judge("arithmetic", ex, right=[f"{expr} = {a}", f"**{a}**", f"It is {a}, I am sure.", f"{expr} = {a}.0\n"],
           wrong=[f"It is not {a}.", f"The answer isn't {a}.", f"{a} is wrong.", f"{a} is not right.",  # denied
                  f"{a - 1} or {a}", f"Either {a - 1} or {a}.", f"{a - 1}, {a}", f"{a - 1} and {a}",  # candidates
                  f"Maybe {a}.", f"About {a}.", f"It could be {a}.", f"{a}?", f"I'm not sure, perhaps {a}",  # hedged
                  f"{expr} = {a + 1}. So the answer is {a}.", f"1 + 1 = 3, so {a}"])  # false working
    ex = _find("calculator", lambda e: int(e.answer_text) >= 1000 and e.metadata["expression"].count(" ") == 2)
    a, expr = int(ex.answer_text), ex.metadata["expression"]
    _judge("calculator", ex, right=[f"{expr} = {a:,}.", f"The result is {a}."],
           wrong=[f"{expr} = {a + 1}, i.e. {a}", f"Not {a:,}.", f"{a - 1} or {a}", f"{a}? Let me check.",
                  f"{expr.replace(' ', '')} = {a + 10}, so {a}"])
    # a word problem's number must count what was asked: "3 friends" is not 3 cookies each
    ex = _find("word_problems", lambda e: e.metadata["kind"] == "share" and
               e.question.split(" among ")[1].startswith(f"{e.answer_text} friends"))
    a, item = int(ex.answer_text), ex.metadata["item"]
    _judge("word_problems", ex, right=[f"Each friend gets {a} {item}.", f"{a}", ex.reference[0][0]["content"]],
           wrong=[ex.question, f"There are {a} friends.", f"The answer is {a - 1}, or {a}", f"Not {a}."])
    ex = _find("word_problems", lambda e: e.metadata["kind"] == "boxes")
    _judge("word_problems", ex, right=[f"{ex.answer_text} {ex.metadata['item']} in total."],
           wrong=[f"There are {ex.answer_text} boxes.", f"{ex.answer_text} loose ones"])


def test_spelling_checker_rejects_the_right_token_in_a_wrong_answer():
    ex = _find("spelling", lambda e: e.metadata["kind"] == "count" and e.metadata["word"] == "banana"
               and e.metadata["letter"] == "a")
    _judge("spelling", ex, right=["There are 3 a's in banana.", "Three.", "3 times", "There are 3 a's in total.",
                                  "3 is the answer.",
                                  "The letter a appears three times in the word 'banana'.",
                                  "b-a-n-a-n-a: the letter a appears 3 times."],
           wrong=["There are 3 n's in banana.", "The letter n appears 3 times.",  # another letter
                  "There are 3 a's in bandana.", "There is 3 a in to p.",  # another word
                  "There are 3 a's in b-a-n-a-n-a-s.", "b-a-n-a-n: 3",  # counted from a wrong spelling
                  "Not 3.", "2 or 3", "3?", "Maybe three."])
    ex = _find("spelling", lambda e: e.metadata["kind"] == "count" and e.answer_text == "1")
    word, letter = ex.metadata["word"], ex.metadata["letter"]
    other = "q" if letter != "q" else "z"
    _judge("spelling", ex, right=[f"There is 1 {letter} in {word}."],
           wrong=[f"There is 1 {letter} in to p.", f"There is 1 {other} in {word}.", f"1 {letter} in straw"])
    ex = _find("spelling", lambda e: e.metadata["kind"] == "spell" and e.metadata["word"] == "banana")
    _judge("spelling", ex, right=["Banana is spelled b-a-n-a-n-a."],
           wrong=["It is not spelled b-a-n-a-n-a.", "b-a-n-n-a or b-a-n-a-n-a", "b-a-n-a-n-a or b-a-n-n-a",
                  "b-a-n-a-n-a?", "Maybe b-a-n-a-n-a."])


def test_knowledge_sentiment_checkers_reject_the_right_word_in_a_wrong_answer():
    ex = _find("knowledge", lambda e: e.metadata["subject"] == "France" and e.metadata["relation"] == "capital")
    _judge("knowledge", ex, right=["Paris, of course.", "It's Paris, France's largest city.",
                                   "The capital of France is Paris, not Lyon."],
           wrong=["Not Paris.", "The capital of France is not Paris.", "It isn't Paris.", "Paris is wrong; it is Lyon.",
                  "Paris is the capital of Germany.",  # the right name in a claim about another country
                  "Paris or Lyon", "Maybe Paris.", "Paris?", "I'm not sure, but Paris."])
    ex = _find("knowledge", lambda e: e.metadata["subject"] == "the United Kingdom"
               and e.metadata["relation"] == "capital")
    _judge("knowledge", ex, right=["The capital of the United Kingdom is London."],
           wrong=["London is the capital of France.", "London, or Edinburgh?"])
    ex = _find("sentiment", lambda e: e.answer_text == "positive")
    _judge("sentiment", ex, right=["The review is positive.", "Positive: the reviewer loved it."],
           wrong=["The review isn't positive.", "It is not really positive.", "I wouldn't call it positive.",
                  "Maybe positive.", "Positive?", "Mixed, leaning positive.", "Neutral, or positive",
                  "It's neither positive nor negative."])


def test_syllogism_checker_rejects_the_right_words_in_a_wrong_answer():
    from gptlab.tasks.syllogism import CATEGORIES

    ex = _find("syllogism", lambda e: not e.metadata["negative"] and not e.metadata["yes_no"])
    name, prop, category = ex.metadata["name"], ex.metadata["property"], ex.metadata["category"]
    plural = dict(CATEGORIES)[category]
    _judge("syllogism", ex, right=[f"{name} is {prop}.", f"{prop.capitalize()}.", ex.reference[0][0]["content"]],
           wrong=[f"All {plural} are {prop}.",  # the premise repeated: nothing concluded about the name
                  f"{name} may be {prop}.", f"{name} is probably {prop}.", f"{name} is {prop} or not.",
                  f"{name} is {prop}?", f"{name} is not {prop}."])
    ex = _find("syllogism", lambda e: e.metadata["negative"] and e.metadata["yes_no"])
    name, prop = ex.metadata["name"], ex.metadata["property"]
    _judge("syllogism", ex, right=["No.", f"No, {name} is not {prop}.", ex.reference[0][0]["content"]],
           wrong=["Yes and no.", f"No. Yes, {name} is {prop}.", f"{name} may not be {prop}.",
                  f"No, {name} might be {prop}."])
    ex = _find("syllogism", lambda e: not e.metadata["negative"] and e.metadata["yes_no"])
    name, prop = ex.metadata["name"], ex.metadata["property"]
    _judge("syllogism", ex, right=["Yes.", f"Yes, no doubt: {name} is {prop}."],
           wrong=["Yes or no.", "Yes. No.", f"Yes, {name} might be {prop}."])


def test_extraction_identity_checkers_reject_the_right_fields_in_a_wrong_answer():
    import json

    ex = _find("extraction", lambda e: e.metadata["kind"] == "person")
    fields = ex.metadata["fields"]
    right = json.dumps(fields)
    _judge("extraction", ex, right=[f"```json\n{right}\n```", json.dumps({"person": {"x": 1}, **fields})],
           wrong=[right + " Actually: " + json.dumps(dict(fields, age=fields["age"] + 1)),  # a second, other object
                  right[:-1] + f', "age": {fields["age"] + 1}}}',  # a key given twice
                  json.dumps(dict(fields, age=[fields["age"], fields["age"] + 1])),
                  json.dumps(dict(fields, name=fields["name"] + " or Mei Chen"))])
    ex = _find("identity", lambda e: e.question == "Are you ChatGPT?")
    _judge("identity", ex, right=[response_text(r) for r in ex.reference],
           wrong=["Yes. I am gptlab, an assistant.", "I was trained with gptlab, but I am ChatGPT, an AI assistant.",
                  "gptlab? Never heard of it. I'm an AI assistant.", "I'm gptlab, an assistant made by OpenAI.",
                  "I'm a human, not gptlab's assistant."])
    ex = _find("identity", lambda e: e.question == "Are you a human?")
    _judge("identity", ex, right=["No, I am not a human. I am gptlab, an AI assistant."],
           wrong=["Yes, I am a human, but also gptlab, an AI assistant.", "I am gptlab, an assistant. I am a person."])
    ex = _find("identity", lambda e: e.question == "Who are you?")
    _judge("identity", ex, right=["I\u2019m gptlab, an AI assistant.", "You can call me gptlab. I'm an AI assistant."],
           wrong=["I am Claude, a gptlab assistant.", "I'm Claude. gptlab is an assistant."])


def test_calculator_tool_is_safe_and_exact():
    rng = random.Random(0)
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod}
    for _ in range(200):
        a, b, op = rng.randint(-10**6, 10**6), rng.randint(1, 10**4), rng.choice(sorted(ops))
        assert calculate(f"{a} {op} {b}") == ops[op](a, b)
    assert calculator("7 / 2") == "3.5" and calculator("(2 + 3) * -4") == "-20" and calculator("2 ** 10") == "1024"
    assert calculator("6 / 3") == "2" and calculator("1 / 3") == "0.333333333333"
    for bad, message in [("__import__('os').system('true')", "unsupported syntax Call"),
                         ("x + 1", "unsupported syntax Name"), ("'a' * 3", "is not a number"),
                         ("True + 1", "is not a number"), ("[1, 2]", "unsupported syntax List"),
                         ("9 ** 9 ** 9", "power too large"), ("2 ** 1000", "power too large"),
                         ("10 ** 15 * 10 ** 15 * 10 ** 15 * 10 ** 15 * 10 ** 15", "result too large"),
                         ("1 / 0", "division by zero"), ("(-8) ** 0.5", "not a real number"),
                         ("1e300 * 1e300", r"number 1e\+300 is too large"), ("1 +", "cannot parse"), ("", "empty expression"),
                         ("1+" * 150 + "1", "longer than 200"), ("10000000000000000 + 1", "too large")]:
        with pytest.raises(GptlabError, match=message):
            calculate(bad)
    box = Toolbox([calculator])

    def run(call):
        return box.call_written(call).output

    assert run('{"name": "calculator", "arguments": {"expression": "12 * 34"}}') == "408"
    assert run({"name": "calculator", "arguments": '{"expression": "1+1"}'}) == "2"
    assert run("{not json") == "error: tool call is not valid JSON"
    assert run("I would call the calculator.") == "error: tool call is not valid JSON"
    # a small model's malformed call still runs, as the server would run it (tools/base.py docstring)
    for malformed in ('{"name": "calculator", "arguments": {"expression": "6 * 7",}}',
                      "{'name': 'calculator', 'arguments': {'expression': '6 * 7'}}",
                      '```json\n{"name": "calculator", "arguments": {"expression": "6 * 7"}}\n```',
                      '{"name": "calculator", "arguments": {"expression": "6 * 7"}'):
        with pytest.raises(json.JSONDecodeError):
            json.loads(malformed)
        assert run(malformed) == "42"
    assert run({"name": "calculator", "arguments": "{'expression': '6 * 7'}"}) == "42"
    assert run({"name": "calculator", "arguments": "six times seven"}).startswith("error: arguments of 'calculator' are not valid JSON")
    assert run('["calculator", {"expression": "1"}]').startswith("error: tool call ")
    assert run('{"name": "shell", "arguments": {}}').startswith("error: unknown tool 'shell'")
    assert run('{"name": "calculator", "arguments": {"expr": "1"}}').startswith("error: wrong arguments")
    assert run('{"name": "calculator", "arguments": {"expression": "1/0"}}') == "error: calculator: division by zero"


def test_calculator_reference_uses_the_tool():
    ex = get_task("calculator").generate(random.Random(5), "train")
    call, output, final = ex.reference[0]
    assert call["tool_calls"] == [{"name": "calculator", "arguments": {"expression": ex.metadata["expression"]}}]
    assert output == {"role": "tool", "content": ex.answer_text} and ex.answer_text in final["content"]
    assert ex.messages[0]["role"] == "system"


def test_split_of_assigns_the_requested_fraction():
    keys = [f"question {i}" for i in range(4000)]
    share = sum(split_of("t", k, 0.2) == "test" for k in keys) / len(keys)
    assert 0.18 < share < 0.22
    assert [split_of("t", k, 0.2) for k in keys[:50]] == [split_of("t", k, 0.2) for k in keys[:50]]
    assert {split_of("t", k, 0.0) for k in keys} == {"train"} and {split_of("t", k, 1.0) for k in keys} == {"test"}


def test_sample_examples_mixture():
    mix = sample_examples(["arithmetic", "knowledge", "identity"], 60, "test", seed=11)
    assert [e.messages for e in mix] == [e.messages for e in sample_examples(["arithmetic", "knowledge", "identity"],
                                                                             60, "test", seed=11)]
    assert {e.task for e in mix} == {"arithmetic", "knowledge", "identity"}
    assert all(e.metadata["split"] == "test" for e in mix)
    weighted = sample_examples({"sentiment": 1.0, "spelling": 0.0}, 30, "train", seed=1)
    assert {e.task for e in weighted} == {"sentiment"}
    assert {e.task for e in sample_examples(None, 200, "train", seed=2)} >= EXPECTED_TASKS
    with pytest.raises(GptlabError, match="unknown split 'dev'"):
        sample_examples(["arithmetic"], 1, "dev")
    with pytest.raises(GptlabError, match="unknown task"):
        sample_examples(["arithmetic", "bogus"], 1, "train")
    with pytest.raises(GptlabError, match="not all zero"):
        sample_examples({"arithmetic": 0}, 1, "train")
    with pytest.raises(GptlabError, match="no tasks"):
        sample_examples([], 1, "train")


def test_task_names_parses_every_spelling_of_the_option():
    """One parser for every stage's --tasks: all, a comma list (spaces and empty items ignored) or a list;
    'all' is the registry's own order, so a stage drawing from `None` and one given `task_names('all')`
    draw the same examples."""
    assert task_names(None) == task_names("all") == task_names(" all ") == list(TASKS) == sorted(TASKS)
    assert task_names("sentiment, arithmetic,,") == ["sentiment", "arithmetic"]
    assert task_names(("knowledge",)) == ["knowledge"] and task_names([]) == []
    assert [e.messages for e in sample_examples(task_names("all"), 40, "train", seed=5)] == \
        [e.messages for e in sample_examples(None, 40, "train", seed=5)]
    with pytest.raises(GptlabError, match=r"unknown task 'arithmatic' \(available: .*arithmetic"):
        task_names("sentiment,arithmatic")


def test_fact_pages_state_every_fact_truthfully():
    """The pretraining prose names every fact of both splits (so test questions ask what pretraining
    taught), and each sentence, read as an answer to its own fact's question, passes the gold checker: no
    sentence pairs a subject with another fact's answer, none states two facts."""
    from gptlab.tasks.knowledge import FACTS, RELATIONS, fact_pages

    text = fact_pages(pages=400, seed=1)
    assert text == fact_pages(pages=400, seed=1) and text != fact_pages(pages=400, seed=2)
    paragraphs = text.split("\n\n")
    assert len(paragraphs) == 400 and all(p.strip() for p in paragraphs)
    task = get_task("knowledge")
    stated = set()
    # a sentence ends at a period after a lower-case letter ("J. R. R. Tolkien" goes on) or after "D.C."
    boundary = re.compile(r"(?<=[a-zà-ÿ])\. (?=[A-Z])|(?<=D\.C\.) (?=[A-Z])")
    for sentence in (s for p in paragraphs for s in boundary.split(p)):
        # the facts whose subject the sentence names (Sweden has a capital and a currency): one must pass
        right = [f for f in FACTS if f.subject.lower() in sentence.lower() and task.check(
            Example("knowledge", [{"role": "user", "content": "?"}], f.answers[0], [f.answers[0]],
                    {"relation": f.relation, "subject": f.subject, "answers": list(f.answers)}), sentence)]
        assert len(right) == 1, sentence
        stated.add((right[0].relation, right[0].subject))
    assert stated == {(f.relation, f.subject) for f in FACTS}
    splits = {split_of("knowledge", f"{r}: {s}", task.test_fraction) for r, s in stated}
    assert splits == {"train", "test"} and set(RELATIONS) == {r for r, _ in stated}


def test_example_wraps_string_references():
    ex = Example("demo", [{"role": "user", "content": "q"}], "a", ["a", [{"role": "assistant", "content": "b"}]])
    assert ex.reference == [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]]
    assert ex.conversation(1)[-1]["content"] == "b" and ex.question == "q"
