"""`gptlab tasks`: list the embedded task suite and export it as standard JSONL.

    gptlab tasks list
    gptlab tasks export --kind sft --n 5000 --out sft.jsonl             # OpenAI-style {"messages": [...]}
    gptlab tasks export --kind preferences --n 2000 --out prefs.jsonl   # prompt + tiers (gptlab.train.preferences)

An export holds exactly what `gptlab sft` / `gptlab rm` / `gptlab dpo` train on with `--data tasks` and the
same split, count and seed, so the task suite can feed other trainers (TRL reads the messages file as is) or
be edited and fed back with `--data FILE`. The test split is what evaluation measures: export it to look
at, not to train on.
"""

from __future__ import annotations

import argparse

from .common import GptlabError
from .tasks import SPLITS, TASKS, task_conversations, task_names


def _cmd_list(args: argparse.Namespace) -> None:
    width = max(map(len, TASKS))
    for name in sorted(TASKS):
        task = TASKS[name]
        print(f"{name:<{width}}  test {task.test_fraction:.0%}  {task.description}")


def _cmd_export(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise GptlabError(f"--n must be positive, got {args.n}")
    if args.kind == "sft":
        from .chat import write_messages_jsonl

        count = write_messages_jsonl(args.out, task_conversations(task_names(args.tasks), args.n, args.split,
                                                                  args.seed))
    else:
        from .train.preferences import default_preferences, write_preferences_jsonl

        count = write_preferences_jsonl(args.out, default_preferences(args.tasks, args.n, args.split, args.seed))
    print(f"wrote {count} {args.kind} records ({args.split} split) to {args.out}")


def register(sub) -> None:
    parser = sub.add_parser("tasks", help="list the embedded task suite or export it as SFT / preference JSONL",
                            description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="task names, test fractions and descriptions").set_defaults(func=_cmd_list)
    export = actions.add_parser("export", help="write task examples as SFT conversations or preference sets")
    export.add_argument("--kind", choices=("sft", "preferences"), required=True,
                        help="sft: one reference answer per question; preferences: references above bad answers")
    export.add_argument("--out", required=True, help="output JSONL file (written atomically)")
    export.add_argument("--n", type=int, default=1000, help="number of records (default: 1000)")
    export.add_argument("--split", choices=SPLITS, default="train", help="task split (default: train)")
    export.add_argument("--tasks", default="all", help="comma-separated task names or 'all' (default: all)")
    export.add_argument("--seed", type=int, default=0, help="the stages' --seed to reproduce (default: 0)")
    export.set_defaults(func=_cmd_export)
