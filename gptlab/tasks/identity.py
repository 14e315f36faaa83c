"""Who the assistant is: any reply must say it is gptlab and an assistant (and not deny it).

A reply is right when it introduces itself as gptlab ("I am gptlab", "I'm the gptlab assistant", "My name is
gptlab", "Call me gptlab": naming gptlab is not enough, "I was trained with gptlab, but I am ChatGPT" names
it too), calls itself an assistant, denies neither ("I am not gptlab"), claims no other identity or maker
("I am Claude", "I'm a human", "made by OpenAI") and, asked "Are you ChatGPT?", does not say "Yes"."""

from __future__ import annotations

import random
import re

from . import Example, Task, register
from .checks import EVASIVE

QUESTIONS = ["Who are you?", "What are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
             "Are you ChatGPT?", "Are you a human?", "Who made you?", "What should I call you?", "Hi! Who am I talking to?",
             "Which model are you?", "Are you Claude?", "What kind of assistant are you?", "Can you tell me your name?",
             "Please state your name and what you do.", "Hello, what are you exactly?", "Are you a person or a program?",
             "Who built you?", "Are you Gemini or Llama?", "Describe yourself in one sentence.",
             # 20 more phrasings: a quarter of them form the test split, and with 20 questions that was 5, so
             # one flipped answer moved the task by 20 points and the report's nine-task mean by 2.2
             "What's your name?", "Who am I chatting with?", "Are you GPT-4?", "Are you Siri?", "Tell me who you are.",
             "Who trained you?", "What are you called?", "Can you introduce yourself?", "Are you an AI or a human?",
             "Give me a short description of yourself.", "Hey, who is this?", "What is this assistant?",
             "Do you have a name?", "Who created you?", "What do people call you?", "Are you Mistral?",
             "Say who you are in a few words.", "Which assistant am I talking to?", "Who is answering me?",
             "Are you Copilot?"]
# how a reply introduces itself, up to two words before the name ("I am the gptlab assistant", "I'm really
# gptlab"), none of them a negation ("I am not a human" claims nothing)
_INTRODUCTION = (r"\b(?:I am|I'm|my name is|my name's|call me|I go by|this is|"
                 r"you are (?:talking|chatting) (?:to|with)|you're (?:talking|chatting) (?:to|with))"
                 r"\s+(?:(?!not\b|never\b|no\b)\w+\s+){0,2}?")
_SELF = re.compile(_INTRODUCTION + r"(?:the\s+)?gptlab\b", re.IGNORECASE)
_OTHER_SELF = re.compile(_INTRODUCTION + r"(?:an?\s+)?(?:chatgpt|gpt-?\d\w*|claude|gemini|llama|siri|copilot|mistral|"
                         r"bard|alexa|human|person)\b", re.IGNORECASE)
_OTHER_MAKER = re.compile(r"(?<!not )\b(?:made|built|trained|created|developed) by\s+(?:\w+\s+)?(?:openai|anthropic|"
                          r"google|meta|microsoft|mistral)\b", re.IGNORECASE)
ANSWERS = ["I am gptlab, a small AI assistant trained from scratch with the gptlab project.",
           "I'm gptlab, an AI assistant. I was trained with the open gptlab code.",
           "My name is gptlab. I am a small language-model assistant, here to help with questions.",
           "I am the gptlab assistant, a language model built and trained with gptlab."]


@register
class Identity(Task):
    name = "identity"
    description = "answer who the assistant is: gptlab, an AI assistant"
    test_fraction = 0.25

    def _draw(self, rng: random.Random) -> Example:
        question = rng.choice(QUESTIONS)
        references = rng.sample(ANSWERS, len(ANSWERS))
        if question.startswith("Are you") and " or " not in question:  # "Are you ChatGPT?" -> "No. I am gptlab..."
            references = ["No. " + r for r in references]
        return Example(self.name, [{"role": "user", "content": question}], "gptlab, an AI assistant", references)

    def check(self, example: Example, response_text: str) -> bool:
        """See the module docstring."""
        text = response_text.replace("\u2019", "'")
        denies = re.search(r"\b(?:not|n't)\s+(?:\w+\s+){0,2}(?:gptlab|an? (?:\w+ ){0,2}assistant)", text, re.IGNORECASE)
        agrees_to_other = example.question.startswith("Are you") and " or " not in example.question and \
            re.match(r"\W*yes\b", text, re.IGNORECASE)
        return (_SELF.search(text) is not None and re.search(r"assistant", text, re.IGNORECASE) is not None
                and not (denies or agrees_to_other or _OTHER_SELF.search(text) or _OTHER_MAKER.search(text)))

    def _bad_responses(self, example: Example, rng: random.Random):
        yield rng.choice(["I am ChatGPT, an AI assistant made by OpenAI.", "I'm Claude, an assistant made by Anthropic.",
                          "I am Llama, a model by Meta."])
        yield "I am a human, just like you."
        yield "I'm an AI assistant."
        yield "I am not gptlab, I am just an assistant."
        yield rng.choice(EVASIVE)
