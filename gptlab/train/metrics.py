"""Training metrics: one JSON line per record, TensorBoard scalars, and curves as a PNG at the end.

Design decisions: the JSONL file is the source of truth (greppable, loadable with pandas, survives without
TensorBoard); TensorBoard is a convenience that is skipped when it cannot be imported. On resume, records
from steps after the resumed step are dropped from the JSONL so the log reads as one clean run.
Only rank 0 of a distributed run writes (`enabled=False` elsewhere).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from ..common import atomic_write_text, get_logger, save_figure

log = get_logger("metrics")


class MetricsLogger:
    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"),
                                            purge_step=None if resume_step is None else resume_step + 1)
            except ImportError as e:  # tensorboard is optional
                log.info("tensorboard unavailable (%s); metrics go to %s only", e, self.path)

    def log(self, step: int, **scalars: float | str) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in scalars.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_panels(metrics_path: str | Path, png_path: str | Path,
                panels: Sequence[tuple[str, Sequence[str]]]) -> Path:
    """Curves of a metrics file against step, one subplot per (y label, keys) panel, side by side (three
    to a row), written atomically as a PNG. Series logged at fewer than half of the steps (evaluations)
    get markers; keys never logged are left out, and so is a panel with none."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    n_steps = len({r["step"] for r in records if "step" in r})
    series = [(label, [(key, [(r["step"], r[key]) for r in records if key in r]) for key in keys])
              for label, keys in panels]
    series = [(label, [(k, pts) for k, pts in curves if pts]) for label, curves in series]
    series = [(label, curves) for label, curves in series if curves] or [("(no data)", [])]
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), dpi=100, squeeze=False)
    for ax, (label, curves) in zip(axes.flat, series):
        for key, points in curves:
            steps, values = zip(*points)
            ax.plot(steps, values, "o-" if len(points) < n_steps / 2 else "-", label=key, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(series):]:
        ax.set_visible(False)
    return save_figure(fig, png_path)


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Train loss (per step) and val loss (per eval) against step, written atomically as a PNG."""
    return plot_panels(metrics_path, png_path, [("cross-entropy (nats/token)", ["train/loss", "val/loss"])])
