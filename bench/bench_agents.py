"""Tool-use gain of the ReAct loop: accuracy with vs without tools on the task suite's `calculator` and
`word_problems` questions and on generated multi-digit arithmetic; steps and tokens per solved task; the
rate of malformed actions with and without defensive parsing.

- Without tools: the question alone as the user message, one greedy reply, checked by the task's own
  checker (multi-digit: `checks.states_number`, the calculator task's rule).
- With tools: `run_agent` with the calculator tool under each of --protocols (text: the plain text protocol
  with repairs; grammar: every reply constrained to a well-formed step, in-process backends only; auto:
  native where the backend has tool tokens), greedy, at most --max-steps model calls; the final answer is
  checked; a run that reaches the budget without one is wrong. "grammar+final": the grammar protocol
  with the last step constrained to a final answer (`run_agent(answer_last_step=True)`).
- --reuse-baseline: take "without tools" from a row already in --out for the same model, suite and n
  (it does not depend on the protocol: same greedy replies to the same questions) instead of re-asking.
- Malformed rate: of all replies the model wrote in the tool runs, the share the loop could not act on
  (neither a final answer nor a usable action). "with repair" is what the loop did (structured.parse_json,
  lenient tool names, bare values); "without" re-reads the SAME replies with `parse_reply(repair=False)`
  (exact JSON, exact name): a counterfactual on identical replies, not a second run.

    python bench/bench_agents.py --models smollm2-135m-instruct --n 20 --max-steps 3 --protocols text,grammar
    python bench/bench_agents.py --base-url http://127.0.0.1:8000/v1 --n 30     # any OpenAI-compatible server
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import random
import statistics
import time
from pathlib import Path

from gptlab.apps.agents import Trace, parse_reply, run_agent
from gptlab.apps.llm import open_llm
from gptlab.eval.stats import wilson_interval
from gptlab.tasks import Example, get_task, sample_examples
from gptlab.tasks.checks import states_number
from gptlab.tools import Toolbox
from gptlab.tools.calculator import calculator

RESULTS = Path(__file__).parent / "results"
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def multidigit(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, op = rng.randint(100, 9999), rng.randint(10, 999), rng.choice("+-*")
        out.append((f"What is {a} {op} {b}?", str(OPS[op](a, b))))
    return out


def suites(n: int, seed: int) -> dict[str, list[tuple[str, object]]]:
    """{suite: [(question, checker-or-answer)]}: the question alone, as a user asks it."""
    def task_items(name: str) -> list[tuple[str, Example]]:
        examples = sample_examples([name], n, "test", seed)
        return [(next(m["content"] for m in e.messages if m["role"] == "user"), e) for e in examples]

    return {"calculator": task_items("calculator"), "word_problems": task_items("word_problems"),
            "multidigit": multidigit(n, seed)}


def correct(item, text: str) -> bool:
    if isinstance(item, Example):
        return get_task(item.task).check(item, text)
    return states_number(text, item)


def measure(llm, items, box: Toolbox, max_steps: int, max_tokens: int, trace_dir: Path, suite: str,
            protocol: str, baseline: float | None = None) -> dict:
    if baseline is None:
        plain = [correct(item, llm.chat([{"role": "user", "content": q}], max_tokens=max_tokens)[0].text)
                 for q, item in items]
        baseline = sum(plain) / len(items)
    solved, steps, tokens, replies, bad_repaired, bad_strict, finished = [], [], [], 0, 0, 0, 0
    with Trace(trace_dir / f"{suite}_{protocol}.jsonl") as trace:
        for q, item in items:
            start = len(trace.events)
            r = run_agent(llm, q, box, max_steps=max_steps, protocol=protocol.removesuffix("+final"),
                          answer_last_step=protocol.endswith("+final"), trace=trace, max_tokens=max_tokens,
                          agent=suite)
            ok = r.finished and correct(item, r.answer)
            solved.append(ok)
            finished += r.finished
            if ok:
                steps.append(r.steps)
                tokens.append(r.prompt_tokens + r.completion_tokens)
            for e in trace.events[start:]:
                if e["event"] == "llm" and not e.get("tool_calls"):
                    replies += 1
                    strict = parse_reply(e["reply"].strip(), box, repair=False)
                    bad_strict += strict.final is None and strict.problem is not None
                if e["event"] == "malformed":
                    bad_repaired += 1
    mean = lambda xs: round(statistics.mean(xs), 2) if xs else None  # noqa: E731
    return {"n": len(items), "acc_without": baseline, "acc_with": sum(solved) / len(items),
            "finished": finished / len(items), "steps_per_solved": mean(steps), "tokens_per_solved": mean(tokens),
            "replies": replies, "malformed_with_repair": bad_repaired / max(replies, 1),
            "malformed_without_repair": bad_strict / max(replies, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["smollm2-135m-instruct"], help="model dirs or registry names")
    ap.add_argument("--base-url", default=None, help="also measure the model this OpenAI-compatible server serves")
    ap.add_argument("--model-name", default=None)
    ap.add_argument("--n", type=int, default=20, help="questions per suite")
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--suites", default="calculator,word_problems,multidigit", help="comma-separated")
    ap.add_argument("--protocols", default="text,grammar", help="comma-separated: text, grammar, grammar+final, "
                    "native, auto")
    ap.add_argument("--reuse-baseline", action="store_true", help="module docstring")
    ap.add_argument("--out", default=str(RESULTS / "agents.json"))
    args = ap.parse_args()
    items = {name: chosen for name, chosen in suites(args.n, args.seed).items() if name in args.suites.split(",")}
    box = Toolbox([calculator])
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for model, rows in results.items():  # files written before protocols were a column: all text protocol
        if any("n" in row for row in rows.values()):
            results[model] = {"text": rows}
    backends = [(m, lambda m=m: open_llm(m, threads=1)) for m in args.models]
    if args.base_url:
        backends.append((f"{args.base_url} ({args.model_name or 'served model'})",
                         lambda: open_llm(base_url=args.base_url, model_name=args.model_name)))
    for label, make in backends:
        llm = make()
        name = os.path.basename(label.rstrip("/"))
        for suite, suite_items in items.items():
            for protocol in args.protocols.split(","):
                earlier = [rows[suite] for rows in results.get(name, {}).values()
                           if suite in rows and rows[suite]["n"] == len(suite_items)]
                baseline = earlier[0]["acc_without"] if args.reuse_baseline and earlier else None
                start = time.perf_counter()
                row = measure(llm, suite_items, box, args.max_steps, args.max_tokens,
                              out.parent / "agents_traces" / name, suite, protocol, baseline)
                row["baseline_reused"] = baseline is not None
                row["seconds"] = round(time.perf_counter() - start, 1)
                row["load_average"] = round(os.getloadavg()[0], 2)
                results.setdefault(name, {}).setdefault(protocol, {})[suite] = row
                print(name, protocol, suite, json.dumps(row), flush=True)
                out.write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, args, out.with_suffix(".md"))


def write_markdown(results: dict, args, path: Path) -> None:
    lines = ["# Tool-use gain (bench/bench_agents.py)\n",
             f"Greedy; with tools: ReAct loop, calculator tool, at most {args.max_steps} model calls, "
             f"{args.max_tokens} tokens per reply; seed {args.seed}. Protocol text: the ReAct format with defensive "
             "repairs; grammar: each reply constrained to a well-formed step (apps/agents/grammar.py). "
             "\"without tools\" does not depend on the protocol: rows run with --reuse-baseline take it from "
             "an earlier row of the same model, suite and n.\n",
             "| model | protocol | suite | n | acc. without tools [95% Wilson] | acc. with tools [95% Wilson] | final answer given | steps / solved | "
             "tokens / solved | malformed (repair) | malformed (no repair) | s | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def acc(value: float, n: int) -> str:
        low, high = wilson_interval(round(value * n), n)
        return f"{value:.2f} [{low:.2f}, {high:.2f}]"

    for model, protocols in results.items():
        for protocol, rows in protocols.items():
            for suite, r in rows.items():
                lines.append(f"| {model} | {protocol} | {suite} | {r['n']} | {acc(r['acc_without'], r['n'])} | "
                             f"{acc(r['acc_with'], r['n'])} | {r['finished']:.2f} | {r['steps_per_solved'] or '-'} | "
                             f"{r['tokens_per_solved'] or '-'} | "
                             f"{r['malformed_with_repair']:.2f} | {r['malformed_without_repair']:.2f} "
                             f"(of {r['replies']} replies) | {r['seconds']} | {r['load_average']} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
