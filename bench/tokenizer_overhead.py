"""What gptlab's Tokenizer adds on top of tiktoken when encoding, counted in executed instructions
(valgrind's cachegrind) instead of seconds: instruction counts do not move with the load of a shared machine,
wall-clock ratios between two calls of the same library do (by +-50% on our 2 shared cores).

    python bench/tokenizer_overhead.py --tokenizer runs/default/tokenizer.json [--max-bytes 1500000]

Each mode runs in its own `valgrind --tool=cachegrind` process with the same setup (tokenizer, a separate
tiktoken Encoding built from the same vocabulary, the texts); a mode's cost is its instruction count minus
that of the setup alone. Modes: `encode_batch` on documents (what `data prepare` and the benchmark use) and
`encode` on short lines, one call each (where a Python wrapper shows most), for gptlab and tiktoken.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
MODES = ["setup", "gptlab encode_batch", "tiktoken encode_ordinary_batch", "gptlab encode", "tiktoken encode_ordinary"]


def child(tokenizer_path: str, texts_path: str, mode: str) -> None:
    import tiktoken

    from gptlab.tokenizer import SPLIT_PATTERN, Tokenizer

    tok = Tokenizer.load(tokenizer_path)
    specials = tok.special_tokens
    ranks = {tok.id_to_bytes(i): i for i in range(tok.vocab_size) if i not in specials.values()}
    plain = tiktoken.Encoding("plain", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    docs, lines = json.loads(Path(texts_path).read_text(encoding="utf-8"))
    run = {"setup": lambda: None,
           "gptlab encode_batch": lambda: tok.encode_batch(docs, num_threads=1),
           "tiktoken encode_ordinary_batch": lambda: plain.encode_ordinary_batch(docs, num_threads=1),
           "gptlab encode": lambda: [tok.encode(t) for t in lines],
           "tiktoken encode_ordinary": lambda: [plain.encode_ordinary(t) for t in lines]}
    run[mode]()


def instructions(args, texts_path: str, mode: str) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                          sys.executable, __file__, "--child", mode, "--tokenizer", args.tokenizer,
                          "--texts", texts_path], env=env, capture_output=True, text=True, check=True)
    return int(re.search(r"I\s+refs:\s+([\d,]+)", out.stderr).group(1).replace(",", ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--mixture", default="default")
    ap.add_argument("--max-bytes", type=int, default=1_500_000, help="text read from the mixture")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--texts", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.tokenizer, args.texts, args.child)
    from gptlab.data.mixture import load_mixture

    texts = [d.text for d in load_mixture(args.mixture, max_bytes=args.max_bytes).documents("train")]
    docs = texts[::8]
    lines = [line for t in texts for line in t.split("\n") if line][:3000]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump([docs, lines], f)
    counts = {mode: instructions(args, f.name, mode) for mode in MODES}
    os.unlink(f.name)
    sizes = {"batch": (len(docs), sum(len(t.encode()) for t in docs)),
             "encode": (len(lines), sum(len(t.encode()) for t in lines))}
    print(f"instructions executed beyond the setup ({counts['setup']:,}); mixture {args.mixture}, "
          f"{sizes['batch'][0]} documents ({sizes['batch'][1]:,} bytes) / {sizes['encode'][0]} lines "
          f"({sizes['encode'][1]:,} bytes)")
    for mode in MODES[1:]:
        calls, nbytes = sizes["batch" if "batch" in mode else "encode"]
        cost = counts[mode] - counts["setup"]
        print(f"{mode:32s} {cost:>14,} ({cost / nbytes:6.1f} per byte, {cost / calls:9,.0f} per text)")


if __name__ == "__main__":
    main()
