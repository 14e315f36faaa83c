"""Start-up overhead of the `python` tool's sandbox: wall time per call of `print(1)` in the sandbox
(gptlab.tools.sandbox.Sandbox.run: launcher, namespaces, new root, workspace copy in and out, interpreter)
vs a plain `python -I -u -c 'print(1)'` subprocess of the same interpreter, and vs the unsafe local mode
(the same subprocess with the rlimits and the process-group kill, no isolation). Calls are interleaved
(sandbox, plain, local, sandbox, ...) so load from other work hits every side alike; median and p90 per side.
The workspace holds one small file, so the copy in and out is in the figure but small.

    python bench/bench_sandbox.py --calls 30 --out bench/results/sandbox.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptlab.tools.sandbox import Sandbox


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sandbox.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "data.txt").write_text("one small file\n")
        sandbox, local = Sandbox(folder), Sandbox(folder, unsafe_local=True)

        def plain() -> None:
            subprocess.run([sys.executable, "-I", "-u", "-c", "print(1)"], check=True, capture_output=True)

        def isolated() -> None:
            assert sandbox.run("print(1)").output == "1\n"

        def unsafe() -> None:
            assert local.run("print(1)").output == "1\n"

        sides = {"sandbox (namespaces)": isolated, "unsafe local (rlimits only)": unsafe, "plain subprocess": plain}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for fn in sides.values():  # warm the page cache
            fn()
        load_before = os.getloadavg()
        for _ in range(args.calls):
            for name, fn in sides.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1000)
        load_after = os.getloadavg()
    base = statistics.median(times["plain subprocess"])
    lines = [
        "# Sandbox start-up overhead (`python` tool)", "",
        f"Command: `python bench/bench_sandbox.py --calls {args.calls}`. Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}; loaded machine "
        f"(load average {load_before[0]:.1f} before, {load_after[0]:.1f} after). Each call runs `print(1)`; "
        "calls interleaved across the sides.", "",
        "| side | median ms | p90 ms | median minus plain ms |", "|---|---|---|---|"]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.1f} | {percentile(values, 0.9):.1f} | {median - base:+.1f} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
