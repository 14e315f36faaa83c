"""Who the assistant is: any reply must say it is gptlab and an assistant (and not deny it)."""

from __future__ import annotations

import random
import re

from . import Example, Task, register
from .checks import EVASIVE, mentions

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
        denies = re.search(r"\b(?:not|n't)\s+(?:\w+\s+){0,2}(?:gptlab|an? (?:\w+ ){0,2}assistant)", response_text,
                           re.IGNORECASE)
        return mentions(response_text, "gptlab") and re.search(r"assistant", response_text, re.IGNORECASE) is not None \
            and not denies

    def _bad_responses(self, example: Example, rng: random.Random):
        yield rng.choice(["I am ChatGPT, an AI assistant made by OpenAI.", "I'm Claude, an assistant made by Anthropic.",
                          "I am Llama, a model by Meta."])
        yield "I am a human, just like you."
        yield "I'm an AI assistant."
        yield "I am not gptlab, I am just an assistant."
        yield rng.choice(EVASIVE)
