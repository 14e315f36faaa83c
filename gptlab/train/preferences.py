"""Preference data: prompts with completions ranked best to worst, read from JSONL or generated from the
embedded task suite, and turned into token batches for the reward model (`gptlab.train.reward`) and DPO.

Design decisions
- One in-memory form, `PreferenceSet(prompt, tiers)`: the prompt messages and the completions grouped in
  tiers, best tier first. Every completion of a tier is preferred to every completion of every later
  tier; completions within a tier are not compared. A TRL pair is two tiers of one completion, a K-way
  ranking is K tiers of one, a task example is [its references, its bad responses] (all references are
  correct, and wrong / evasive / malformed answers are not ranked among themselves), and model samples
  judged by a gold checker are [correct samples, incorrect samples].
- All pairs of a set train together: InstructGPT (Ouyang et al. 2022, section 3.5) puts the K choose 2
  comparisons of one prompt in one batch element instead of shuffling them as independent pairs, which
  overfits (each completion would be seen K - 1 times per epoch) and costs K - 1 forward passes per
  completion instead of one. `collate` therefore lays out each completion once and lists the pairs as
  row indices; the loss is averaged over a set's pairs, then over sets.
- File formats (JSONL, one object a line; blank lines skipped; every error names `file:line`):
      {"prompt": P, "chosen": C, "rejected": R}        TRL's explicit-prompt preference format
      {"chosen": [messages], "rejected": [messages]}   TRL's implicit prompt: the shared leading messages
      {"prompt": P, "ranked": [best, ..., worst]}      K-way ranking (K >= 2)
      {"prompt": P, "tiers": [[best, ...], ..., [worst, ...]]}   tiers (>= 2, none empty): within a tier
                                                       not compared; the task suite's sets are two tiers
  `write_preferences_jsonl` writes each set in the first of these that expresses it exactly, so a file
  written and read back gives the same sets (`gptlab tasks export` writes the task-suite data this way).
  A prompt is a string (one user message) or a message list ending where the assistant speaks next; a
  completion is a string (one assistant message) or a list of assistant/tool messages (tool calls
  included). Identical completions on two sides of a comparison are an error, not a silent zero-gradient
  pair: they usually mean a broken export.
- Token layout: each completion is rendered with its prompt by `gptlab.chat.render`, so the sequence ends
  with the completion's `<|assistant_end|>` (the reward model reads that position) and `completion_mask`
  marks exactly the tokens the assistant writes in the completion (DPO sums log-probabilities over them;
  the prompt, `<|assistant_start|>` and tool outputs are excluded).
- Padding: a batch's rows range from a one-line answer to an extraction prompt, and right-padding them all to
  the longest wastes half the forward pass (47% real tokens in the CPU preset's RM batches). `by_length`
  runs the model on the rows sorted by length in LENGTH_GROUPS groups, each padded only to its own longest
  row (82% real): the same scores (rows never attend to padding), ~1.5x faster steps on CPU (docs/LOG.md).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..chat import Message, completion_text, render, render_for_completion, validate_messages
from ..common import GptlabError, atomic_write_text, get_logger, iter_records
from ..infer.engine import Engine, default_batch_size
from ..infer.sampling import SamplingParams
from ..model import GPT
from ..tasks import Example, get_task, sample_examples, task_names
from ..tokenizer import Tokenizer

log = get_logger("preferences")

Completion = list[Message]


@dataclass
class PreferenceSet:
    prompt: list[Message]
    tiers: list[list[Completion]]  # best tier first; each completion is a list of messages

    def completions(self) -> list[Completion]:
        return [c for tier in self.tiers for c in tier]

    def pairs(self) -> list[tuple[int, int]]:
        """(better, worse) indices into `completions()`: every completion against every one of a later tier."""
        starts = [0]
        for tier in self.tiers:
            starts.append(starts[-1] + len(tier))
        return [(i, j) for t in range(len(self.tiers)) for i in range(starts[t], starts[t + 1])
                for j in range(starts[t + 1], starts[-1])]


# ---- parsing ----------------------------------------------------------------------------------------------
def _prompt(value: Any) -> list[Message]:
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    return validate_messages(value, complete=False)


def _completion(prompt: list[Message], value: Any, what: str) -> Completion:
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise GptlabError(f"{what} must be a string or a non-empty list of messages")
    if not isinstance(value[0], dict) or value[0].get("role") != "assistant":
        raise GptlabError(f"{what} must start with an assistant message")
    try:
        full = validate_messages(prompt + value, complete=True)
    except GptlabError as e:
        raise GptlabError(f"{what}: {e}") from None
    return full[len(prompt):]


def _split_implicit(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """TRL's implicit-prompt rows hold two whole conversations: the prompt is their longest common prefix
    that ends where the assistant speaks next."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise GptlabError("without a 'prompt', 'chosen' and 'rejected' must be whole conversations (message lists)")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and not (isinstance(chosen[shared - 1], dict) and chosen[shared - 1].get("role") in ("user", "tool")):
        shared -= 1
    if not shared:
        raise GptlabError("'chosen' and 'rejected' share no prompt "
                          "(no common leading messages ending with a user message)")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def parse_preference(record: Any) -> PreferenceSet:
    """One JSONL record in any of the formats of the module docstring."""
    if not isinstance(record, dict):
        raise GptlabError(f"expected a JSON object, got {type(record).__name__}")
    if "tiers" in record:
        if "prompt" not in record:
            raise GptlabError("a 'tiers' record needs a 'prompt'")
        raw_tiers = record["tiers"]
        if (not isinstance(raw_tiers, list) or len(raw_tiers) < 2
                or not all(isinstance(t, list) and t for t in raw_tiers)):
            raise GptlabError("'tiers' must be a list of at least 2 non-empty lists of completions, best first")
        prompt = _prompt(record["prompt"])
        tiers = [[_completion(prompt, c, f"tiers[{t}][{i}]") for i, c in enumerate(tier)]
                 for t, tier in enumerate(raw_tiers)]
    elif "ranked" in record:
        if "prompt" not in record:
            raise GptlabError("a 'ranked' record needs a 'prompt'")
        ranked = record["ranked"]
        if not isinstance(ranked, list) or len(ranked) < 2:
            raise GptlabError("'ranked' must be a list of at least 2 completions, best first")
        prompt = _prompt(record["prompt"])
        tiers = [[_completion(prompt, c, f"ranked[{i}]")] for i, c in enumerate(ranked)]
    elif "chosen" in record and "rejected" in record:
        if "prompt" in record:
            raw_prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
        else:
            raw_prompt, chosen, rejected = _split_implicit(record["chosen"], record["rejected"])
        prompt = _prompt(raw_prompt)
        tiers = [[_completion(prompt, chosen, "chosen")], [_completion(prompt, rejected, "rejected")]]
    else:
        raise GptlabError("expected 'prompt' + 'chosen' + 'rejected', 'prompt' + 'ranked', or 'prompt' + 'tiers'")
    pset = PreferenceSet(prompt, tiers)
    check_distinct(pset)
    return pset


def check_distinct(pset: PreferenceSet) -> None:
    """A completion compared with itself would teach nothing and usually means a broken export."""
    completions = pset.completions()
    for i, j in pset.pairs():
        if completions[i] == completions[j]:
            if len(pset.tiers) == 2 and all(len(t) == 1 for t in pset.tiers):
                raise GptlabError("chosen and rejected are the same completion")
            raise GptlabError(f"completions {i} and {j} are identical but ranked differently")


def read_preferences_jsonl(path: str | os.PathLike) -> list[PreferenceSet]:
    """All preference sets of a JSONL file, or of a Hugging Face dataset with the same columns (a
    `save_to_disk` folder or `hf:NAME[:SPLIT]`, e.g. TRL's preference datasets); any error names `file:line`
    (or `dataset[row]`)."""
    sets = []
    for where, record in iter_records(path, "preference file"):
        try:
            sets.append(parse_preference(record))
        except GptlabError as e:
            raise GptlabError(f"{where}: {e}") from None
    if not sets:
        raise GptlabError(f"{path} holds no preference records")
    return sets


def preference_record(pset: PreferenceSet) -> dict[str, Any]:
    """`pset` as a JSON object in the simplest file format that expresses it exactly (module docstring)."""
    if any(len(tier) != 1 for tier in pset.tiers):
        return {"prompt": pset.prompt, "tiers": pset.tiers}
    if len(pset.tiers) == 2:
        return {"prompt": pset.prompt, "chosen": pset.tiers[0][0], "rejected": pset.tiers[1][0]}
    return {"prompt": pset.prompt, "ranked": [tier[0] for tier in pset.tiers]}


def write_preferences_jsonl(path: str | os.PathLike, sets: Sequence[PreferenceSet]) -> int:
    """Write preference sets as JSONL (atomically); returns how many were written."""
    atomic_write_text(path, "".join(json.dumps(preference_record(s), ensure_ascii=False) + "\n" for s in sets))
    return len(sets)


# ---- generated from the task suite ------------------------------------------------------------------------
def task_preferences(examples: Sequence[Example], seed: int = 0) -> list[PreferenceSet]:
    """For each task example: its references (correct, helpful) above its task's bad responses (wrong,
    evasive, malformed)."""
    rng = random.Random(seed)
    sets = []
    for example in examples:
        bad = get_task(example.task).bad_responses(example, rng)
        sets.append(PreferenceSet(list(example.messages), [list(example.reference), bad]))
    return sets


def generate_completions(model: GPT, tokenizer: Tokenizer, examples: Sequence[Example], params: SamplingParams,
                         samples_per_prompt: int = 1, batch_size: int | None = None) -> list[list[str]]:
    """`samples_per_prompt` completions (assistant text, tool blocks left out) for each example's prompt
    (`batch_size` prompts per generate call; default: `engine.default_batch_size`)."""
    engine = Engine(model, tokenizer)
    batch_size = batch_size or default_batch_size(model, cpu=32)
    prompts = [render_for_completion(tokenizer, e.messages) for e in examples for _ in range(samples_per_prompt)]
    texts: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        # distinct seeds per batch: the engine seeds row r with seed + r
        batch_params = params if params.seed is None else replace(params, seed=params.seed + start)
        for completion in engine.generate(prompts[start:start + batch_size], batch_params):
            texts.append(completion_text(tokenizer, completion.token_ids))
    model.train(was_training)
    return [texts[i:i + samples_per_prompt] for i in range(0, len(texts), samples_per_prompt)]


def sampled_preferences(model: GPT, tokenizer: Tokenizer, examples: Sequence[Example], k: int,
                        temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0) -> list[PreferenceSet]:
    """Sample `k` completions per prompt from a policy and rank them by the gold checker: correct above
    incorrect. Prompts whose samples are all correct or all incorrect give no comparison and are dropped,
    as are empty and duplicate samples."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    sets = []
    for example, texts in zip(examples, generate_completions(model, tokenizer, examples, params, k)):
        task, tiers = get_task(example.task), ([], [])
        for text in dict.fromkeys(t.strip() for t in texts):
            if text:
                tiers[0 if task.check(example, text) else 1].append([{"role": "assistant", "content": text}])
        if tiers[0] and tiers[1]:
            sets.append(PreferenceSet(list(example.messages), list(tiers)))
    log.info("policy samples: %d of %d prompts had both correct and incorrect samples", len(sets), len(examples))
    return sets


def default_preferences(tasks: str, n: int, split: str, seed: int) -> list[PreferenceSet]:
    """`n` task-suite preference sets of `split` ('train' or 'test', disjoint by construction)."""
    return task_preferences(sample_examples(task_names(tasks), n, split, seed=f"{seed}-{split}"), seed=seed)


# ---- tokens -----------------------------------------------------------------------------------------------
@dataclass
class EncodedSet:
    ids: list[list[int]]  # one row per completion: prompt + completion, ending with <|assistant_end|>
    completion_mask: list[list[int]]  # 1 on the completion tokens the assistant writes
    pairs: list[tuple[int, int]]  # (better, worse) row indices


def encode_set(tokenizer: Tokenizer, pset: PreferenceSet) -> EncodedSet:
    prompt_len = len(render_for_completion(tokenizer, pset.prompt))
    ids, masks = [], []
    for completion in pset.completions():
        rendered = render(tokenizer, pset.prompt + completion)
        ids.append(rendered.ids)
        masks.append([0] * prompt_len + rendered.mask[prompt_len:])
    return EncodedSet(ids, masks, pset.pairs())


def encode_sets(tokenizer: Tokenizer, sets: Sequence[PreferenceSet], max_len: int, what: str) -> list[EncodedSet]:
    """Encode every set; sets with a completion longer than `max_len` tokens are dropped (cutting one
    completion would bias the comparison), with a warning."""
    encoded = [encode_set(tokenizer, s) for s in sets]
    kept = [e for e in encoded if max(map(len, e.ids)) <= max_len and e.pairs]
    if len(kept) < len(encoded):
        log.warning("%s: dropped %d of %d preference sets longer than %d tokens", what, len(encoded) - len(kept),
                    len(encoded), max_len)
    if not kept:
        raise GptlabError(f"{what}: no preference set fits in {max_len} tokens")
    return kept


@dataclass
class PreferenceBatch:
    ids: torch.Tensor  # (N, T) right-padded completions of all sets
    attn_mask: torch.Tensor  # (N, T) True on real tokens
    completion_mask: torch.Tensor  # (N, T) 1 on completion tokens
    pairs: torch.Tensor  # (P, 2) rows (better, worse)
    pair_set: torch.Tensor  # (P,) index of the set each pair belongs to
    rows: torch.Tensor  # (N,) global row index of each completion (for precomputed per-row values)

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(*(t.to(device) for t in (self.ids, self.attn_mask, self.completion_mask, self.pairs,
                                                       self.pair_set, self.rows)))


def row_offsets(sets: Sequence[EncodedSet]) -> list[int]:
    """Global index of each set's first row when all sets' completions are numbered in order."""
    offsets, total = [], 0
    for s in sets:
        offsets.append(total)
        total += len(s.ids)
    return offsets + [total]


def collate(sets: Sequence[EncodedSet], set_indices: Sequence[int], offsets: Sequence[int],
            pad_id: int) -> PreferenceBatch:
    """Sets `set_indices` of `sets` as one right-padded batch; `offsets` from `row_offsets(sets)`."""
    chosen = [sets[i] for i in set_indices]
    width = max(len(ids) for s in chosen for ids in s.ids)
    n = sum(len(s.ids) for s in chosen)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.bool)
    cmask = torch.zeros((n, width), dtype=torch.long)
    pairs, pair_set, rows = [], [], []
    row = 0
    for b, (i, s) in enumerate(zip(set_indices, chosen)):
        pairs += [(row + a, row + c) for a, c in s.pairs]
        pair_set += [b] * len(s.pairs)
        for k, (seq, mask) in enumerate(zip(s.ids, s.completion_mask)):
            ids[row, :len(seq)] = torch.tensor(seq)
            attn[row, :len(seq)] = True
            cmask[row, :len(seq)] = torch.tensor(mask)
            rows.append(offsets[i] + k)
            row += 1
    return PreferenceBatch(ids, attn, cmask, torch.tensor(pairs, dtype=torch.long).view(-1, 2),
                           torch.tensor(pair_set, dtype=torch.long), torch.tensor(rows, dtype=torch.long))


LENGTH_GROUPS = 4  # 1: 47% of the padded tokens are real, 2: 67%, 4: 82%, 8: 91% (CPU preset's RM batches)
RowScorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def by_length(score_rows: RowScorer, batch: PreferenceBatch, groups: int = LENGTH_GROUPS) -> torch.Tensor:
    """`score_rows(ids, attn_mask, completion_mask) -> (rows,)` applied to the batch's rows sorted by length
    and cut into `groups` groups of equal count, each trimmed to its longest row; the scores (N,) in batch
    order. Equal to one call on the whole batch up to float rounding, since right-padded rows never attend to
    their padding; gradients flow through as usual. Four groups keep each matmul large enough on CPU (about
    20 rows a group in the CPU preset) while cutting the padded area by 1.7x."""
    lengths = batch.attn_mask.sum(1)
    order = lengths.argsort(stable=True)
    scores = []
    for rows in order.tensor_split(min(groups, len(order))):
        width = int(lengths[rows].max())
        scores.append(score_rows(batch.ids[rows, :width], batch.attn_mask[rows, :width],
                                 batch.completion_mask[rows, :width]))
    return torch.cat(scores)[order.argsort()]
