"""`gptlab lab probes`: next-token prediction as many small tasks at once, and tokens of unequal difficulty,
across a scaling sweep's model sizes and training checkpoints.

    gptlab lab probes --sweep runs/scaling --out runs/scaling/probes

Design decisions
- Probes (gptlab/lab/probes.toml, shipped with gptlab): a few hundred sentences with a {right|wrong}
  choice in six categories (grammar, lexical semantics, world knowledge, sentiment, translation,
  arithmetic), scored exactly like `gptlab eval`'s multiple choice (`gptlab.eval.choice`): the summed
  log-probability of each alternative plus the rest of the sentence after the text before the braces. A
  pretraining corpus holds all of these "tasks" implicitly (Wei's intuition: next-word prediction is
  massively multitask learning), so the question is which ones a model picks up first: accuracy per
  category against model size (each size's longest-trained run) and against training tokens (the
  intermediate checkpoints of `--checkpoints-of`, by default the sweep's largest run).
- Tokens of unequal difficulty (Wei's other intuition: some tokens are easy for every model, others keep
  improving with scale): the per-token loss of the same held-out text (the first windows of the sweep's
  val split) under each size's longest run. A token is "easy" when the smallest model already predicts it
  (loss < 1 nat), "improving" when the largest model is the best of all on it and gains at least 1.5 nats
  over the smallest, "hard" when even the largest model pays > 6 nats. Examples of each
  are printed in their context, since looking at the data is the point.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import checkpoint_dirs, load_model_dir
from ..common import GptlabError, atomic_write_json, atomic_write_text, get_logger, save_figure
from ..data.loader import PackedLoader
from ..eval.choice import ChoiceItem, load_choice_items, multiple_choice_accuracy
from ..model import GPT
from ..tokenizer import Tokenizer
from .emergence import longest_per_size
from .scaling import finished_runs, load_state

log = get_logger("lab.probes")

EASY_NATS, HARD_NATS, GAIN_NATS = 1.0, 6.0, 1.5  # the token classes of the module docstring


def probe_items(path: str | Path | None = None) -> list[ChoiceItem]:
    """The shipped probes (or a file in the same format)."""
    return load_choice_items(path if path is not None else resources.files("gptlab") / "lab" / "probes.toml")


def probe_accuracy(model: GPT, tokenizer: Tokenizer, items: list[ChoiceItem]) -> dict[str, dict[str, float]]:
    """Per category (and "overall"): accuracy and the item count."""
    model.eval()
    result = multiple_choice_accuracy(model, tokenizer, items)
    rows = {c: s for c, s in result["categories"].items()} | {"overall": result["overall"]}
    return {c: {"accuracy": s["accuracy"], "n": s["n"]} for c, s in rows.items()}


def sweep_data_dir(sweep: Path) -> Path:
    """The sweep's prepared dataset: SWEEP/data, or the folder sweep.json names."""
    local = sweep / "data"
    return local if (local / "meta.json").is_file() else Path(load_state(sweep)["data_dir"])


@torch.inference_mode()
def token_losses(model: GPT, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Loss (nats) of every target token of the windows x -> y."""
    model.eval()
    logits = model(x).float()
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).numpy()


def classify_tokens(losses: np.ndarray) -> dict[str, np.ndarray]:
    """losses: (sizes, tokens), smallest model first. Masks of the token classes (module docstring)."""
    smallest, largest = losses[0], losses[-1]
    best_at_largest = largest <= losses.min(axis=0)
    return {"easy": smallest < EASY_NATS,
            "improving": best_at_largest & (smallest - largest >= GAIN_NATS),
            "hard": largest > HARD_NATS}


def _piece(tokenizer: Tokenizer, i: int) -> str:
    return tokenizer.id_to_bytes(i).decode("utf-8", errors="backslashreplace").replace("\n", "\\n")


def token_examples(tokenizer: Tokenizer, x: np.ndarray, y: np.ndarray, losses: np.ndarray, mask: np.ndarray,
                   order: np.ndarray, k: int = 8, context: int = 10) -> list[str]:
    """Up to k lines: the text before a token, the token in [brackets], and its loss under each size."""
    lines = []
    flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1)
    seq_len = x.shape[-1]
    for index in order:
        if not mask[index]:
            continue
        row, col = divmod(int(index), seq_len)
        before = "".join(_piece(tokenizer, t) for t in flat_x[row, max(0, col - context + 1):col + 1])
        figures = " ".join(f"{v:4.1f}" for v in losses[:, index])
        lines.append(f"...{before[-60:]:>60}[{_piece(tokenizer, int(flat_y[index]))}]   nats by size: {figures}")
        if len(lines) == k:
            break
    return lines


def plot_probes(by_size: list[dict], by_step: list[dict], categories: list[str], checkpoint_run: str | None,
                out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for category in categories:
        style = dict(marker="o", ms=3, lw=2.5 if category == "overall" else 1.2,
                     color="k" if category == "overall" else None)
        axes[0].plot([r["n_params"] for r in by_size], [r["probes"][category]["accuracy"] for r in by_size],
                     label=category, **style)
        if by_step:
            axes[1].plot([r["tokens"] for r in by_step], [r["probes"][category]["accuracy"] for r in by_step],
                         label=category, **style)
    for ax, xlabel in zip(axes, ("parameters N (each size's longest run)", f"training tokens ({checkpoint_run})")):
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("probe accuracy (chance 0.5)")
    axes[0].legend(fontsize=7)
    fig.suptitle("which probe categories next-token prediction learns first", fontsize=10)
    return save_figure(fig, out / "probes.png", dpi=90)


def plot_token_losses(losses: np.ndarray, sizes: list[int], classes: dict[str, np.ndarray], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].scatter(losses[0], losses[-1], s=3, alpha=0.3, color="grey")
    for name, colour in (("easy", "tab:green"), ("improving", "tab:blue"), ("hard", "tab:red")):
        mask = classes[name]
        axes[0].scatter(losses[0][mask], losses[-1][mask], s=4, color=colour, label=f"{name} ({mask.sum()})")
        if mask.any():
            axes[1].plot(sizes, losses[:, mask].mean(axis=1), marker="o", color=colour, label=name)
    axes[1].plot(sizes, losses.mean(axis=1), marker="o", color="k", label="all tokens")
    top = float(losses.max())
    axes[0].plot([0, top], [0, top], color="k", lw=0.8)
    axes[0].set_xlabel("loss under the smallest model (nats)")
    axes[0].set_ylabel("loss under the largest model")
    axes[0].legend(fontsize=7)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("parameters N")
    axes[1].set_ylabel("mean loss of the class (nats)")
    axes[1].legend(fontsize=7)
    fig.suptitle("held-out tokens: easy from the start, improving with scale, hard for all", fontsize=10)
    return save_figure(fig, out / "token_losses.png", dpi=90)


def run_probes(sweep: str | Path, out: str | Path, checkpoints_of: str | None = None, text_rows: int = 8,
               items_path: str | Path | None = None) -> dict[str, Any]:
    sweep, out = Path(sweep), Path(out)
    runs = finished_runs(sweep)
    sizes = longest_per_size(runs)
    if not sizes:
        raise GptlabError(f"{sweep} has no finished runs to probe")
    items = probe_items(items_path)
    categories = [*dict.fromkeys(i.category for i in items), "overall"]

    # probes across sizes
    by_size, models = [], []
    for run in tqdm(sizes, unit="model", desc="sizes", dynamic_ncols=True):
        model, tokenizer = load_model_dir(run["model_dir"])
        models.append(model)
        by_size.append({"run": run["name"], "n_params": run["n_params"], "probes": probe_accuracy(model, tokenizer, items)})

    # probes across the training checkpoints of one run
    by_run = {r["name"]: r for r in runs}
    chosen = by_run.get(checkpoints_of) if checkpoints_of else max(runs, key=lambda r: r["flops"])
    if chosen is None:
        raise GptlabError(f"--checkpoints-of {checkpoints_of!r} is not a finished run of {sweep} "
                          f"(finished: {', '.join(by_run)})")
    by_step = []
    batch_tokens = load_state(sweep)["batch_tokens"]
    for ckpt in tqdm(checkpoint_dirs(chosen["model_dir"].parent / "checkpoints"), unit="ckpt", desc="checkpoints",
                     dynamic_ncols=True):
        model, tokenizer = load_model_dir(ckpt)
        step = int(ckpt.name.split("_")[1])
        by_step.append({"step": step, "tokens": step * batch_tokens, "probes": probe_accuracy(model, tokenizer, items)})

    # per-token loss of held-out text across sizes
    seq_len = min(m.config.max_seq_len for m in models)
    loader = PackedLoader(sweep_data_dir(sweep), "val", min(text_rows, PackedLoader(sweep_data_dir(sweep), "val", 1,
                                                                                     seq_len).n_windows), seq_len)
    x, y = loader.next_batch()
    losses = np.stack([token_losses(m, x, y).reshape(-1) for m in models])
    classes = classify_tokens(losses)
    gain_order = np.argsort(-(losses[0] - losses[-1]))
    lines = [f"held-out text: {y.numel()} tokens of the val split; sizes: "
             + ", ".join(f"{r['name']} ({r['n_params'] / 1e6:.2f}M)" for r in sizes),
             "mean loss by size: " + " ".join(f"{v:.3f}" for v in losses.mean(axis=1))]
    for name, order, what in (("easy", np.argsort(losses[0]), f"loss < {EASY_NATS} nats already in the smallest model"),
                              ("improving", gain_order, f"the largest model is the best, >= {GAIN_NATS} nats below the smallest"),
                              ("hard", np.argsort(-losses[-1]), f"loss > {HARD_NATS} nats even in the largest model")):
        share = classes[name].mean()
        lines += ["", f"{name}: {classes[name].sum()} tokens ({100 * share:.1f}%), {what}"]
        lines += token_examples(tokenizer, x.numpy(), y.numpy(), losses, classes[name], order)
    text = "\n".join(lines)

    out.mkdir(parents=True, exist_ok=True)
    result = {"by_size": by_size, "checkpoints_of": chosen["name"], "by_step": by_step,
              "token_classes": {k: int(v.sum()) for k, v in classes.items()}, "tokens": int(y.numel()),
              "mean_token_loss": losses.mean(axis=1).tolist()}
    atomic_write_json(out / "probes.json", result)
    atomic_write_text(out / "tokens.txt", text + "\n")
    plot_probes(by_size, by_step, categories, chosen["name"], out)
    plot_token_losses(losses, [r["n_params"] for r in sizes], classes, out)

    print(f"{'run':>22} " + " ".join(f"{c[:11]:>11}" for c in categories))
    for r in by_size:
        print(f"{r['run']:>22} " + " ".join(f"{r['probes'][c]['accuracy']:>11.3f}" for c in categories))
    print(f"\ncheckpoints of {chosen['name']}:")
    for r in by_step:
        print(f"{'step ' + str(r['step']):>22} " + " ".join(f"{r['probes'][c]['accuracy']:>11.3f}" for c in categories))
    print("\n" + text)
    print(f"\nwrote probes.png, token_losses.png, probes.json, tokens.txt to {out}")
    return result


def _cmd(args: argparse.Namespace) -> None:
    run_probes(args.sweep, args.out, args.checkpoints_of, args.text_rows, args.items)


def register_lab(commands) -> None:
    p = commands.add_parser("probes", help="probe accuracy by category across sizes and checkpoints; per-token "
                                           "losses of held-out text across sizes", description=__doc__.splitlines()[0])
    p.add_argument("--sweep", required=True, help="a sweep folder of `gptlab lab scaling`")
    p.add_argument("--out", required=True, help="folder for the figures, probes.json and tokens.txt")
    p.add_argument("--checkpoints-of", help="the run whose training checkpoints are probed (default: the largest)")
    p.add_argument("--text-rows", type=int, default=8, help="val windows for the per-token losses (default: 8)")
    p.add_argument("--items", help="a probes TOML file in the same format (default: the shipped gptlab/lab/probes.toml)")
    p.set_defaults(func=_cmd)
