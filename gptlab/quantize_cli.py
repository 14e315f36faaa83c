"""`gptlab quantize`: write a model directory with int8 weights (quant.py) for faster, smaller inference.

    gptlab quantize --model DIR --bits 8 --out DIR_INT8

The output is an ordinary model directory (gptlab.json format 2, SHA256SUMS) that `sample`, `chat`,
`serve` and every loader read as a quantized model; files a stage added to the source (imported.json,
generation_config.json) are copied, so an imported model keeps its chat format and sampling settings.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import IMPORTED_FILE, load_model_dir, save_model_dir
from .common import GptlabError, get_logger
from .infer.generation_config import GENERATION_CONFIG_FILE
from .quant import QUANT_METHODS, quantize_model

log = get_logger("quantize")
CARRIED_FILES = (IMPORTED_FILE, GENERATION_CONFIG_FILE)  # travel with the weights, unchanged


def quantize_dir(model_dir: str | Path, out: str | Path, bits: int = 8) -> Path:
    """Quantize the model directory `model_dir` into the new directory `out`."""
    model_dir, out = Path(model_dir), Path(out)
    methods = {b: name for name, b in QUANT_METHODS.items()}
    if bits not in methods:
        raise GptlabError(f"--bits {bits} is not supported (supported: {', '.join(map(str, methods))})")
    if out.resolve() == model_dir.resolve():
        raise GptlabError(f"--out {out} is the input directory: write the quantized model elsewhere")
    model, tokenizer = load_model_dir(model_dir)
    quantize_model(model, methods[bits])
    extra = {name: (model_dir / name).read_bytes() for name in CARRIED_FILES if (model_dir / name).is_file()}
    save_model_dir(out, model, tokenizer, extra_files=extra)
    log.info("quantized %s to int%d -> %s (weights %.0f MB -> %.0f MB)", model_dir, bits, out,
             (model_dir / "model.safetensors").stat().st_size / 1e6, (out / "model.safetensors").stat().st_size / 1e6)
    return out


def register(sub) -> None:
    p = sub.add_parser("quantize", help="write a model directory with int8 weights (weight-only, per channel)")
    p.add_argument("--model", required=True, help="model directory to quantize")
    p.add_argument("--bits", type=int, default=8, help="weight bits (default: %(default)s; only 8)")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=lambda args: quantize_dir(args.model, args.out, args.bits))
