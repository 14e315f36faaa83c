"""Packing vs BOS-aligned rows: how many prepared tokens each loader design trains on.

    python bench/bench_packing.py --data runs/default/data

Packing (gptlab's loader) cuts the token stream into T+1 windows: nothing is lost. BOS-aligned rows start
every row at a document start; a document that does not fit the row's remaining space is cropped and its
tail discarded. "greedy" takes documents in order; "best-fit" (nanochat's choice) picks, from a buffer of
the next 1,000 documents, the longest that fits, and crops only when none does.
"""

import argparse
import bisect
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gptlab.data.shards import open_split  # noqa: E402


def doc_lengths(data_dir: str) -> list[int]:
    tokens, meta = open_split(data_dir, "train")
    stream = tokens.slice(0, len(tokens))
    starts = np.flatnonzero(stream == meta["bos_id"])
    return np.diff(np.append(starts, len(stream))).tolist()


def greedy_crop(lengths: list[int], row: int) -> float:
    used, space = 0, row
    for n in lengths:
        take = min(n, space)
        used += take
        space -= take
        if space == 0:
            space = row
    return used


def best_fit_crop(lengths: list[int], row: int, buffer: int = 1000) -> float:
    pending = sorted(lengths[:buffer])
    rest = iter(lengths[buffer:])
    used = 0
    while pending:
        space = row
        while space > 0 and pending:
            i = bisect.bisect_right(pending, space) - 1
            if i >= 0:
                n = pending.pop(i)  # the longest document that fits whole
            else:
                n = pending.pop(0)  # none fits: crop the shortest, discard its tail
            take = min(n, space)
            used += take
            space -= take
            nxt = next(rest, None)
            if nxt is not None:
                bisect.insort(pending, nxt)
    return used


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="runs/default/data")
    args = ap.parse_args()
    lengths = doc_lengths(args.data)
    total = sum(lengths)
    print(f"{len(lengths):,} documents, {total:,} tokens, median length {int(np.median(lengths))}")
    print("| T | packing (gptlab) | BOS-aligned greedy crop | BOS-aligned best-fit crop |")
    print("|---|---|---|---|")
    for T in (256, 512, 1024, 2048):
        row = T + 1
        print(f"| {T} | 100.0% | {greedy_crop(lengths, row) / total:.1%} | {best_fit_crop(lengths, row) / total:.1%} |")


if __name__ == "__main__":
    main()
