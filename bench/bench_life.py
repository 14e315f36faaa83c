"""Frames per second of the Game of Life simulator (gptlab.lab.life.step: the 3x3 neighbour convolution as
separable shifted adds on uint8, circular padding) against a plain numpy loop over cells
(life.step_reference, the test oracle) and, for scale, the same convolution as `F.conv2d` (gptlab's first
version) and numpy with eight np.roll shifts. One random 1024x1024 board (density 0.3); every side's next
board is checked equal to gptlab's, so all do the same work. The loop is slow, so it runs fewer frames.

    python bench/bench_life.py --size 1024 --frames 50 --loop-frames 1 --threads 1
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from gptlab.lab.life import step, step_reference


_NEIGHBOURS = torch.ones(1, 1, 3, 3)
_NEIGHBOURS[0, 0, 1, 1] = 0


def step_conv2d(board: torch.Tensor) -> torch.Tensor:
    """The same convolution as one float `F.conv2d` with the 3x3 neighbour kernel, for comparison."""
    x = torch.nn.functional.pad(board[None, None].float(), (1, 1, 1, 1), mode="circular")
    counts = torch.nn.functional.conv2d(x, _NEIGHBOURS)[0, 0]
    return (counts == 3) | (board & (counts == 2))


def step_roll(board: np.ndarray) -> np.ndarray:
    counts = sum(np.roll(np.roll(board, di, 0), dj, 1).astype(np.uint8)
                 for di in (-1, 0, 1) for dj in (-1, 0, 1) if di or dj)
    return (counts == 3) | (board & (counts == 2))


def fps(fn, board, frames: int) -> tuple[float, object]:
    start = time.perf_counter()
    for _ in range(frames):
        board = fn(board)
    return frames / (time.perf_counter() - start), board


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--loop-frames", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/life.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    board = torch.rand(args.size, args.size, generator=torch.Generator().manual_seed(0)) < 0.3
    step(board)  # warm-up
    expected = step(board).numpy()
    load_before = os.getloadavg()[0]
    rows = []
    box_fps, _ = fps(step, board, args.frames)
    rows.append(("gptlab: separable shifted sums (torch, uint8)", box_fps, args.frames))
    conv_fps, _ = fps(step_conv2d, board, args.frames)
    rows.append(("torch F.conv2d, float kernel", conv_fps, args.frames))
    roll_fps, _ = fps(step_roll, board.numpy(), max(1, args.frames // 5))
    rows.append(("numpy, 8 np.roll shifts", roll_fps, max(1, args.frames // 5)))
    loop_fps, _ = fps(step_reference, board.numpy(), args.loop_frames)
    rows.append(("numpy, plain loop over cells", loop_fps, args.loop_frames))
    load_after = os.getloadavg()[0]
    assert np.array_equal(step_conv2d(board).numpy(), expected)
    assert np.array_equal(step_roll(board.numpy()), expected)
    assert np.array_equal(step_reference(board.numpy()), expected)
    lines = [f"# Game of Life simulator: frames per second at {args.size}x{args.size} on CPU", "",
             f"`python bench/bench_life.py --size {args.size} --frames {args.frames} --loop-frames {args.loop_frames} "
             f"--threads {args.threads}`; torch {torch.__version__}, numpy {np.__version__}, {args.threads} torch "
             f"thread(s); loaded machine (load average {load_before:.1f} before, {load_after:.1f} after; 2 cores "
             "shared with other work). Each side's next board equals gptlab's.", "",
             "| implementation | frames timed | frames/s | cells/s | vs plain loop |", "|---|---|---|---|---|"]
    for name, rate, frames in rows:
        lines.append(f"| {name} | {frames} | {rate:,.3g} | {rate * args.size ** 2:,.3g} | {rate / loop_fps:,.0f}x |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
