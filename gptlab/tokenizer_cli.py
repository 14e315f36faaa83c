"""`gptlab tokenizer train|encode|decode|stats`: the tokenizer's command line. It reads data mixtures, which
`gptlab.tokenizer` itself never does (the tokenizer sits below the data floor that tokenizes with it)."""

from __future__ import annotations

import argparse

import numpy as np

from .common import GptlabError, get_logger
from .config import add_config_args, build_config
from .data.mixture import MixtureOptions
from .tokenizer import Tokenizer, train_tokenizer

log = get_logger("tokenizer")


def _cmd_train(args: argparse.Namespace) -> None:
    import time

    mixture = build_config(MixtureOptions, args).load()
    start = time.perf_counter()
    tok = train_tokenizer((d.text for d in mixture.documents(split="train")), args.vocab_size)
    seconds = time.perf_counter() - start
    tok.save(args.out)
    mb = mixture.stats_total()["bytes"] / 1e6
    log.info("trained %d-token vocabulary on %.1f MB in %.1f s (%.2f MB/s) -> %s", tok.vocab_size, mb, seconds,
             mb / seconds, args.out)


def _cmd_encode(args: argparse.Namespace) -> None:
    tok = Tokenizer.load(args.tokenizer)
    text = args.text if args.text is not None else _read_stdin_text()
    print(" ".join(map(str, tok.encode(text, allowed_special="all" if args.allow_special else ()))))


def _cmd_decode(args: argparse.Namespace) -> None:
    tok = Tokenizer.load(args.tokenizer)
    raw = args.ids if args.ids is not None else _read_stdin_text()
    try:
        ids = [int(x) for x in raw.replace(",", " ").split()]
    except ValueError:
        raise GptlabError("decode expects whitespace- or comma-separated integer token ids") from None
    print(tok.decode(ids), end="" if args.no_newline else "\n")


def _read_stdin_text() -> str:
    import sys

    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(f"standard input is not UTF-8 ({e})") from None


def _cmd_stats(args: argparse.Namespace) -> None:
    tok = Tokenizer.load(args.tokenizer)
    mixture = build_config(MixtureOptions, args).load()
    print(tokenizer_stats(tok, mixture, top=args.top))


def tokenizer_stats(tok: Tokenizer, mixture, top: int = 10) -> str:
    """Bytes per token per source, the share of the vocabulary in use, and the longest tokens."""
    per_source: dict[str, list[int]] = {}
    used = np.zeros(tok.vocab_size, dtype=bool)
    for source, docs in mixture.documents_by_source(split="train"):
        texts = [d.text for d in docs]
        ids = tok.encode_batch(texts)
        n_tokens = sum(map(len, ids))
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        per_source[source] = [len(texts), n_bytes, n_tokens]
        for row in ids:
            used[row] = True
    lines = [f"tokenizer {tok.source}: {tok.vocab_size} ids ({len(tok.special_tokens)} special), backend {tok.backend}",
             "", f"{'source':<16}{'docs':>8}{'bytes':>14}{'tokens':>12}{'bytes/token':>13}"]
    total = [0, 0, 0]
    for source, (docs, nb, nt) in per_source.items():
        lines.append(f"{source:<16}{docs:>8}{nb:>14,}{nt:>12,}{nb / max(nt, 1):>13.2f}")
        total = [total[0] + docs, total[1] + nb, total[2] + nt]
    lines.append(f"{'TOTAL':<16}{total[0]:>8}{total[1]:>14,}{total[2]:>12,}{total[1] / max(total[2], 1):>13.2f}")
    n_regular = tok.vocab_size - len(tok.special_tokens)
    lines += ["", f"vocabulary in use: {used.sum():,} of {n_regular:,} regular ids ({used.sum() / n_regular:.1%})",
              f"longest {top} tokens:"]
    order = sorted((i for i in range(tok.vocab_size) if i not in tok.special_tokens.values()),
                   key=lambda i: -len(tok.id_to_bytes(i)))
    for i in order[:top]:
        lines.append(f"  {i:>6}  {len(tok.id_to_bytes(i)):>3} bytes  {tok.id_to_bytes(i).decode('utf-8', 'replace')!r}")
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train, apply and inspect the byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")

    t = tsub.add_parser("train", help="train a tokenizer on a data mixture")
    add_config_args(t, MixtureOptions)
    t.add_argument("--vocab-size", type=int, default=32768, help="total ids incl. specials (default: %(default)s)")
    t.add_argument("--out", default="runs/default/tokenizer.json", help="output tokenizer.json (default: %(default)s)")
    t.set_defaults(func=_cmd_train)

    e = tsub.add_parser("encode", help="print the token ids of text (argument or stdin)")
    e.add_argument("--tokenizer", required=True)
    e.add_argument("--text", default=None, help="text to encode (default: read stdin)")
    e.add_argument("--allow-special", action="store_true", help="let special-token strings become special ids")
    e.set_defaults(func=_cmd_encode)

    d = tsub.add_parser("decode", help="print the text of token ids (argument or stdin)")
    d.add_argument("--tokenizer", required=True)
    d.add_argument("--ids", default=None, help="ids separated by spaces or commas (default: read stdin)")
    d.add_argument("--no-newline", action="store_true")
    d.set_defaults(func=_cmd_decode)

    s = tsub.add_parser("stats", help="bytes per token per source, vocabulary usage, longest tokens")
    s.add_argument("--tokenizer", required=True)
    add_config_args(s, MixtureOptions)
    s.add_argument("--top", type=int, default=10, help="how many longest tokens to list")
    s.set_defaults(func=_cmd_stats)
