"""The LLM compressor (gptlab.lab.compress): lossless round trips of every kind of byte string, the coded
size against the model's own cross-entropy, and one-line errors for a wrong model, truncated or corrupted
files. A tiny random-init GPT (weights scaled up so its distributions are far from uniform) and a BPE
tokenizer trained on stdlib source + multilingual lines (conftest)."""

from __future__ import annotations

import gzip
import inspect
import math
import random
import textwrap

import numpy as np
import pytest
import torch

from gptlab.checkpoint import save_model_dir
from gptlab.cli import main as cli_main
from gptlab.common import GptlabError
from gptlab.lab import compress as glz
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import Tokenizer

MODEL_ID = "ab" * 32
TEXT = inspect.getsource(textwrap)


def _tiny_model(vocab_size: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, head_dim=16,
                       intermediate_size=64, max_seq_len=64)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
    return model


@pytest.fixture(scope="module")
def model(small_tokenizer):
    return _tiny_model(small_tokenizer.vocab_size, 0)


def _round_trip(data: bytes, model, tok, window: int = 64) -> bytes:
    blob = glz.compress(data, model, tok, MODEL_ID, glz.CodecSettings(window=window))
    assert glz.decompress(blob, model, tok, MODEL_ID) == data
    return blob


@pytest.mark.parametrize("data", [
    b"",
    bytes(random.Random(0).randrange(256) for _ in range(300)),
    b"ok \xff\xfe\xc3(\x80 tail \xed\xa0\x80 and a cut \xe5\xba",  # invalid UTF-8: stray, overlong, surrogate, cut
    "天下大势，分久必合，合久必分。床前明月光".encode(),
    b"\x00\x01\x04 control bytes\r\n\t",
], ids=["empty", "random", "invalid-utf8", "chinese", "control"])
def test_round_trip(data, model, small_tokenizer):
    _round_trip(data, model, small_tokenizer)


def test_long_text_over_several_windows(model, small_tokenizer):
    data = TEXT[:700].encode()
    symbols = glz.SymbolTable(small_tokenizer).encode(data)
    window = 16
    assert len(symbols) > 4 * window  # the cache restarts several times
    blob = _round_trip(data, model, small_tokenizer, window=window)
    assert glz.read_header(blob)[0].window == window
    # deterministic: the same input gives the same file
    assert glz.compress(data, model, small_tokenizer, MODEL_ID, glz.CodecSettings(window=window)) == blob


def test_symbols_concatenate_to_the_bytes(small_tokenizer):
    table = glz.SymbolTable(small_tokenizer)
    data = b"text \xff\x80 more \xc3\xa9 \xe4\xb8"
    symbols = table.encode(data)
    assert b"".join(map(table.symbol_bytes, symbols)) == data
    assert all(s < table.vocab_size for s in symbols)  # every byte has a single-byte token here: no escapes


def test_escapes_for_bytes_without_a_token():
    # a vocabulary without the byte 0xFF (as SmolLM2 lacks 0x04 and 0xF5..0xFF): it is coded as an escape
    ranks = {bytes([b]): b for b in range(255)}
    ranks[b"ab"] = 255
    tok = Tokenizer.from_ranks(ranks)
    table = glz.SymbolTable(tok)
    data = b"ab\xff\xffab \xfe"
    symbols = table.encode(data)
    assert symbols.count(table.vocab_size + 0xFF) == 2
    assert table.model_input(table.vocab_size + 0xFF) == table.start_id
    _round_trip(data, _tiny_model(tok.vocab_size, 1), tok)


def test_quantised_probabilities_are_exact_and_floored():
    logits = np.array([30.0, 0.0, -1e4, 5.0], dtype=np.float32)
    p = glz.quantised_probabilities(logits, n_symbols=6, bits=16)
    freq = p * (1 << 16)
    assert np.array_equal(freq, np.round(freq)) and freq.sum() == 1 << 16
    assert freq.min() == 1 and freq[4] == freq[5] == 1  # the unlikely token and the escapes get the floor
    assert np.argmax(freq) == 0


def test_incompressible_input_is_stored_never_larger(model, small_tokenizer):
    """Random bytes cost the model more than 8 bits each: the file stores them and decodes without it."""
    data = bytes(random.Random(1).randrange(256) for _ in range(400))
    blob = _round_trip(data, model, small_tokenizer)
    header, payload = glz.read_header(blob)
    assert header.precision_bits == glz.STORED and payload == data and len(blob) == len(data) + 78
    text = TEXT[:400].encode()  # prose the model codes below 8 bits/byte is still model-coded
    text_header, _ = glz.read_header(_round_trip(text, model, small_tokenizer))
    assert text_header.precision_bits == glz.PRECISION_BITS


def test_size_matches_the_models_cross_entropy(model, small_tokenizer):
    """The payload's bits are the ideal code length of the quantised distributions (+ coder overhead), which
    is the model's cross-entropy computed by one plain forward pass (+ quantisation loss)."""
    table = glz.SymbolTable(small_tokenizer)
    symbols = table.encode(TEXT[2000:3000].encode())[:60]  # one window: the full forward sees the same contexts
    data = b"".join(map(table.symbol_bytes, symbols))
    ideal_bits = []
    position = iter(symbols)

    def measure(probabilities):
        symbol = next(position)
        ideal_bits.append(-math.log2(probabilities[symbol]))
        return symbol

    glz._code_symbols(model, table, len(symbols), glz.CodecSettings(window=64), measure)
    blob = glz.compress(data, model, small_tokenizer, MODEL_ID, glz.CodecSettings(window=64))
    header, payload = glz.read_header(blob)
    ideal = sum(ideal_bits)
    assert ideal - 8 <= 8 * len(payload) <= ideal + 64  # range coder: < 2 words of overhead
    with torch.no_grad():
        idx = torch.tensor([[table.start_id] + symbols[:-1]])
        logits = model(idx)[0].double()
        cross_entropy = torch.nn.functional.cross_entropy(logits, torch.tensor(symbols), reduction="sum")
    model_bits = cross_entropy.item() / math.log(2)
    assert model_bits * 0.99 - 1 <= ideal <= model_bits * 1.01 + 1
    assert len(blob) == len(payload) + 78


def test_damaged_files_fail_with_one_line(model, small_tokenizer):
    blob = glz.compress(b"some text to protect", model, small_tokenizer, MODEL_ID)
    with pytest.raises(GptlabError, match="truncated"):
        glz.decompress(blob[:-3], model, small_tokenizer, MODEL_ID)
    with pytest.raises(GptlabError, match="truncated"):
        glz.decompress(blob[:40], model, small_tokenizer, MODEL_ID)
    flipped = bytearray(blob)
    flipped[-1] ^= 0x10
    with pytest.raises(GptlabError, match="payload's CRC-32"):
        glz.decompress(bytes(flipped), model, small_tokenizer, MODEL_ID)
    flipped = bytearray(blob)
    flipped[30] ^= 0x01
    with pytest.raises(GptlabError, match="header's CRC-32"):
        glz.decompress(bytes(flipped), model, small_tokenizer, MODEL_ID)
    with pytest.raises(GptlabError, match="not a gptlab compressed file"):
        glz.decompress(b"PK\x03\x04zip", model, small_tokenizer, MODEL_ID)
    with pytest.raises(GptlabError, match="format version 9"):
        glz.decompress(blob[:3] + b"\x09" + blob[4:], model, small_tokenizer, MODEL_ID)
    with pytest.raises(GptlabError, match="compressed with model"):
        glz.decompress(blob, model, small_tokenizer, "cd" * 32)
    with pytest.raises(GptlabError, match="context window must be 2..64"):
        glz.compress(b"x", model, small_tokenizer, MODEL_ID, glz.CodecSettings(window=65))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, model, small_tokenizer):
    root = tmp_path_factory.mktemp("glz_models")
    first = save_model_dir(root / "first", model, small_tokenizer)
    second = save_model_dir(root / "second", _tiny_model(small_tokenizer.vocab_size, 2), small_tokenizer)
    return first, second


def test_cli_round_trip_and_errors(model_dirs, tmp_path, capsys):
    first, second = model_dirs
    original = tmp_path / "mixed.bin"
    original.write_bytes("Grüße, 天下 \x00".encode() + b"\xff\xfe" + TEXT[:200].encode())
    assert cli_main(["compress", "--model", str(first), str(original), "--quiet", "--window", "32"]) == 0
    packed = tmp_path / "mixed.bin.glz"
    assert "bits/byte" in capsys.readouterr().out
    restored = tmp_path / "restored.bin"
    assert cli_main(["decompress", "--model", str(first), str(packed), "-o", str(restored), "--quiet"]) == 0
    assert restored.read_bytes() == original.read_bytes()
    capsys.readouterr()

    assert cli_main(["decompress", "--model", str(second), str(packed), "-o", str(restored), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "compressed with model" in err and err.count("\n") == 1
    cut = tmp_path / "cut.glz"
    cut.write_bytes(packed.read_bytes()[:-5])
    assert cli_main(["decompress", "--model", str(first), str(cut), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cut} is truncated") and err.count("\n") == 1
    assert cli_main(["compress", "--model", str(first), str(tmp_path / "missing.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_middle_excerpt_cuts_at_boundaries():
    from gptlab.lab.compression_bench import middle_excerpt

    lines = b"".join(b"line %03d of the file\n" % i for i in range(200))
    piece = middle_excerpt(lines, 300)
    assert piece in lines and piece.startswith(b"line ") and piece.endswith(b"\n") and 150 < len(piece) <= 300
    one_line = b" ".join(b"word%d" % i for i in range(500))  # a speech stored as one line
    piece = middle_excerpt(one_line, 300)
    assert piece in one_line and piece.startswith(b"word") and 150 < len(piece) <= 300
    assert middle_excerpt(b"short", 300) == b"short"


def test_lab_compression_table(model_dirs, tmp_path, capsys):
    first, _ = model_dirs
    prose, code = tmp_path / "prose.txt", tmp_path / "code.py"
    prose.write_text("It is a truth universally acknowledged. 天下大势，分久必合。\n" * 4, encoding="utf-8")
    code.write_text(TEXT[:300], encoding="utf-8")
    out = tmp_path / "bench"
    assert cli_main(["lab", "compression", "--model", str(first), "--sample", f"prose={prose}",
                     "--sample", f"code={code}", "--bytes", "400", "--out", str(out)]) == 0
    table = (out / "compression.md").read_text(encoding="utf-8")
    for name in ("gzip -9", "bz2 -9", "xz -9e", "zstd -19", "brotli -q11", "gptlab first", "gptlab first + weights"):
        assert f"| {name} " in table
    gzip_bits = 8 * len(gzip.compress(prose.read_bytes(), 9, mtime=0)) / len(prose.read_bytes())
    assert f"| gzip -9 | {gzip_bits:.3f} |" in table
    assert (out / "compression.png").stat().st_size > 0
    capsys.readouterr()
    assert cli_main(["lab", "compression", "--model", str(first), "--sample", "prose", "--out", str(out)]) == 2
    assert "expected KIND=FILE" in capsys.readouterr().err
