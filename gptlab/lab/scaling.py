"""`gptlab lab scaling`: a sweep of model sizes x token budgets on the default mixture, a fitted scaling law
L(N, D) = E + A/N^alpha + B/D^beta, and a prediction checked against a larger run trained afterwards.

    gptlab lab scaling --budget-minutes 60 --out runs/scaling            # CPU: 6 sizes x 3 token budgets
    gptlab lab scaling --out runs/scaling-gpu --preset gpu                # no budget check

Sweep folder layout (read by `gptlab lab emergence`, `gptlab lab probes`, `gptlab lab icl`):
    SWEEP/sweep.json          {"format": 1, "preset", "preset_fields", "budget_minutes", "tokenizer", "data_dir",
                               "seq_len", "batch_tokens", "runs": [RUN, ...], "fit": {"law", "intervals", "form",
                               "backtest", ...}, "prediction": {"predicted", "interval", "measured", ...}}
                              RUN = {"name", "role": "fit" | "target", "depth", "width", "steps", "tokens",
                                     "n_params" (total, tied embedding counted once),
                                     "n_params_nonembedding", "flops" (model.flops_per_token x tokens),
                                     "done": bool, "val_loss", "val_bpb", "wall_s" (null until done)}
    SWEEP/runs/<name>/model   a normal gptlab model directory (gptlab.checkpoint.load_model_dir)
    SWEEP/runs/<name>/checkpoints/step_<N>   intermediate checkpoints at 1/4, 1/2, 3/4 of training and the
                              end (also loadable as model directories): what the probes read across training
    SWEEP/runs/<name>/metrics.jsonl, loss.png   pretraining's own logs
    SWEEP/tokenizer.json, SWEEP/data/           the sweep's tokenizer and prepared dataset
    SWEEP/fit.png, isoflop.png, frontier.png, scaling.md   the results
Run names are `d<depth>w<width>-<steps>s` (the target run: `target-d<depth>w<width>-<steps>s`).

Design decisions
- Each run is `gptlab pretrain` itself (`pretrain(PretrainConfig)`), not a copy of its loop, with the
  sweep's paths and sizes; the models differ in depth and width (`PretrainConfig.width`), and a run's
  token budget is its step count x the batch. The cosine schedule is stretched to each run's own length
  (Hoffmann et al. 2022 found that a schedule longer than the run overstates the loss).
- The plan is fixed by the preset, not by the machine: `base_steps` and the token levels (multiples of it)
  give every grid run's steps, and the target's steps follow from the compute ratio, so a rerun on another
  machine trains the same runs and gets the same losses (up to float noise). The CPU preset's two largest
  sizes train at half the steps of the others (64-256 against 128-512): larger models get fewer tokens, as
  along an IsoFLOP line, so the grid's largest-compute run is smaller, the target (4x it) fits 2 loaded
  cores, and the grid's longest budget is 65% of the target's tokens (32% in session 10's product grid). `--budget-minutes` is only
  checked: a few optimizer steps of every size are timed on this machine, and a budget below the plan's
  estimated time is refused, naming that minimum (the estimate is for the machine as loaded at that
  moment). The plan is written to sweep.json once, so a rerun continues it (another preset for an existing
  folder is an error; another budget is only checked again).
- Resume: a run is done when its model directory exists; sweep.json is rewritten after every run. An
  interrupted run resumes from its newest valid checkpoint (pretraining's `--resume true`), or restarts
  cleanly when it has none.
- The prediction (Kaplan et al. 2020 and Hoffmann et al. 2022 show that the law extrapolates): fit on the
  grid's runs only, record the predicted loss of the target run in sweep.json *before* training it, then
  train it and compare. The target is one size up with >= 4x the compute of the largest grid run.
- Which form of the law predicts (`choose_fit`): with E (Chinchilla) or without (Kaplan et al. 2020) is
  decided by a backtest on the grid alone, before the target exists: each form is fitted without the grid's
  largest-compute runs and scored on them (the same kind of extrapolation as the target's: a larger model,
  more tokens); the form with the smaller mean absolute error is refitted on the whole grid and predicts.
  Session 10's sweep (free E only) predicted +6.3% too high with E at 3.1 nats/token (1.8 bits per byte,
  above Shannon's ~1 bit per character of English), which flattened the D curve; on session 11's grid the
  free fit itself puts E at ~0 and both forms tie (docs/lab.md).
- N is the total parameter count (Hoffmann et al. 2022; with a 1k-token vocabulary the embedding is a large
  share of a tiny model, and leaving it out bends the law, Pearce & Song 2024); the non-embedding count is
  recorded too (Kaplan et al. 2020's N). Compute is C = 6 N D for the frontier, as in the fitted law.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..common import GptlabError, atomic_write_json, atomic_write_text, get_logger, read_json, save_figure, torch_device
from ..data.mixture import load_mixture
from ..data.prepare import PrepareConfig, prepare
from ..model import GPT, GPTConfig
from ..tokenizer import Tokenizer, train_tokenizer
from ..train.metrics import read_metrics
from ..train.optim import bf16_autocast, build_optimizers
from ..train.pretrain import PretrainConfig, find_tokenizer, pretrain
from .scaling_fit import INIT_GRID, ScalingLaw, bootstrap_laws, fit_scaling_law, intervals

log = get_logger("lab.scaling")

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = 1


@dataclass(frozen=True)
class SweepPreset:
    shapes: tuple[tuple[int, int], ...]  # (depth, width) of the grid's models, smallest first
    target_shape: tuple[int, int]  # the prediction run's model, one size up
    token_levels: tuple[int, ...]  # token budgets as multiples of base_steps
    seq_len: int
    batch_size: int
    vocab_size: int
    max_bytes: int | None  # text read from the mixture for the tokenizer and the dataset
    lr: float
    base_steps: int  # the grid's shortest runs; the other token levels are multiples of it
    eval_batches: int
    target_compute_ratio: float = 4.0
    top_shapes: int = 0  # the largest sizes that train at `top_levels` instead of `token_levels`
    top_levels: tuple[int, ...] = ()
    device: str = "auto"

    def levels(self, shape: tuple[int, int]) -> tuple[int, ...]:
        large = self.top_shapes and shape in self.shapes[-self.top_shapes:]
        return self.top_levels if large else self.token_levels


PRESETS = {
    # 2 CPU cores: 53k to 1.3M non-embedding parameters, a 1k vocabulary, 1k-token batches
    "cpu": SweepPreset(shapes=((1, 64), (2, 64), (1, 128), (2, 128), (2, 192), (3, 192)), target_shape=(4, 192),
                       token_levels=(2, 4, 8), top_shapes=2, top_levels=(1, 2, 4), seq_len=128, batch_size=8,
                       vocab_size=1024, max_bytes=12_000_000, lr=3e-3, base_steps=64, eval_batches=32),
    # one GPU: 0.4M to 57M non-embedding parameters, the whole mixture, 64k-token batches
    "gpu": SweepPreset(shapes=((2, 128), (3, 192), (4, 256), (6, 384), (8, 512), (10, 640)), target_shape=(12, 768),
                       token_levels=(1, 2, 4, 8), seq_len=512, batch_size=128, vocab_size=8192, max_bytes=None,
                       lr=2e-3, base_steps=300, eval_batches=32),
}


# ---- the plan --------------------------------------------------------------------------------------------


def run_name(depth: int, width: int, steps: int, target: bool = False) -> str:
    return f"{'target-' if target else ''}d{depth}w{width}-{steps}s"


def model_config(preset: SweepPreset, depth: int, width: int, vocab_size: int) -> GPTConfig:
    return GPTConfig.from_depth(depth, vocab_size, max_seq_len=preset.seq_len, width=width)


def shape_stats(preset: SweepPreset, depth: int, width: int, vocab_size: int) -> dict[str, float]:
    with torch.device("meta"):  # counts only: no memory, no init
        model = GPT(model_config(preset, depth, width, vocab_size))
    return {"n_params": model.num_params(), "n_params_nonembedding": model.num_params(exclude_embeddings=True),
            "flops_per_token": model.flops_per_token(preset.seq_len)}


def time_steps(preset: SweepPreset, shapes, vocab_size: int, steps: int = 3) -> dict[tuple[int, int], float]:
    """Seconds per optimizer step of each shape on this machine (random tokens, after one warm-up step)."""
    device = torch_device(preset.device)
    cfg = PretrainConfig(lr=preset.lr)
    autocast = bf16_autocast(cfg, device)
    out = {}
    for depth, width in shapes:
        torch.manual_seed(0)
        model = GPT(model_config(preset, depth, width, vocab_size)).to(device)
        optimizers = build_optimizers(model, cfg)
        x = torch.randint(0, vocab_size, (preset.batch_size, preset.seq_len), device=device)
        for i in range(steps + 1):
            if i == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with autocast or torch.autocast(device.type, enabled=False):
                _, loss = model(x, x)
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[depth, width] = (time.perf_counter() - start) / steps
    return out


RUN_OVERHEAD_S = 4.0  # per run beyond its steps: loading the data, saving checkpoints, the loss plot


def plan_sweep(preset: SweepPreset, vocab_size: int) -> list[dict[str, Any]]:
    """The runs, fixed by the preset: every grid shape at every token level (multiples of `base_steps`),
    then the target run with >= `target_compute_ratio` x the compute of the largest grid run."""
    stats = {s: shape_stats(preset, *s, vocab_size) for s in (*preset.shapes, preset.target_shape)}
    runs = [_run_record(preset, shape, preset.base_steps * level, stats[shape], "fit")
            for shape in preset.shapes for level in preset.levels(shape)]
    largest = max(r["flops"] for r in runs)
    target_flops_per_step = stats[preset.target_shape]["flops_per_token"] * preset.batch_size * preset.seq_len
    target_steps = math.ceil(preset.target_compute_ratio * largest / target_flops_per_step)
    runs.append(_run_record(preset, preset.target_shape, target_steps, stats[preset.target_shape], "target"))
    return runs


def estimate_minutes(preset: SweepPreset, runs: list[dict], step_seconds: dict[tuple[int, int], float]) -> float:
    """Wall minutes of the runs at the measured step times (an eval batch is a forward: ~1/3 of a step)."""
    seconds = sum(RUN_OVERHEAD_S + (r["steps"] + preset.eval_batches / 3) * step_seconds[r["depth"], r["width"]]
                  for r in runs)
    return seconds / 60


def check_budget(budget_minutes: float, minutes: float, runs: list[dict]) -> None:
    if budget_minutes < minutes:
        steps = [r["steps"] for r in runs]
        raise GptlabError(f"--budget-minutes {budget_minutes:g} is too small for this sweep: it needs at least "
                          f"{math.ceil(minutes)} minutes on this machine as loaded now ({len(runs)} runs left, "
                          f"{min(steps)} to {max(steps)} steps)")


def _run_record(preset: SweepPreset, shape, steps: int, stats: dict, role: str) -> dict[str, Any]:
    tokens = steps * preset.batch_size * preset.seq_len
    return {"name": run_name(*shape, steps, target=role == "target"), "role": role, "depth": shape[0],
            "width": shape[1], "steps": steps, "tokens": tokens, "n_params": stats["n_params"],
            "n_params_nonembedding": stats["n_params_nonembedding"], "flops": stats["flops_per_token"] * tokens,
            "done": False, "val_loss": None, "val_bpb": None, "wall_s": None}


# ---- data and runs ---------------------------------------------------------------------------------------


def prepare_data(sweep: Path, preset: SweepPreset) -> tuple[Path, Path]:
    """The sweep's tokenizer (trained on the default mixture) and prepared dataset; both resume."""
    tok_path, data_dir = sweep / "tokenizer.json", sweep / "data"
    if tok_path.is_file() and (data_dir / "meta.json").is_file():
        return tok_path, data_dir
    mixture = load_mixture("default", max_bytes=preset.max_bytes)
    if not tok_path.is_file():
        log.info("training a %d-token vocabulary on the default mixture", preset.vocab_size)
        train_tokenizer((d.text for d in mixture.documents("train")), preset.vocab_size).save(tok_path)
    prepare(PrepareConfig(tokenizer=str(tok_path), out=str(data_dir), max_bytes=preset.max_bytes), mixture=mixture)
    return tok_path, data_dir


def existing_data(data_dir: Path) -> tuple[Path, Path]:
    """A dataset prepared elsewhere (`gptlab data prepare`, a speedrun's run/data) and its tokenizer."""
    read_json(data_dir / "meta.json", "dataset metadata (run `gptlab data prepare` first)")
    return find_tokenizer(PretrainConfig(data_dir=str(data_dir))), data_dir


def pretrain_config(state: dict, run: dict, sweep: Path, preset: SweepPreset) -> PretrainConfig:
    steps = run["steps"]
    return PretrainConfig(
        data_dir=state["data_dir"], tokenizer=state["tokenizer"], out_dir=str(sweep / "runs" / run["name"]),
        depth=run["depth"], width=run["width"], seq_len=preset.seq_len, batch_size=preset.batch_size,
        num_steps=steps, lr=preset.lr, warmup_steps=max(1, min(20, steps // 10)), eval_every=0,
        eval_batches=preset.eval_batches, sample_every=0, checkpoint_every=max(1, steps // 4), keep_checkpoints=0,
        resume=True, tensorboard=False, progress=False, device=preset.device)


def final_val(run_dir: Path) -> tuple[float, float]:
    """(val loss, val bits per byte) of pretraining's last evaluation (the end of the run)."""
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r]
    if not evals:
        raise GptlabError(f"{run_dir}/metrics.jsonl holds no evaluation")
    return evals[-1]["val/loss"], evals[-1]["val/bpb"]


def train_run(state: dict, run: dict, sweep: Path, preset: SweepPreset) -> None:
    run_dir = sweep / "runs" / run["name"]
    start = time.perf_counter()
    if not (run_dir / "model" / "SHA256SUMS").is_file():
        pretrain(pretrain_config(state, run, sweep, preset))
        run["wall_s"] = round(time.perf_counter() - start, 1)
    run["val_loss"], run["val_bpb"] = final_val(run_dir)
    run["done"] = True


# ---- sweep state -----------------------------------------------------------------------------------------


def load_state(sweep: Path) -> dict:
    path = sweep / SWEEP_FILE
    state = read_json(path, "sweep state (run `gptlab lab scaling --out DIR` first)")
    if not isinstance(state, dict) or state.get("format") != SWEEP_FORMAT or not isinstance(state.get("runs"), list):
        raise GptlabError(f"{path} is not a gptlab sweep file (format {SWEEP_FORMAT})")
    return state


def stored_preset(state: dict) -> SweepPreset:
    known = {f.name for f in dataclasses.fields(SweepPreset)}
    fields = {k: v for k, v in state["preset_fields"].items() if k in known}
    # sweeps planned from a budget (before base_steps existed): the shortest grid run is the base
    fields.setdefault("base_steps", min(r["steps"] for r in state["runs"] if r["role"] == "fit"))
    return SweepPreset(**{**fields, "shapes": tuple(map(tuple, fields["shapes"])),
                          "target_shape": tuple(fields["target_shape"]), "token_levels": tuple(fields["token_levels"]),
                          "top_levels": tuple(fields.get("top_levels", ()))})


def save_state(sweep: Path, state: dict) -> None:
    atomic_write_json(sweep / SWEEP_FILE, state)


def finished_runs(sweep: str | Path, roles: tuple[str, ...] = ("fit", "target")) -> list[dict[str, Any]]:
    """The sweep's finished runs, smallest first, each with `model_dir`. Runs listed but without a model
    directory, runs whose tokenizer is not the sweep's (copied in from elsewhere), and folders under runs/
    that sweep.json does not list are named in one warning line each and skipped."""
    sweep = Path(sweep)
    state = load_state(sweep)
    tokenizer_file = sweep / "tokenizer.json"
    expected_sha = Tokenizer.load(tokenizer_file).sha256 if tokenizer_file.is_file() else None
    listed = {r["name"] for r in state["runs"]}
    runs_dir = sweep / "runs"
    for folder in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if folder.name not in listed:
            log.warning("skipped %s: not a run of %s", folder, sweep / SWEEP_FILE)
    out = []
    for run in state["runs"]:
        if run.get("role") not in roles:
            continue
        model_dir = runs_dir / run["name"] / "model"
        if not (model_dir / "gptlab.json").is_file():
            log.warning("skipped run %s: no model directory %s (not trained yet?)", run["name"], model_dir)
            continue
        sha = read_json(model_dir / "gptlab.json", "model config").get("tokenizer_sha256")
        if expected_sha and sha != expected_sha:
            log.warning("skipped run %s: its tokenizer is not the sweep's %s (a foreign run)", run["name"],
                        tokenizer_file)
            continue
        out.append({**run, "model_dir": model_dir})
    return sorted(out, key=lambda r: (r["n_params"], r["tokens"]))


# ---- fit, prediction, figures ----------------------------------------------------------------------------


FORMS = {"E free": True, "no E": False}  # the law with and without its irreducible term (scaling_fit)
BACKTEST_RUNS = 2  # the grid's largest-compute runs that the backtest holds out


def _arrays(runs: list[dict]) -> tuple[np.ndarray, ...]:
    return tuple(np.array([r[k] for r in runs], dtype=np.float64) for k in ("n_params", "tokens", "val_loss"))


def fit_runs(runs: list[dict], bootstrap: int = 100, grid: dict = INIT_GRID, with_e: bool = True) -> dict[str, Any]:
    n, d, loss = _arrays(runs)
    law = fit_scaling_law(n, d, loss, grid, with_e)
    laws = bootstrap_laws(n, d, loss, law, samples=bootstrap, with_e=with_e)
    return {"law": law.to_dict(), "intervals": intervals(laws), "runs": [r["name"] for r in runs],
            "bootstrap_laws": [x.to_dict() for x in laws]}


def backtest(grid: list[dict], fit_grid: dict = INIT_GRID) -> dict[str, Any]:
    """Each form fitted without the grid's BACKTEST_RUNS largest-compute runs, its error on them (percent
    of the measured loss): the check of extrapolation the grid can make on its own (module docstring)."""
    ordered = sorted(grid, key=lambda r: r["flops"])
    held = ordered[-min(BACKTEST_RUNS, len(grid) - 2):]
    n, d, loss = _arrays([r for r in ordered if r not in held])
    out = {"held_out": [r["name"] for r in held], "forms": {}}
    for form, with_e in FORMS.items():
        law = fit_scaling_law(n, d, loss, fit_grid, with_e)
        errors = {r["name"]: 100 * (float(law.loss(r["n_params"], r["tokens"])) - r["val_loss"]) / r["val_loss"]
                  for r in held}
        out["forms"][form] = {"errors_pct": errors, "mean_abs_error_pct": float(np.mean(np.abs(list(errors.values()))))}
    return out


def choose_fit(grid: list[dict], bootstrap: int = 100, fit_grid: dict = INIT_GRID) -> dict[str, Any]:
    """The form with the smaller backtest error, fitted on the whole grid (with its bootstrap)."""
    test = backtest(grid, fit_grid)
    form = min(FORMS, key=lambda f: test["forms"][f]["mean_abs_error_pct"])
    log.info("backtest on %s: %s; predicting with %s", ", ".join(test["held_out"]),
             ", ".join(f"{f} {v['mean_abs_error_pct']:.2f}%" for f, v in test["forms"].items()), form)
    return {**fit_runs(grid, bootstrap, fit_grid, FORMS[form]), "form": form, "backtest": test}


def predict(fit: dict, run: dict, grid: list[dict]) -> dict[str, Any]:
    """The fitted law's loss for `run`, with the bootstrap fits' 5-95% range."""
    law = ScalingLaw(**fit["law"])
    samples = [ScalingLaw(**x).loss(run["n_params"], run["tokens"]) for x in fit["bootstrap_laws"]]
    return {"run": run["name"], "predicted": float(law.loss(run["n_params"], run["tokens"])),
            "interval": [float(np.quantile(samples, 0.05)), float(np.quantile(samples, 0.95))],
            "compute_ratio": run["flops"] / max(r["flops"] for r in grid)}


def plot_results(state: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law = ScalingLaw(**state["fit"]["law"])
    runs = [r for r in state["runs"] if r["done"]]
    written = []

    # 1. loss vs tokens per size, fitted curves, and the target's prediction
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sizes = sorted({r["n_params"] for r in runs})
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    d_axis = np.geomspace(min(r["tokens"] for r in runs) / 1.5, max(r["tokens"] for r in runs) * 1.5, 50)
    for n, colour in zip(sizes, colours):
        pts = [r for r in runs if r["n_params"] == n]
        ax.plot(d_axis, law.loss(n, d_axis), color=colour, lw=1, alpha=0.7)
        for r in pts:
            ax.scatter(r["tokens"], r["val_loss"], color=colour, marker="*" if r["role"] == "target" else "o",
                       s=120 if r["role"] == "target" else 25, zorder=3,
                       label=f"N={n / 1e6:.2f}M" if r is pts[0] else None)
    pred = state.get("prediction")
    if pred and pred.get("measured") is not None:
        target = next(r for r in runs if r["name"] == pred["run"])
        # the bootstrap range need not contain the full-data fit's value (few runs): a bar, not +- errors
        ax.vlines(target["tokens"], *pred["interval"], color="red", lw=1)
        ax.scatter(target["tokens"], pred["predicted"], marker="x", color="red", zorder=4,
                   label=f"predicted {pred['predicted']:.3f} vs measured {pred['measured']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("final val loss (nats/token)")
    ax.set_title(f"L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.2f} + {law.B:.3g}/D^{law.beta:.2f} (fit on o, star held out)",
                 fontsize=8)
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out / "fit.png", dpi=90))

    # 2. IsoFLOP curves of the fitted law at the runs' compute levels (C = 6ND), runs coloured by compute
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    compute = np.array([6 * r["n_params"] * r["tokens"] for r in runs])
    levels = np.geomspace(compute.min(), compute.max(), 5)
    optima = law.optimal(levels)[0]
    n_axis = np.geomspace(min(min(sizes) / 4, optima.min() / 2), max(max(sizes) * 4, optima.max() * 2), 80)
    cmap = plt.cm.plasma
    norm = matplotlib.colors.LogNorm(compute.min(), compute.max())
    for c in levels:
        ax.plot(n_axis, law.loss(n_axis, c / (6 * n_axis)), color=cmap(norm(c)), lw=1.2, label=f"C={c:.2g}")
        n_opt, _ = law.optimal(c)
        ax.scatter(n_opt, law.loss(n_opt, c / (6 * n_opt)), color=cmap(norm(c)), marker="v", s=40, zorder=3)
    ax.scatter([r["n_params"] for r in runs], [r["val_loss"] for r in runs], c=compute, cmap=cmap, norm=norm,
               edgecolors="k", s=25, zorder=4)
    ax.set_xscale("log")
    ax.set_ylim(min(r["val_loss"] for r in runs) - 0.3, max(r["val_loss"] for r in runs) + 0.5)
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss")
    ax.set_title("IsoFLOP curves of the fitted law (v: optimum), runs coloured by compute", fontsize=9)
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out / "isoflop.png", dpi=90))

    # 3. the compute-optimal frontier: tokens per parameter vs compute, Chinchilla's ~20 for reference
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    c_axis = np.geomspace(compute.min() / 10, max(compute.max() * 100, 1e21), 60)
    n_opt, d_opt = law.optimal(c_axis)
    ax.plot(c_axis, d_opt / n_opt, label="fitted law: D_opt / N_opt")
    ax.axhline(20, color="grey", ls="--", label="Chinchilla (Hoffmann et al. 2022): ~20")
    ax.scatter(compute, [r["tokens"] / r["n_params"] for r in runs], s=15, color="k", label="the sweep's runs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C = 6ND (FLOPs)")
    ax.set_ylabel("tokens per parameter")
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out / "frontier.png", dpi=90))
    return written


def write_report(state: dict, out: Path) -> Path:
    fit, pred = state["fit"], state.get("prediction") or {}
    law = ScalingLaw(**fit["law"])
    lines = [f"# Scaling sweep ({state['preset']} preset)", "",
             "| run | role | N (total) | N (non-emb.) | tokens | FLOPs | val loss | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in state["runs"]:
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        lines.append(f"| {r['name']} | {r['role']} | {r['n_params']:,} | {r['n_params_nonembedding']:,} | "
                     f"{r['tokens']:,} | {r['flops']:.3g} | {loss} | {r['wall_s'] or '-'} |")
    if fit.get("backtest"):
        test = fit["backtest"]
        lines += ["", f"Backtest on the grid alone (fitted without {', '.join(test['held_out'])}, error on them): "
                  + "; ".join(f"{form}: " + ", ".join(f"{e:+.2f}%" for e in v["errors_pct"].values())
                              + f" (mean |error| {v['mean_abs_error_pct']:.2f}%)" for form, v in test["forms"].items())
                  + f". Predicting with: {fit['form']}."]
    lines += ["", f"Fit on the {len(fit['runs'])} grid runs (form: {fit.get('form', 'E free')}; Huber on log-loss, "
              "bootstrap 5-95% over runs):", "", "| constant | value | 5% | 95% |", "|---|---|---|---|"]
    for k, v in fit["law"].items():
        lo, hi = fit["intervals"][k]
        lines.append(f"| {k} | {v:.4g} | {lo:.4g} | {hi:.4g} |")
    largest = max(6 * r["n_params"] * r["tokens"] for r in state["runs"])
    ratios = {c: float(np.divide(*law.optimal(c)[::-1])) for c in (largest, 1e21)}
    lines += ["", "Compute-optimal tokens per parameter by the fit (C = 6ND; Chinchilla: ~20): "
              + ", ".join(f"{ratio:.3g} at C = {c:.2g}" for c, ratio in ratios.items()) + "."]
    if pred.get("measured") is not None:
        lines += ["", f"Prediction for {pred['run']} ({pred['compute_ratio']:.1f}x the largest fitted run's compute), "
                  f"made before training it: {pred['predicted']:.4f} (bootstrap 5-95%: {pred['interval'][0]:.4f}-"
                  f"{pred['interval'][1]:.4f}); measured {pred['measured']:.4f}; error {pred['error_pct']:+.2f}%."]
    wall = sum(r["wall_s"] or 0 for r in state["runs"])
    lines += ["", f"Training wall time of the runs: {wall / 60:.1f} minutes.", ""]
    path = out / "scaling.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# ---- the command -----------------------------------------------------------------------------------------


def run_sweep(out: str | Path, budget_minutes: float | None = None, preset_name: str = "cpu",
              data_dir: str | Path | None = None, preset: SweepPreset | None = None, bootstrap: int = 100,
              fit_grid: dict = INIT_GRID) -> dict:
    """Plan (or continue) the sweep in `out`, train every run, fit, predict, train the target, plot.
    `budget_minutes`: refuse to start when the runs left need more on this machine (None: no check).
    `data_dir`: a prepared dataset to use (its tokenizer.json in or beside it) instead of preparing the default
    mixture; `preset` overrides the named preset and `fit_grid` the fit's initialisations (tests pass micro ones)."""
    preset = preset or PRESETS[preset_name]
    sweep = Path(out)
    sweep.mkdir(parents=True, exist_ok=True)
    if (sweep / SWEEP_FILE).is_file():
        state = load_state(sweep)
        if state["preset"] != preset_name:
            raise GptlabError(f"{sweep} holds a sweep planned with --preset {state['preset']}: rerun with it to "
                              f"continue, or choose another --out")
        preset = stored_preset(state)  # the plan's own settings, even if the preset has changed since
    else:
        tok_path, data_dir = existing_data(Path(data_dir)) if data_dir else prepare_data(sweep, preset)
        state = {"format": SWEEP_FORMAT, "preset": preset_name, "budget_minutes": budget_minutes,
                 "preset_fields": dataclasses.asdict(preset), "tokenizer": str(tok_path), "data_dir": str(data_dir),
                 "seq_len": preset.seq_len, "batch_tokens": preset.batch_size * preset.seq_len,
                 "runs": plan_sweep(preset, Tokenizer.load(tok_path).vocab_size), "fit": None, "prediction": None}
    left = [r for r in state["runs"] if not r["done"]]
    if budget_minutes is not None and left:
        vocab = Tokenizer.load(state["tokenizer"]).vocab_size
        seconds = time_steps(preset, sorted({(r["depth"], r["width"]) for r in left}), vocab)
        minutes = estimate_minutes(preset, left, seconds)
        state["step_seconds"] = {f"d{d}w{w}": s for (d, w), s in seconds.items()}
        log.info("%d runs left, estimated %.1f minutes on this machine (step times %s)", len(left), minutes,
                 ", ".join(f"{k} {v:.3f}s" for k, v in state["step_seconds"].items()))
        check_budget(budget_minutes, minutes, left)
    save_state(sweep, state)
    grid = [r for r in state["runs"] if r["role"] == "fit"]
    target = next(r for r in state["runs"] if r["role"] == "target")
    with tqdm(total=len(state["runs"]), initial=sum(r["done"] for r in state["runs"]), unit="run",
              dynamic_ncols=True) as bar:
        for run in grid:
            if not run["done"]:
                bar.set_postfix_str(run["name"])
                train_run(state, run, sweep, preset)
                save_state(sweep, state)
                bar.update(1)
        if state["prediction"] is None:  # fit and predict before the target run exists
            state["fit"] = choose_fit(grid, bootstrap, fit_grid)
            state["prediction"] = {**predict(state["fit"], target, grid), "measured": None, "error_pct": None}
            save_state(sweep, state)
            log.info("predicted final val loss of %s: %.4f", target["name"], state["prediction"]["predicted"])
        if not target["done"]:
            bar.set_postfix_str(target["name"])
            train_run(state, target, sweep, preset)
            bar.update(1)
    pred = state["prediction"]
    pred["measured"] = target["val_loss"]
    pred["error_pct"] = 100 * (pred["predicted"] - pred["measured"]) / pred["measured"]
    save_state(sweep, state)
    plot_results(state, sweep)
    report = write_report(state, sweep)
    print(report.read_text(encoding="utf-8"))
    return state


def _cmd(args: argparse.Namespace) -> None:
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        raise GptlabError("--budget-minutes must be positive")
    run_sweep(args.out, args.budget_minutes, args.preset, args.data_dir, bootstrap=args.bootstrap)


def register_lab(commands) -> None:
    p = commands.add_parser("scaling", help="a sweep of sizes x tokens, a fitted scaling law and a checked prediction",
                            description=__doc__.splitlines()[0])
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="refuse to start if the runs left need more minutes on this machine, as measured now "
                        "(the plan itself is fixed by the preset; default: no check)")
    p.add_argument("--out", required=True, help="the sweep folder (resumable; layout in the module docstring)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="cpu (tiny) or gpu (default: cpu)")
    p.add_argument("--data-dir", help="a prepared dataset to train on, tokenizer.json in or beside it (default: "
                                      "prepare the default mixture into OUT/data with the preset's vocabulary)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the intervals (default: 100)")
    p.set_defaults(func=_cmd)
