"""Model directories: the one on-disk form of a gptlab model, shared by every stage.

A model directory holds
    gptlab.json          {"format": 1, "model": GPTConfig fields, "tokenizer_sha256": ...}; a quantized model
                         (quant.py) has "format": 2 and "quantization": {"method": ..., "bits": 8}
    model.safetensors    weights under Hugging Face Llama names (a tied lm_head is stored once; a quantized
                         layer as int8 `<name>.weight` + float32 `<name>.weight_scale`)
    tokenizer.json       the Hugging Face tokenizer file
    SHA256SUMS           `<sha256>  <file>` for every file above and any a stage adds (a reward model's
                         head, `imported.json`), in `sha256sum -c` format, written last

Loading checks that the tokenizer is the one the weights were trained with (its checksum) and that the
vocabulary sizes agree, so a model never silently runs with someone else's tokenizer.

Checksums (`write_checksums`, `verify_checksums`), design decisions:
- Every directory gptlab writes for a model (model dirs, reward model dirs, training checkpoints, LoRA
  adapters, HF exports) lists the files it wrote in SHA256SUMS, written after them. Each file is replaced
  atomically, so a save cut short leaves either no manifest (a new directory; gptlab.json, written last
  before it, is then usually missing too) or the previous manifest, which the new files fail: detectable
  either way. Every loader verifies first and names the file (with its directory) that is missing or
  differs; directories without SHA256SUMS (a Hugging Face folder, model dirs from before checksums) load
  unverified, with a debug log line. Files a manifest does not list are not checked.
- Hash once, then trust a stamp, rather than hash while reading: safetensors reads the weights itself
  (pread or memory-mapped, `_read_weights`), so there is no read of ours to hash along the way, and a
  separate pass on every load would cost a full read of every big model. `.SHA256SUMS.verified` beside the
  manifest records, per file, the digest it matched and the file's (size, mtime_ns, ctime_ns, inode); a load
  that finds the same stat skips the hash. Measured on a 541 MB fp32 model dir (warm page cache, SHA
  extensions, ~1.7 GB/s of CPU time): the first load hashes for 0.35 s of CPU time (1.4-1.6 s wall on a
  shared 2-core machine), a stamped load adds under 5 ms. The stamp notices every change made through the
  file system: writing a file moves its mtime and ctime (ctime cannot be set back, unlike mtime with
  `touch -d` or `rsync -t`), a replaced or copied file has a new inode. It cannot notice media corruption
  under an unchanged stat; delete the stamp (or run `sha256sum -c SHA256SUMS`) to rehash.
- A file whose ctime is less than 2 s old is verified but not stamped: timestamps advance in clock ticks,
  so a same-size rewrite within the tick of a verification would leave the stat unchanged (git's "racy
  clean" case). A directory that is saved and loaded at once is thus hashed again on its next load.
- The stamp lives in the directory rather than in a user cache: no global state, it moves and is deleted
  with the directory, and it vouches for no more than the manifest beside it. Where the directory is
  read-only it cannot be written and every load rehashes (correct, only slower).

Training checkpoints (`save_training_checkpoint`) are a model directory plus what an exact resume needs:
    trainer.json         step, loader state, run config, anything the trainer adds (readable, diffable)
    trainer.pt           optimizer states and the RNG states of every rank (python, numpy, torch, cuda)
    SHA256SUMS           `<sha256>  <file>` for every file above, written last
Design decisions: every file is written atomically, and the whole checkpoint is assembled in a hidden
temp directory that is renamed to `step_<N>` only once its checksum file is written, so a crash leaves
either a complete checkpoint or none. Checksums still matter because disks and copies corrupt files after
the fact: `verify_checkpoint` names the file that does not match, and `latest_valid_checkpoint` skips such
a checkpoint and falls back to the newest one that verifies. `trainer.pt` is read with
`torch.load(weights_only=True)`, so a checkpoint cannot run code; numpy's RNG state is stored as lists.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .common import (GptlabError, atomic_write_bytes, atomic_write_json, fsync_dir, get_logger, json_bytes,
                     read_json, sha256_file)
from .model import GPT, GPTConfig
from .quant import QUANT_METHOD_NAME, QUANT_METHODS, is_quantized, quantize_model
from .tokenizer import Tokenizer

MODEL_FORMAT = 1
QUANTIZED_FORMAT = 2  # model dirs with int8 weights (quant.py); readers before it refuse them by format
IMPORTED_FILE = "imported.json"  # written by `gptlab import`: source, special tokens, chat template
CHECKSUMS = "SHA256SUMS"
VERIFIED_STAMP = ".SHA256SUMS.verified"  # per-file stat of the last successful verification (module docstring)
RECENT_NS = 2_000_000_000  # files changed this recently are verified but not stamped
MODEL_FILES = ("model.safetensors", "tokenizer.json", "gptlab.json")
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")  # sha256sum's text (two spaces) and binary (" *") forms
TRAINER_META = "trainer.json"
TRAINER_STATE = "trainer.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")

log = get_logger("checkpoint")


# ---------------------------------------------------------------------------------------------------------
# Checksums


def write_checksums(path: str | Path, names: Iterable[str]) -> None:
    """Write `path`/SHA256SUMS for the files `names` of directory `path` (call it after writing them)."""
    path = Path(path)
    sums = "".join(f"{sha256_file(path / name)}  {name}\n" for name in sorted(set(names)))
    atomic_write_bytes(path / CHECKSUMS, sums.encode())


def read_checksums(path: str | Path) -> dict[str, str] | None:
    """{file name: sha256} from `path`/SHA256SUMS, or None when the directory has none."""
    sums_file = Path(path) / CHECKSUMS
    if not sums_file.is_file():
        return None
    expected = {}
    for lineno, line in enumerate(sums_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        match = _SUMS_LINE.match(line)
        if not match or "/" in match.group(2) or match.group(2) in (".", ".."):
            raise GptlabError(f"{sums_file}:{lineno}: not a '<sha256>  <file name>' line")
        expected[match.group(2)] = match.group(1).lower()
    return expected


def verify_checksums(path: str | Path, what: str, required: Iterable[str] = ()) -> bool:
    """Check every file listed in `path`/SHA256SUMS (hashing only those whose stamp is stale, see the
    module docstring); False if there is no SHA256SUMS. A listed file that is missing or differs, or a
    `required` file the manifest does not list, is a GptlabError naming it (`what`: "model", ...)."""
    path = Path(path)
    expected = read_checksums(path)
    if expected is None:
        log.debug("%s has no %s: its files are not verified", path, CHECKSUMS)
        return False
    for name in required:
        if name not in expected:
            raise GptlabError(f"{what} {path}/{CHECKSUMS} does not list {name}")
    stamps = _read_stamps(path)
    verified = {}
    now = time.time_ns()
    for name, digest in expected.items():
        file = path / name
        try:
            stamp = _stamp(os.stat(file), digest)
            if stamps.get(name) != stamp:
                with open(file, "rb") as f:  # stamp the stat from before hashing: a change while hashing shows
                    stamp = _stamp(os.fstat(f.fileno()), digest)
                    if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                        raise GptlabError(f"{what} file {file} is corrupt (sha256 does not match {CHECKSUMS}: "
                                          f"changed or damaged since it was saved; if the change was deliberate, "
                                          f"regenerate {CHECKSUMS})")
        except FileNotFoundError:
            raise GptlabError(f"{what} file missing: {file} (listed in {CHECKSUMS})") from None
        except OSError as e:
            raise GptlabError(f"cannot read {what} file {file}: {e.strerror or e}") from None
        if stamp[3] < now - RECENT_NS:  # its ctime: see the module docstring on recent files
            verified[name] = stamp
    if verified != stamps:
        try:
            atomic_write_json(path / VERIFIED_STAMP, verified)
        except OSError as e:  # a read-only directory: every load rehashes
            log.debug("cannot record the verification of %s: %s", path, e)
    return True


def _stamp(st: os.stat_result, digest: str) -> list:
    """What a verification stamp records of a file: the digest it matched and the stat that identifies it."""
    return [digest, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_stamps(path: Path) -> dict[str, list]:
    """{file name: stamp} from the stamp file; a missing or malformed one counts as empty (all is rehashed)."""
    try:
        stamps = read_json(path / VERIFIED_STAMP, "verification stamp")
    except (GptlabError, OSError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


# ---------------------------------------------------------------------------------------------------------
# Model directories


def save_model_dir(path: str | Path, model: GPT, tokenizer: Tokenizer,
                   state: dict[str, torch.Tensor] | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write `model` (its config, and its weights or `state`: the gathered weights of a sharded model) with
    `tokenizer` as a model directory; `extra_files` (name -> bytes) are written into it too, all before the
    SHA256SUMS that covers them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    extra_files = extra_files or {}
    state = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if state is None else state).items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    atomic_write_bytes(path / "model.safetensors", save(state, metadata={"format": "pt"}))
    tokenizer.save(path / "tokenizer.json")
    for name, data in extra_files.items():
        atomic_write_bytes(path / name, data)
    meta = {"format": MODEL_FORMAT, "model": model.config.to_dict(), "tokenizer_sha256": tokenizer.sha256}
    if is_quantized(model):
        meta.update(format=QUANTIZED_FORMAT, quantization={"method": QUANT_METHOD_NAME, "bits": QUANT_METHODS["int8"]})
    atomic_write_json(path / "gptlab.json", meta)
    write_checksums(path, [*MODEL_FILES, *extra_files])
    return path


def model_from_state(config: GPTConfig, state: dict[str, torch.Tensor], source: str,
                     quantized: bool = False) -> GPT:
    """A GPT holding `state` (HF names). The model is built on the meta device and the tensors are
    assigned, so no memory goes to a random init and no second copy is made. A tied head may be absent
    from `state`; missing, unexpected or misshapen weights are a GptlabError naming `source`.
    `quantized`: `state` holds int8 weights and scales (quant.py), loaded into a quantized skeleton."""
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"), _NoRandomInit():
        model = GPT(config)
        if quantized:
            quantize_model(model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches: the config does not describe these weights
        raise GptlabError(f"weights in {source} do not match their config: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise GptlabError(f"weights in {source} do not match their config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    if config.tie_embeddings and not quantized:  # a quantized tied head reads the embedding module itself
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


class _NoRandomInit(torch.overrides.TorchFunctionMode):
    """`Tensor.normal_` and `nn.init.normal_` do nothing inside it: for a skeleton built on the meta device,
    whose tensors hold no values to fill. torch 2.13's meta kernel for normal_ is a Python decomposition whose
    first call imports torch._dynamo and sympy: 50 MB of RSS that `gptlab sample` otherwise never needs, and
    1.2-1.6 s of its first load (bench/results/quant.md). Meta tensors draw nothing from the CPU generator, so
    skipping them leaves the RNG state as it was."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.normal_, nn.init.normal_):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def load_model_dir(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   quantize: str | None = None, *, head_in_out: bool = False) -> tuple[GPT, Tokenizer]:
    """Load a model directory, after verifying its checksums (if it has a SHA256SUMS). `quantize` ("int8"):
    quantize the weights as they load (quant.py); a quantized directory loads quantized either way.
    `head_in_out`: read the output head's float weight (the embedding table when tied) into the (in, out)
    layout the fused decoder multiplies with (`_read_weights`; `load_for_inference` sets it)."""
    path = Path(path)
    verify_checksums(path, "model")
    meta = read_json(path / "gptlab.json", "model config")
    fmt = meta.get("format")
    if isinstance(fmt, int) and fmt > QUANTIZED_FORMAT:
        raise GptlabError(f"{path}/gptlab.json has format {fmt}, written by a newer gptlab (this one reads "
                          f"formats {MODEL_FORMAT}-{QUANTIZED_FORMAT}): upgrade gptlab")
    if fmt not in (MODEL_FORMAT, QUANTIZED_FORMAT):
        raise GptlabError(f"{path}/gptlab.json has format {fmt}, expected {MODEL_FORMAT} or {QUANTIZED_FORMAT}")
    quantized = fmt == QUANTIZED_FORMAT
    if quantized and meta.get("quantization", {}).get("method") != QUANT_METHOD_NAME:
        raise GptlabError(f"{path}/gptlab.json: quantization {meta.get('quantization')} is not supported "
                          f"(supported: {QUANT_METHOD_NAME})")
    try:
        config = GPTConfig(**meta["model"])
    except (TypeError, ValueError, KeyError) as e:
        raise GptlabError(f"{path}/gptlab.json has an invalid model config: {e}") from None
    tokenizer = Tokenizer.load(path / "tokenizer.json")
    if meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise GptlabError(f"{path}/tokenizer.json is not the tokenizer this model was trained with "
                          f"(checksum {tokenizer.sha256[:12]} != {meta['tokenizer_sha256'][:12]})")
    if tokenizer.vocab_size > config.vocab_size:
        raise GptlabError(f"tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only "
                          f"{config.vocab_size}")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise GptlabError(f"weights not found: {weights}")
    head = None
    if head_in_out and not quantized and quantize is None:  # an int8 head is int8 rows, not a float matmul
        head = "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
    try:
        state = _read_weights(weights, head)
    except (SafetensorError, OSError, ValueError) as e:
        raise GptlabError(f"cannot read weights {weights}: {e}") from None
    model = model_from_state(config, state, str(weights), quantized=quantized)
    # the model now holds the only references: quantizing frees each float weight as it replaces it (with
    # `state` alive, `gptlab sample --quantize int8` on SmolLM2 peaked at 1,107-1,160 MB; 948-995 without)
    del state
    if quantize is not None:
        quantize_model(model, quantize)
    _apply_imported_chat_format(path, tokenizer)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _read_weights(path: Path, in_out: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file in the process's own memory, read with pread(2) (safetensors >= 0.8)
    rather than memory-mapped: a memory-mapped file stays mapped while any one of its tensors lives (a norm
    weight), so the pages of weights the fused decoder has already re-laid out stayed resident too. Measured
    with `gptlab sample` on SmolLM2-135M: 525 MB of the file still resident after the first step
    (bench/results/quant.md). Older safetensors memory-map.

    `in_out`: the name of a 2-d (out, in) weight to read into an (in, out)-contiguous tensor, returned as its
    (out, in) transposed view (`_read_transposed`): the layout in which the fused decoder's head multiplies
    fast (x @ W at one row: 5 ms for SmolLM2's 49152 x 576 head vs 10 ms through the (out, in) layout, one
    thread; infer/fused.py). Read so, the decoder finds the weight in place; read as stored, it had to copy
    it while the original still lived (+113 MB of peak RSS for SmolLM2's tied table, bench/results/quant.md)."""
    try:
        with safe_open(path, framework="pt", backend="pread") as f:
            names = list(f.keys())
            state = {name: f.get_tensor(name) for name in names if name != in_out}
    except TypeError:  # safetensors < 0.8 has no backend argument
        return load_file(path)
    if in_out in names:
        state[in_out] = _read_transposed(path, in_out)
    return state


def _read_transposed(path: Path, name: str, rows_per_read: int = 1024) -> torch.Tensor:
    """Tensor `name` (2-d) of safetensors file `path` as the transposed view of an (in, out)-contiguous copy,
    read `rows_per_read` rows at a time into a small buffer and written transposed into place, so nothing
    larger than the result and the buffer is ever held. Reads the format's header itself (8-byte little-endian
    length, JSON); safetensors' own slice reader reads the whole tensor for every slice (measured with its
    pread backend: 113 MB more peak for one 1024-row slice). 0.11 s for SmolLM2's table, about the time of
    a plain read (0.10 s)."""
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    with open(path, "rb", buffering=0) as f:
        header_len = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_len))[name]
        dtype = dtypes.get(info["dtype"])
        rows, cols = info["shape"] if len(info["shape"]) == 2 else (0, 0)
        begin, end = info["data_offsets"]
        size = dtype.itemsize if dtype is not None else 0
        if dtype is None or rows * cols == 0 or end - begin != rows * cols * size:
            raise ValueError(f"{name}: {info} is not a 2-d float tensor")
        out = torch.empty(cols, rows, dtype=dtype)
        buffer = torch.empty(rows_per_read * cols * size, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        row_bytes = cols * size
        for start in range(0, rows, rows_per_read):
            n = min(rows_per_read, rows - start)
            f.seek(8 + header_len + begin + start * row_bytes)  # seek + readinto, not os.preadv: not on macOS
            if f.readinto(view[:n * row_bytes]) != n * row_bytes:
                raise ValueError(f"{name}: the file ends inside its data")
            out[:, start:start + n] = buffer[:n * row_bytes].view(dtype).view(n, cols).t()
    return out.t()


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       quantize: str | None = None) -> tuple[GPT, Tokenizer]:
    """`load_model_dir` for a model that will only run inference (sample, chat, serve, LocalLLM): no parameter
    requires grad, which lets the engine's fused decoder share the weights' storage instead of copying them
    (infer/fused.py), and the head's weight is read in the decoder's layout (`head_in_out`), so the decoder
    copies nothing of it either."""
    model, tokenizer = load_model_dir(path, device, dtype, quantize, head_in_out=True)
    return model.requires_grad_(False), tokenizer


def _apply_imported_chat_format(path: Path, tokenizer: Tokenizer) -> None:
    """An imported model's chat template and bos/eos tokens (imported.json) go onto its tokenizer."""
    if (path / IMPORTED_FILE).is_file():
        imported = read_json(path / IMPORTED_FILE, "import metadata")
        tokenizer.chat_template = imported.get("chat_template")
        tokenizer.bos_token, tokenizer.eos_token = imported.get("bos_token"), imported.get("eos_token")


def load_model_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model directory with its chat format, without loading the weights (for a client
    that talks to a server of this model and needs exact token counts or the chat template)."""
    path = Path(path)
    tokenizer = Tokenizer.load(path / "tokenizer.json")
    _apply_imported_chat_format(path, tokenizer)
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints


def rng_state() -> dict:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root` (`step_<N>` directories), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def save_training_checkpoint(root: str | Path, step: int, model: GPT, tokenizer: Tokenizer, *,
                             optimizers: list[torch.optim.Optimizer], rng_states: list[dict], meta: dict,
                             keep_last: int = 0, extra_files: dict[str, bytes] | None = None,
                             state: tuple[dict, list[dict]] | None = None) -> Path:
    """Write `root/step_<step>` (see the module docstring); keep only the newest `keep_last` (0 keeps all).

    `model` is the unwrapped model; if its parameters are sharded, `state` holds the gathered full model
    and optimizer states to write instead (`sharding.full_state`). `rng_states` holds one entry per rank;
    `meta` is JSON (step, loader state, run config, ...); `extra_files` (name -> bytes) are written into
    the checkpoint and covered by its checksums (e.g. a reward model's head)."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model_state, optimizer_states = state or (None, [opt.state_dict() for opt in optimizers])
    buf = io.BytesIO()
    torch.save({"optimizers": optimizer_states, "rng": rng_states}, buf)
    save_model_dir(tmp, model, tokenizer, state=model_state,
                   extra_files={TRAINER_STATE: buf.getvalue(), TRAINER_META: json_bytes({"step": step, **meta}),
                                **(extra_files or {})})
    if final.exists():  # same step saved again (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    if keep_last > 0:
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: str | Path) -> None:
    """Raise GptlabError naming the first file of checkpoint `path` that is missing or fails its checksum."""
    if not verify_checksums(path, "checkpoint", required=(TRAINER_META, TRAINER_STATE, *MODEL_FILES)):
        raise GptlabError(f"checkpoint {path} has no {CHECKSUMS} file (incomplete or not a checkpoint)")


def latest_valid_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under `root` that verifies; corrupt ones are reported and skipped."""
    for path in reversed(checkpoint_dirs(root)):
        try:
            verify_checkpoint(path)
            return path
        except GptlabError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def load_training_checkpoint(path: str | Path, model: GPT, tokenizer: Tokenizer,
                             optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Verify checkpoint `path`, check it belongs to this run (same model config and tokenizer), load the
    weights into `model` and the optimizer states in place, and return `trainer.json` with the RNG
    states of every rank added under "rng" (the caller restores its own rank's with `set_rng_state`)."""
    path = Path(path)
    verify_checkpoint(path)
    saved = read_json(path / "gptlab.json", "checkpoint model config")
    if saved.get("model") != model.config.to_dict():
        diff = {k: (v, model.config.to_dict().get(k)) for k, v in saved.get("model", {}).items()
                if model.config.to_dict().get(k) != v}
        raise GptlabError(f"checkpoint {path} was trained with a different model config "
                          f"(checkpoint vs this run: {diff})")
    if saved.get("tokenizer_sha256") != tokenizer.sha256:
        raise GptlabError(f"checkpoint {path} was trained with a different tokenizer "
                          f"(checksum {str(saved.get('tokenizer_sha256'))[:12]} != {tokenizer.sha256[:12]})")
    state = load_file(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise GptlabError(f"weights in {path} do not match the model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    trainer = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    if len(trainer["optimizers"]) != len(optimizers):
        raise GptlabError(f"checkpoint {path} holds {len(trainer['optimizers'])} optimizer states, this run "
                          f"uses {len(optimizers)} (different --optimizer?)")
    try:
        for opt, opt_state in zip(optimizers, trainer["optimizers"]):
            opt.load_state_dict(opt_state)
    except (ValueError, KeyError) as e:
        raise GptlabError(f"optimizer state in {path} does not fit this run: {e}") from None
    meta = read_json(path / TRAINER_META, "checkpoint trainer state")
    meta["rng"] = trainer["rng"]
    return meta
