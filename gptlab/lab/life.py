"""Conway's Game of Life: complex behaviour from a simple local rule, and whether a tiny GPT learns the rule
from trajectories by next-token prediction.

    gptlab lab life --size 64 --steps 200 --pattern glider --out runs/life
    gptlab lab life --learn --out runs/life-learn

Design decisions
- One step is a convolution: the 3x3 kernel of ones with a zero centre counts each cell's live neighbours
  on a circularly padded board (the board is a torus), then the rule: alive next iff 3 neighbours, or 2
  neighbours and alive now (B3/S23). The kernel is separable (a 3x3 box = 3 rows x 3 columns), so the
  convolution is computed as three shifted row adds then three column adds on uint8, minus the centre:
  24x faster on CPU than `F.conv2d` with a one-channel float kernel (bench/results/life.md), same counts. Boards are (H, W) or a batch (B, H, W)
  of bools. Tests check it against `step_reference`, a plain loop over cells in numpy, with exact
  equality, and the glider's period 4 and (1, 1) displacement.
- Output: an animated GIF and a PNG strip of evenly spaced frames, drawn with Pillow (cells scaled to
  pixels by nearest neighbour), written atomically.
- Learning (`--learn`): a pair (board t, board t+1) is one token sequence: board t's rows, each cell a
  token ("." dead, "#" alive) and each row ended by a newline token, then a separator token, then board
  t+1 the same way. Boards are random (density drawn in [0.2, 0.5]) then evolved 0-3 steps, so both
  fresh and evolved boards appear. The loss is on board t+1's tokens only; cell accuracy is the
  teacher-forced argmax on board t+1's cells (each cell predicted from board t and the cells of t+1 before
  it), on fresh boards never seen in training. Baselines: "copy" (board t+1 = board t) and "all dead".
  The model is gptlab's own GPT (rotary positions, so a neighbour one row up is a fixed relative offset of
  width + 1 tokens) trained by a plain loop with gptlab's AdamW and schedule. A board size absent from
  training tests whether the rule, rather than the offsets of one size, was learned.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..common import GptlabError, atomic_write_bytes, atomic_write_text, get_logger, save_figure

log = get_logger("lab.life")

# ---- the simulator ----------------------------------------------------------------------------------------


def step(board: torch.Tensor) -> torch.Tensor:
    """One generation of B3/S23 on a torus; `board` is a bool tensor (H, W) or (B, H, W)."""
    cells = board.to(torch.uint8)
    x = F.pad(cells.reshape(-1, 1, *board.shape[-2:]), (1, 1, 1, 1), mode="circular")[:, 0]
    rows = x[:, :-2] + x[:, 1:-1] + x[:, 2:]
    counts = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).reshape(board.shape) - cells
    return (counts == 3) | (board & (counts == 2))


def run(board: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The board and its `steps` successors."""
    frames = [board]
    for _ in range(steps):
        frames.append(step(frames[-1]))
    return frames


def step_reference(board: np.ndarray) -> np.ndarray:
    """One generation by a plain loop over cells (the test oracle and the benchmark's baseline)."""
    h, w = board.shape
    out = np.zeros_like(board)
    for i in range(h):
        for j in range(w):
            alive = 0
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if di or dj:
                        alive += board[(i + di) % h, (j + dj) % w]
            out[i, j] = alive == 3 or (board[i, j] and alive == 2)
    return out


GLIDER = [".#.", "..#", "###"]
GOSPER_GUN = ["........................#...........",
              "......................#.#...........",
              "............##......##............##",
              "...........#...#....##............##",
              "##........#.....#...##..............",
              "##........#...#.##....#.#...........",
              "..........#.....#.......#...........",
              "...........#...#....................",
              "............##......................"]
PATTERNS = ("glider", "gun", "random")


def from_rows(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in row] for row in rows])


def pattern_board(pattern: str, size: int, seed: int = 0, density: float = 0.3) -> torch.Tensor:
    """A size x size board holding `pattern` (placed near the top-left corner), or a random one."""
    if pattern not in PATTERNS:
        raise GptlabError(f"unknown pattern {pattern!r} (known: {', '.join(PATTERNS)})")
    if pattern == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(size, size, generator=generator) < density
    shape = from_rows(GLIDER if pattern == "glider" else GOSPER_GUN)
    if size < max(shape.shape) + 2:
        raise GptlabError(f"pattern {pattern!r} needs a board of at least {max(shape.shape) + 2} cells, got --size {size}")
    board = torch.zeros(size, size, dtype=torch.bool)
    board[1:1 + shape.shape[0], 1:1 + shape.shape[1]] = shape
    return board


def frame_image(board: torch.Tensor, scale: int):
    from PIL import Image

    pixels = np.where(board.numpy(), 0, 255).astype(np.uint8)  # live cells black on white
    return Image.fromarray(pixels).resize((board.shape[1] * scale, board.shape[0] * scale), Image.NEAREST)


def write_gif(frames: list[torch.Tensor], path: Path, scale: int, ms_per_frame: int = 80) -> None:
    images = [frame_image(f, scale) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    atomic_write_bytes(path, buffer.getvalue())


def write_strip(frames: list[torch.Tensor], path: Path, scale: int, count: int = 8) -> list[int]:
    """`count` evenly spaced frames side by side, 2-pixel grey gaps; returns the generations shown."""
    from PIL import Image

    shown = sorted({round(i * (len(frames) - 1) / max(1, count - 1)) for i in range(count)})
    images = [frame_image(frames[i], scale) for i in shown]
    w, h = images[0].size
    strip = Image.new("L", (len(images) * (w + 2) - 2, h), 128)
    for i, image in enumerate(images):
        strip.paste(image, (i * (w + 2), 0))
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return shown


# ---- serialising boards as tokens -------------------------------------------------------------------------

DEAD, ALIVE, NEWLINE, SEP = 0, 1, 2, 3
VOCAB = 4
SYMBOLS = ".#\n="


def encode_pair(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Board t's rows (cells then a newline), the separator, board t+1's rows."""
    def rows(board):
        return [t for row in board.tolist() for t in [ALIVE if c else DEAD for c in row] + [NEWLINE]]

    return rows(before) + [SEP] + rows(after)


def decode_pair(tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `encode_pair`; a malformed sequence is a GptlabError."""
    if tokens.count(SEP) != 1:
        raise GptlabError(f"a board pair has exactly one separator, found {tokens.count(SEP)}")
    cut = tokens.index(SEP)

    def board(part: list[int]) -> torch.Tensor:
        if not part or part[-1] != NEWLINE:
            raise GptlabError("a board ends with a newline token")
        rows = [r for r in _split(part[:-1])]
        if len({len(r) for r in rows}) != 1 or any(t not in (DEAD, ALIVE) for r in rows for t in r):
            raise GptlabError("a board's rows must be equally long and hold only cell tokens")
        return torch.tensor(rows, dtype=torch.long) == ALIVE

    return board(tokens[:cut]), board(tokens[cut + 1:])


def _split(tokens: list[int]) -> list[list[int]]:
    rows, row = [], []
    for t in tokens:
        if t == NEWLINE:
            rows.append(row)
            row = []
        else:
            row.append(t)
    return rows + [row]


def render_tokens(tokens: list[int]) -> str:
    return "".join(SYMBOLS[t] for t in tokens)


def sample_pairs(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n (board t, board t+1) pairs: random boards of density U(0.2, 0.5), evolved 0-3 steps first."""
    density = 0.2 + 0.3 * torch.rand(n, 1, 1, generator=generator)
    boards = torch.rand(n, size, size, generator=generator) < density
    warmup = torch.randint(0, 4, (n,), generator=generator)
    for s in range(3):
        boards = torch.where((warmup > s)[:, None, None], step(boards), boards)
    return boards, step(boards)


def batch_tokens(before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for a batch of pairs: targets are -1 except on board t+1's tokens."""
    seqs = torch.tensor([encode_pair(b, a) for b, a in zip(before, after)])
    targets = seqs[:, 1:].clone()
    first_after = (before.shape[1] + 1) * before.shape[2] + 1  # index of board t+1's first token
    targets[:, :first_after - 1] = -1
    return seqs[:, :-1], targets


# ---- learning the rule ------------------------------------------------------------------------------------


@dataclass
class LearnConfig:
    out: str
    train_sizes: tuple[int, ...] = (6, 8)
    test_sizes: tuple[int, ...] = (6, 8, 7, 10)  # 7 and 10: never seen in training
    steps: int = 1000
    batch: int = 32
    lr: float = 3e-3
    n_layer: int = 2
    n_embd: int = 64
    eval_every: int = 100
    eval_boards: int = 128
    seed: int = 0


def tiny_gpt(cfg: LearnConfig):
    from ..model import GPT, GPTConfig

    longest = max(cfg.train_sizes + cfg.test_sizes)
    torch.manual_seed(cfg.seed)
    return GPT(GPTConfig(vocab_size=VOCAB, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=4, n_kv_head=4,
                         head_dim=cfg.n_embd // 4, intermediate_size=4 * cfg.n_embd,
                         max_seq_len=2 * longest * (longest + 1) + 1))


@torch.inference_mode()
def cell_accuracy(model, before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """Teacher-forced accuracy on board t+1's cells, the share of boards all right, and the baselines."""
    inputs, targets = batch_tokens(before, after)
    predicted = model(inputs).argmax(dim=-1)
    cells = (targets == DEAD) | (targets == ALIVE)
    right = (predicted == targets) & cells
    return {"cell_accuracy": float(right.sum() / cells.sum()),
            "boards_exact": float((right.sum(1) == cells.sum(1)).float().mean()),
            "copy_baseline": float((before == after).float().mean()),
            "dead_baseline": float((~after).float().mean())}


def learn(cfg: LearnConfig, progress: bool = True) -> dict:
    """Train the tiny GPT; return {"config", "curve": [{step, loss, size: accuracies}], "final"}."""
    from tqdm import tqdm

    from ..train.optim import TrainConfig, build_optimizers, lr_multiplier

    model = tiny_gpt(cfg)
    schedule = TrainConfig(num_steps=cfg.steps, lr=cfg.lr, warmup_steps=min(50, cfg.steps // 10), weight_decay=0.0,
                           tensorboard=False, progress=False, seed=cfg.seed)
    optimizers = build_optimizers(model, schedule)
    data = torch.Generator().manual_seed(cfg.seed)
    held_out = torch.Generator().manual_seed(10_000 + cfg.seed)  # a separate stream: unseen boards
    tests = {size: sample_pairs(cfg.eval_boards, size, held_out) for size in cfg.test_sizes}
    curve = []

    def evaluate(at_step: int, loss: float | None) -> None:
        model.eval()
        curve.append({"step": at_step, "loss": loss,
                      **{str(size): cell_accuracy(model, *pair) for size, pair in tests.items()}})
        model.train()

    evaluate(0, None)
    bar = tqdm(range(1, cfg.steps + 1), desc="life --learn", disable=not progress)
    for at in bar:
        size = cfg.train_sizes[at % len(cfg.train_sizes)]
        inputs, targets = batch_tokens(*sample_pairs(cfg.batch, size, data))
        _, loss = model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_multiplier(at - 1, schedule)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if at % cfg.eval_every == 0 or at == cfg.steps:
            evaluate(at, loss.item())
            bar.set_postfix(acc=f"{curve[-1][str(cfg.train_sizes[0])]['cell_accuracy']:.3f}")
    return {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()},
            "parameters": sum(p.numel() for p in model.parameters()), "curve": curve, "final": curve[-1]}


def plot_learning(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_sizes = set(result["config"]["train_sizes"])
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    steps = [p["step"] for p in result["curve"]]
    for size in result["config"]["test_sizes"]:
        seen = int(size) in train_sizes
        ax.plot(steps, [p[str(size)]["cell_accuracy"] for p in result["curve"]], ls="-" if seen else "--",
                label=f"{size}x{size} ({'trained' if seen else 'unseen size'})")
    final = result["final"]
    size0 = str(result["config"]["train_sizes"][0])
    ax.axhline(final[size0]["copy_baseline"], color="grey", ls=":", lw=1, label=f"copy board t ({size0}x{size0})")
    ax.axhline(final[size0]["dead_baseline"], color="black", ls=":", lw=1, label=f"all dead ({size0}x{size0})")
    ax.set_xlabel("training steps")
    ax.set_ylabel("cell accuracy, board t+1 (unseen boards)")
    ax.set_title("a tiny GPT learning Life's rule by next-token prediction", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=80)


def learn_markdown(result: dict) -> str:
    train_sizes = set(result["config"]["train_sizes"])
    lines = [f"Tiny GPT, {result['parameters']:,} parameters, {result['config']['steps']} steps of "
             f"{result['config']['batch']} boards (sizes {sorted(train_sizes)}).", "",
             "| board | in training | cell accuracy | boards all right | copy baseline | all-dead baseline |",
             "|---|---|---|---|---|---|"]
    for size in result["config"]["test_sizes"]:
        f = result["final"][str(size)]
        lines.append(f"| {size}x{size} | {'yes' if size in train_sizes else 'no'} | {f['cell_accuracy']:.3f} | "
                     f"{f['boards_exact']:.3f} | {f['copy_baseline']:.3f} | {f['dead_baseline']:.3f} |")
    return "\n".join(lines) + "\n"


# ---- command ----------------------------------------------------------------------------------------------


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise GptlabError(f"board sizes are comma-separated integers, got {text!r}") from None
    if any(s < 3 for s in sizes):
        raise GptlabError(f"board sizes must be >= 3, got {text!r}")
    return sizes


def _cmd_life(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.learn:
        cfg = LearnConfig(str(out), _sizes(args.train_sizes), _sizes(args.test_sizes), args.train_steps,
                          eval_every=max(1, args.train_steps // 15), seed=args.seed)
        result = learn(cfg)
        atomic_write_text(out / "learn.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(out / "learn.md", learn_markdown(result))
        plot_learning(result, out / "learn.png")
        print(learn_markdown(result) + f"wrote {out / 'learn.md'}, learn.json, learn.png")
        return
    if args.size < 3 or args.steps < 1:
        raise GptlabError("--size must be >= 3 and --steps >= 1")
    frames = run(pattern_board(args.pattern, args.size, seed=args.seed), args.steps)
    scale = max(1, 512 // args.size)
    write_gif(frames, out / f"life_{args.pattern}.gif", scale)
    shown = write_strip(frames, out / f"life_{args.pattern}.png", max(1, 128 // args.size))
    alive = [int(f.sum()) for f in frames]
    print(f"{args.pattern} on {args.size}x{args.size}, {args.steps} steps: live cells {alive[0]} -> {alive[-1]} "
          f"(min {min(alive)}, max {max(alive)}); strip shows generations {shown}")
    print(f"wrote {out / f'life_{args.pattern}.gif'} and {out / f'life_{args.pattern}.png'}")


def register_lab(commands) -> None:
    p = commands.add_parser("life", help="Conway's Game of Life (GIF + PNG strip), or --learn: a tiny GPT learns the rule")
    p.add_argument("--size", type=int, default=64, help="board side in cells (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="generations to simulate (default: %(default)s)")
    p.add_argument("--pattern", default="glider", help=f"{' | '.join(PATTERNS)} (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random board / training seed (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--learn", action="store_true", help="train a tiny GPT on Life trajectories instead")
    p.add_argument("--train-steps", type=int, default=1000, help="--learn: optimizer steps (default: %(default)s)")
    p.add_argument("--train-sizes", default="6,8", help="--learn: board sizes trained on (default: %(default)s)")
    p.add_argument("--test-sizes", default="6,8,7,10", help="--learn: board sizes tested (default: %(default)s)")
    p.set_defaults(func=_cmd_life)
