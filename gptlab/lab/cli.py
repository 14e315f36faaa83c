"""`gptlab lab EXPERIMENT ...`: one subcommand whose sub-subcommands are the lab's experiments.

Each module in `EXPERIMENTS` exposes `register_lab(commands)`, adding its experiment(s) to the `lab`
subparsers with `set_defaults(func=...)`; adding an experiment is one line here. Experiments import
matplotlib inside their commands, so building the parser stays cheap.
"""

from __future__ import annotations

import importlib

EXPERIMENTS = [
    "gptlab.lab.compression_bench",
    "gptlab.lab.icl",
    "gptlab.lab.life",
    "gptlab.lab.scaling",
    "gptlab.lab.emergence",
    "gptlab.lab.probes",
    "gptlab.lab.views",
    "gptlab.lab.word2vec",
]


def register(sub) -> None:
    p = sub.add_parser("lab", help="experiments that measure what models do (compression, views into a model, "
                                   "word2vec, scaling laws, in-context learning, emergence, probes, "
                                   "the Game of Life)")
    commands = p.add_subparsers(dest="lab_command", required=True, metavar="EXPERIMENT")
    for name in EXPERIMENTS:
        importlib.import_module(name).register_lab(commands)
