"""Collect real malformed JSON replies: SmolLM2-135M-Instruct asked for JSON without constraints.

Every (schema, prompt) of bench/data/structured_schemas.json is asked in three styles (the JSON Schema in the
system prompt, its keys in words, or just "answer in JSON"), sampled at temperature 0.7 (seeded) so the
corpus is varied. Replies that `json.loads` rejects are appended to the JSONL output, one
{"schema", "prompt", "style", "reply", "finish_reason", "model"} object per line (lines without "model" are
SmolLM2's); a rerun skips what is already there (resumable per model: the machine is shared and runs get
interrupted). bench_structured.py's defensive-parsing section reads the file. Any gptlab model directory
works (the speedrun's SFT and RL models too: a request whose prompt plus --max-new-tokens does not fit the
model's context window is skipped and counted).

    python bench/collect_json_corpus.py --out bench/data/json_replies.jsonl --max-new-tokens 64 --batch 30
    python bench/collect_json_corpus.py --model /work/sr_final/runs/default/sft/model --label speedrun-sft
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gptlab.apps.llm import open_llm
from gptlab.chat import render_for_completion
from gptlab.infer.sampling import SamplingParams

DATA = Path(__file__).parent / "data"
STYLES = ("schema", "keys", "plain")


def describe_keys(schema: dict) -> str:
    """A schema's top-level keys in words, e.g. 'name (string), age (integer)' (anyOf: its branches)."""
    if "anyOf" in schema:
        return " or ".join("{" + describe_keys(branch) + "}" for branch in schema["anyOf"])

    def kind(spec):
        if "enum" in spec:
            return "one of " + "/".join(map(str, spec["enum"]))
        if "const" in spec:
            return json.dumps(spec["const"])
        if spec.get("type") == "array":
            items = spec["items"]
            return "array of " + ("objects with " + describe_keys(items) if "properties" in items
                                  else items.get("type", "values"))
        if spec.get("type") == "object":
            return "object with " + describe_keys(spec)
        return spec.get("type", "value")
    return ", ".join(f"{key} ({kind(spec)})" for key, spec in schema["properties"].items())


def system_prompt(schema: dict, style: str) -> str:
    if style == "schema":
        return "Reply with only a JSON object matching this JSON schema: " + json.dumps(schema)
    if style == "keys":
        return "Reply with only a JSON object with the keys " + describe_keys(schema) + "."
    return "Answer in JSON."


def chat_ids(tokenizer, schema: dict, prompt: str, style: str) -> list[int]:
    return render_for_completion(tokenizer, [{"role": "system", "content": system_prompt(schema, style)},
                                             {"role": "user", "content": prompt}])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--label", default="smollm2", help="the model's name in the corpus")
    parser.add_argument("--out", default=str(DATA / "json_replies.jsonl"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--first", type=int, default=0, help="start at this request (to split a run in parts)")
    parser.add_argument("--limit", type=int, default=None, help="stop before this request")
    args = parser.parse_args()
    torch.set_num_threads(1)
    llm = open_llm(args.model)
    entries = json.loads((DATA / "structured_schemas.json").read_text())
    jobs = [(e["name"], e["schema"], prompt, style) for style in STYLES for e in entries for prompt in e["prompts"]]
    out = Path(args.out)
    done_file = out.with_suffix(f".{args.label}.done")  # requests already asked (malformed or not), for resuming
    done = int(done_file.read_text()) if done_file.exists() else args.first
    jobs = jobs[done:args.limit]
    started, too_long = time.perf_counter(), 0
    for k in range(0, len(jobs), args.batch):
        chunk = jobs[k:k + args.batch]
        ids = [chat_ids(llm.tokenizer, schema, prompt, style) for _, schema, prompt, style in chunk]
        fits = [len(i) + args.max_new_tokens <= llm.engine.window for i in ids]
        too_long += fits.count(False)
        chunk = [job for job, ok in zip(chunk, fits) if ok]
        ids = [i for i, ok in zip(ids, fits) if ok]
        params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.7, seed=done + k + j)
                  for j in range(len(chunk))]
        replies = llm.engine.generate(ids, params) if ids else []
        with out.open("a", encoding="utf-8") as f:
            for (name, _, prompt, style), reply in zip(chunk, replies):
                try:
                    json.loads(reply.text)
                    continue
                except json.JSONDecodeError:
                    pass
                f.write(json.dumps({"schema": name, "prompt": prompt, "style": style, "reply": reply.text,
                                    "finish_reason": reply.finish_reason, "model": args.label},
                                   ensure_ascii=False) + "\n")
        asked = done + min(k + args.batch, len(jobs))
        done_file.write_text(str(asked))
        print(f"{asked} requests ({too_long} skipped: too long for the context window), "
              f"{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
