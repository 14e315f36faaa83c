"""`gptlab lab compression`: bits per byte of a language model as a compressor vs the classic compressors.

For each text sample: gzip -9, bz2 -9, xz -9e (lzma preset 9 | EXTREME), zstd -19, brotli -q 11, and
`gptlab compress` with each model, the file's size with and without the model's own size added (Delétang et
al. 2023 count the weights as part of the compressed output: a 135M-parameter model costs ~540 MB, so on a
few KB it loses by orders of magnitude), encode and decode speed. Writes compression.md (the table) and
compression.png (bars of bits per byte) to --out.

Design decisions
- Samples are given as KIND=FILE (`--sample`, repeatable), or built from a data folder (`--data`, the layout
  of the project's shared data: gutenberg/, sotu/, chinese-poetry/poems.jsonl) plus a Python stdlib module.
  Each is cut to `--bytes` bytes from the middle of its file, at line (or word) boundaries: the model is slow on a CPU
  (SmolLM2-135M: ~5 tokens/s at batch 1 on a shared core), and the middle skips licence headers. "Held-out" is as
  good as one can do for a public model: whether these texts were in its training data is unknown.
- Every gptlab file is decompressed and compared byte for byte (`--verify`, default all samples; decoding
  is as slow as encoding, so a benchmark under a CPU budget may verify only the first few).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import inspect
import json
import lzma
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..common import GptlabError, atomic_write_text, save_figure

CLASSIC = ("gzip -9", "bz2 -9", "xz -9e", "zstd -19", "brotli -q11")


def classic_sizes(data: bytes) -> dict[str, int]:
    import brotli
    import zstandard

    return {
        "gzip -9": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "bz2 -9": len(bz2.compress(data, compresslevel=9)),
        "xz -9e": len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)),
        "zstd -19": len(zstandard.ZstdCompressor(level=19).compress(data)),
        "brotli -q11": len(brotli.compress(data, quality=11)),
    }


def middle_excerpt(data: bytes, n_bytes: int) -> bytes:
    """About `n_bytes` from the middle of `data`, cut after a newline (or else a space) at both ends when
    there is one in the outer halves, so a sample starts and ends at a line or word boundary."""
    if len(data) <= n_bytes:
        return data
    mid = (len(data) - n_bytes) // 2
    start = next((i + 1 for sep in (b"\n", b" ") if 0 <= (i := data.find(sep, mid, mid + n_bytes // 2)) ), mid)
    piece = data[start:start + n_bytes]
    end = next((i + 1 for sep in (b"\n", b" ") if (i := piece.rfind(sep, n_bytes // 2)) >= 0), len(piece))
    return piece[:end]


def default_samples(data_dir: Path, n_bytes: int) -> dict[str, bytes]:
    """English prose (Austen), a speech (the last State of the Union in sotu/), Chinese poems, Python code."""
    import textwrap

    def read(path: Path) -> bytes:
        if not path.is_file():
            raise GptlabError(f"sample source not found: {path} (give --sample KIND=FILE instead)")
        return path.read_bytes()

    speeches = sorted(p for p in (data_dir / "sotu").glob("*.txt"))
    if not speeches:
        raise GptlabError(f"no speeches in {data_dir / 'sotu'}")
    poems = []
    for line in read(data_dir / "chinese-poetry" / "poems.jsonl").decode("utf-8").splitlines()[-400:]:
        record = json.loads(line)
        poems.append(f"{record['title']}\n{record['author']}\n{record['text']}\n")
    return {
        "English prose": middle_excerpt(read(data_dir / "gutenberg" / "austen-persuasion.txt"), n_bytes),
        f"speech ({speeches[-1].stem})": middle_excerpt(read(speeches[-1]), n_bytes),
        "Python code (textwrap.py)": middle_excerpt(inspect.getsource(textwrap).encode(), n_bytes),
        "Chinese poems": middle_excerpt("\n".join(poems).encode(), n_bytes),
    }


@dataclass
class ModelRun:
    name: str
    size_bytes: int  # of its weights file
    compressed: dict[str, int] = field(default_factory=dict)
    encode_kbps: dict[str, float] = field(default_factory=dict)
    decode_kbps: dict[str, float] = field(default_factory=dict)


def run_model(model_name: str, samples: dict[str, bytes], verify: int, window: int | None) -> ModelRun:
    from ..apps.models import resolve_model_dir
    from .compress import CodecSettings, compress, decompress, load_codec_model

    model, tokenizer, model_id = load_codec_model(model_name)
    weights = resolve_model_dir(model_name) / "model.safetensors"
    run = ModelRun(Path(model_name).name, weights.stat().st_size)
    settings = CodecSettings(window=window)
    for n, (kind, data) in enumerate(samples.items()):
        start = time.perf_counter()
        blob = compress(data, model, tokenizer, model_id, settings)
        run.encode_kbps[kind] = len(data) / 1024 / (time.perf_counter() - start)
        run.compressed[kind] = len(blob)
        if n < verify:
            start = time.perf_counter()
            if decompress(blob, model, tokenizer, model_id, kind) != data:
                raise AssertionError(f"{kind}: round trip failed")
            run.decode_kbps[kind] = len(data) / 1024 / (time.perf_counter() - start)
        print(f"{run.name} {kind}: {len(data)} -> {len(blob)} bytes ({8 * len(blob) / len(data):.3f} bits/byte), "
              f"encode {run.encode_kbps[kind]:.3f} KB/s", flush=True)
    return run


def render_table(samples: dict[str, bytes], classic: dict[str, dict[str, int]], runs: list[ModelRun]) -> str:
    kinds = list(samples)
    lines = ["Bits per byte (compressed file size x 8 / original bytes; lower is better).", "",
             "| compressor | " + " | ".join(f"{k} ({len(samples[k])} B)" for k in kinds) + " |",
             "|---" * (len(kinds) + 1) + "|"]
    for name in CLASSIC:
        lines.append(f"| {name} | " + " | ".join(f"{8 * classic[k][name] / len(samples[k]):.3f}" for k in kinds) + " |")
    for run in runs:
        lines.append(f"| gptlab {run.name} | " + " | ".join(
            f"**{8 * run.compressed[k] / len(samples[k]):.3f}**" for k in kinds) + " |")
        lines.append(f"| gptlab {run.name} + weights ({run.size_bytes / 1e6:.0f} MB) | " + " | ".join(
            f"{8 * (run.compressed[k] + run.size_bytes) / len(samples[k]):.0f}" for k in kinds) + " |")
    lines += ["", "Speed of gptlab (KB/s of original bytes; decode only for the verified samples):", "",
              "| model | sample | bytes | compressed bytes | encode KB/s | decode KB/s |", "|---|---|---|---|---|---|"]
    for run in runs:
        for k in kinds:
            decode = f"{run.decode_kbps[k]:.3f}" if k in run.decode_kbps else "-"
            lines.append(f"| {run.name} | {k} | {len(samples[k])} | {run.compressed[k]} | "
                         f"{run.encode_kbps[k]:.3f} | {decode} |")
    return "\n".join(lines) + "\n"


def plot(samples: dict[str, bytes], classic: dict[str, dict[str, int]], runs: list[ModelRun], out: Path) -> None:
    from .views import pyplot_cjk

    plt = pyplot_cjk()
    kinds = list(samples)
    series = [(name, [8 * classic[k][name] / len(samples[k]) for k in kinds]) for name in CLASSIC]
    series += [(f"gptlab {r.name}", [8 * r.compressed[k] / len(samples[k]) for k in kinds]) for r in runs]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(2.2 * len(kinds) + 2, 4.5))
    for n, (name, values) in enumerate(series):
        ax.bar([i + n * width for i in range(len(kinds))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds, fontsize=8)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("compressed size per original byte")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, out, dpi=90)


def _cmd_compression(args: argparse.Namespace) -> None:
    samples = {}
    for spec in args.sample:
        kind, sep, path = spec.partition("=")
        if not sep or not kind:
            raise GptlabError(f"--sample {spec!r}: expected KIND=FILE")
        try:
            samples[kind] = middle_excerpt(Path(path).read_bytes(), args.bytes)
        except OSError as e:
            raise GptlabError(f"--sample {kind}: cannot read {path}: {e.strerror}") from None
    if not samples:
        if not args.data:
            raise GptlabError("give --sample KIND=FILE or --data DIR (gutenberg/, sotu/, chinese-poetry/)")
        samples = default_samples(Path(args.data), args.bytes)
    empty = [k for k, v in samples.items() if not v]
    if empty:
        raise GptlabError(f"sample {empty[0]!r} is empty")
    classic = {k: classic_sizes(v) for k, v in samples.items()}
    runs = [run_model(m, samples, args.verify, args.window) for m in args.model]
    table = render_table(samples, classic, runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}"
    atomic_write_text(out / "compression.md", f"# LLM as a compressor\n\nMachine: {machine}.\n\n{table}")
    plot(samples, classic, runs, out / "compression.png")
    print(table)
    print(f"wrote {out / 'compression.md'} and {out / 'compression.png'}")


def register_lab(commands) -> None:
    p = commands.add_parser("compression", help="bits per byte of models as compressors vs gzip/bz2/xz/zstd/brotli")
    p.add_argument("--model", action="append", required=True, help="model directory or name (repeatable)")
    p.add_argument("--out", required=True, help="folder for compression.md and compression.png")
    p.add_argument("--sample", action="append", default=[], metavar="KIND=FILE", help="a text sample (repeatable)")
    p.add_argument("--data", default=None, help="data folder to build the default samples from")
    p.add_argument("--bytes", type=int, default=2048, help="bytes per sample, from the middle of its file")
    p.add_argument("--verify", type=int, default=1 << 30, metavar="N",
                   help="decompress and check the first N samples (default all)")
    p.add_argument("--window", type=int, default=None, help="model context window in tokens (default min(1024, context))")
    p.set_defaults(func=_cmd_compression)
