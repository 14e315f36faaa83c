"""Evaluation: val bits per byte, multiple choice by log-likelihood, and gold accuracy on the task suite.

    gptlab eval --model runs/X/pretrain/model --data runs/X/data            # a base model, few-shot
    gptlab eval --model runs/X/sft/model --mode chat --tasks arithmetic,knowledge

Files: `loss.py` (1), `choice.py` (2), `gold.py` (3 and reward-model pairs), `report.py` (all of them
together, the report and the command line), `stats.py` (accuracy with its standard error).

Writes `eval.json` (every figure, per-item scores, sample transcripts) and `eval.md` (tables + transcripts)
to `--out` (default: `eval/` beside the model directory). The Python API (`evaluate_model`,
`gold_accuracy`, `multiple_choice_accuracy`, `val_bits_per_byte`, `pairwise_accuracy`) is what the
speedrun calls.

Design decisions
- Three views of a model, cheapest first, because each answers a different question:
  1. Val loss and bits per byte on a prepared dataset (`gptlab.eval.loss.evaluate`, shared with pretraining): how well it models
     text. Bits per byte compares across tokenizers.
  2. Multiple choice by log-likelihood (`gptlab/evals/choices.toml`, written for gptlab): minimal pairs
     such as "The keys to the cabinet {are|is} on the table." in six categories (grammar, lexical
     semantics, world knowledge, sentiment, translation, arithmetic). Each alternative is scored as the
     continuation "alternative + rest of the sentence" given the text before the braces, so agreement that
     shows only later in the sentence counts; whitespace before the braces moves into the continuation
     because BPE tokens carry their leading space. Two rules: the sum of token log-probs (which alternative
     the model would rather write), and the sum divided by the continuation's UTF-8 bytes (the
     lm-evaluation-harness `acc_norm` idea: long alternatives are not punished for being long). No
     generation is needed, so this measures a base model from the first steps on, long before it can
     follow a prompt. Most items come in mirrored pairs (cat/chat and dog/chien, puppy -> dog and kitten
     -> cat), so a model that merely prefers the more frequent word scores chance on them. The rest are not
     neutral: a wrong form ("goodest") is rarer and splits into more tokens, so the report also gives the
     token-count baselines (fewest tokens wins), which is where a model that knows nothing lands (a
     uniform model exactly, a random-init one nearly). Ties count 1/k (the expected score of a random tie-break): a model that scores every
     alternative equally gets chance, not the credit of the correct alternative being listed first.
  3. Gold accuracy on the embedded task suite (`gptlab.tasks`, test split; the task's checker decides).
     Base models are prompted (Karpathy, State of GPT 2023: a base model completes documents, so make the
     answer the likely continuation of a document): style `qa` is a plain few-shot document, style
     `assistant` a "fake assistant document" that frames the text as a conversation with a helpful AI
     assistant. Base prompts start with `<|endoftext|>`, as every pretraining document does. Tuned models get the chat format
     (`chat.render_for_completion`), zero-shot by default; shots become earlier conversation turns.
     Decoding is greedy (the answer the model is most sure of; no sampling noise in a figure).
     The exact prompts (strings compared in tests/test_eval.py):
         qa:          "Q: <question>\\nA: <answer>\\n\\n" per shot, then "Q: <question>\\nA:"
         assistant:   ASSISTANT_HEADER, then "User: <question>\\nAssistant: <answer>\\n\\n" per shot,
                      then "User: <question>\\nAssistant:"
     A shot's answer is the assistant text of the task's first reference response
     (`chat.response_text`). System messages (the calculator's tool hint) are left out of base prompts:
     a base model cannot call tools. Generation stops at a blank line or the next "Q:"/"User:" label.
- Chat generation runs tool calls in line (`gptlab.infer.rollout.generate_chat`, shared with RL): decoding stops
  at `<|tool_call_end|>`, the call runs through `Toolbox.call_written` (gptlab/tools), and the output block is
  appended before decoding continues (the same layout `chat.render` trains on), at most
  `rollout.MAX_TOOL_CALLS` times per answer. The checker reads `chat.completion_text` (assistant text
  without tool blocks).
- Examples are distinct test questions drawn with a per-task seed, so every model sees the same questions
  and figures are comparable across runs. Shots are drawn from the train split (disjoint by
  construction), a fresh seeded set per question so the figure averages over the choice of shots. A
  task whose train split has fewer distinct questions than `shots` is an error, not a silent repeat.
  When a prompt would not leave `max_new_tokens` of room in the context window, its oldest shots are
  dropped (counted in the report as `shots_dropped`) rather than cutting a shot in half.
- Every accuracy comes with n and its binomial standard error sqrt(p(1-p)/n), because n is small (tens)
  on a laptop and differences of a few points are noise.
- Reward models plug in through `pairwise_accuracy(scorer)`: any callable that scores conversations, so
  the figure does not depend on how a reward model is stored; `--reward-model DIR` passes
  `gptlab.reward_model.RewardModel.load(DIR).score`. Pairs are held out: test questions, reference vs a bad response.
"""

from .choice import ChoiceItem, load_choice_items, multiple_choice_accuracy, parse_choice_item, score_choices
from .gold import (ASSISTANT_HEADER, STYLES, ConversationScorer, PromptStyle, build_prompt, chat_messages, draw_shots,
                   eval_examples, gold_accuracy, pairwise_accuracy, preference_pairs)
from .loss import evaluate, val_bits_per_byte
from .report import evaluate_model, render_markdown, run_eval, write_report
