"""Views into a model: attention maps, nearest neighbours in the token-embedding space, and the logit lens.

Design decisions
- The model's own forward stays untouched (it calls `F.scaled_dot_product_attention`, which never
  materialises the weights). `attention_maps` records each layer's q/k projections with forward hooks and
  recomputes softmax(q k^T / sqrt(d) + causal mask) from them, applying the same QK-norm and rotary
  functions the model applies; tests check the maps against the model's own attention output (weights @ v
  equals what o_proj reads).
- Logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens"): the residual stream after the
  embedding and after every block goes through the model's final RMSNorm and head, as if the network ended
  there; the last row is therefore the model's own prediction.
- Neighbours: cosine similarity of the input embedding rows (the head's rows too when they are tied);
  the 2-D picture is a PCA (SVD of the centred rows) of the query tokens and their neighbours.
- Labels: a token's bytes as UTF-8 with invalid sequences (a cut Chinese character) as \\xNN escapes, spaces
  shown as "·" and newlines as "\\n"; in a prompt, such a piece is labelled with the whole character and a
  "*" (`sequence_labels`). A font with CJK glyphs (Noto CJK) is used when one is installed;
  otherwise the figure is still written, with a one-line warning that CJK labels may show as boxes.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..common import GptlabError, get_logger, save_figure
from ..model import GPT, apply_rotary, rotary_cos_sin
from ..tokenizer import Tokenizer

log = get_logger("lab.views")


# ---- computations ---------------------------------------------------------------------------------------


def check_context(model: GPT, ids: list[int]) -> None:
    if not ids:
        raise GptlabError("the prompt is empty")
    if len(ids) > model.config.max_seq_len:
        raise GptlabError(f"the prompt is {len(ids)} tokens, longer than the model's context of "
                          f"{model.config.max_seq_len}")


@torch.inference_mode()
def attention_maps(model: GPT, ids: list[int]) -> torch.Tensor:
    """Attention weights (n_layer, n_head, T, T) of one sequence; row i is query i's distribution over keys."""
    check_context(model, ids)
    c = model.config
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj"):
            hooks.append(getattr(block.self_attn, name).register_forward_hook(
                lambda _m, _inp, out, key=(i, name): captured.__setitem__(key, out.detach())))
    try:
        model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    T = len(ids)
    cos, sin = rotary_cos_sin(torch.arange(T)[None], model.rope)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    maps = []
    for i, block in enumerate(model.model.layers):
        attn = block.self_attn
        q = captured[i, "q_proj"].view(1, T, c.n_head, c.head_dim).transpose(1, 2)
        k = captured[i, "k_proj"].view(1, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        if c.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k = k.repeat_interleave(c.n_head // c.n_kv_head, dim=1)  # grouped-query: head h reads kv head h // group
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(c.head_dim)
        maps.append(torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)[0])
    return torch.stack(maps)


@torch.inference_mode()
def logit_lens(model: GPT, ids: list[int]) -> torch.Tensor:
    """Logits (n_layer + 1, T, vocab): row 0 reads the embeddings, row l the residual stream after block l."""
    check_context(model, ids)
    streams: list[torch.Tensor] = []
    hooks = [model.model.embed_tokens.register_forward_hook(lambda _m, _i, out: streams.append(out))]
    hooks += [block.register_forward_hook(lambda _m, _i, out: streams.append(out)) for block in model.model.layers]
    try:
        model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([model.lm_head(model.model.norm(x))[0].float() for x in streams])


def single_token(tokenizer: Tokenizer, text: str) -> int:
    """The id of `text` when it is one token (a leading space is part of a word token: " king")."""
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        pieces = [token_label(tokenizer, i) for i in ids]
        raise GptlabError(f"{text!r} is {len(ids)} tokens {pieces}, not one; pick single tokens")
    return ids[0]


@torch.inference_mode()
def nearest_neighbours(model: GPT, token_ids: list[int], k: int, vocab_size: int) -> list[list[tuple[int, float]]]:
    """For each token, the `k` other tokens (ids below `vocab_size`) whose embeddings have the largest cosine."""
    emb = F.normalize(model.model.embed_tokens.weight[:vocab_size].float(), dim=-1)
    sims = emb[token_ids] @ emb.T
    sims[torch.arange(len(token_ids)), token_ids] = -2.0  # a token is not its own neighbour
    top = sims.topk(k, dim=-1)
    return [list(zip(i.tolist(), s.tolist())) for i, s in zip(top.indices, top.values)]


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """Coordinates on the first two principal components (rows are points)."""
    centred = vectors - vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


# ---- labels and figures ---------------------------------------------------------------------------------


def _readable(text: str) -> str:
    return text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t")


def token_label(tokenizer: Tokenizer, i: int) -> str:
    text = tokenizer.id_to_bytes(i).decode("utf-8", errors="backslashreplace")
    return _readable(text) or "∅"


def sequence_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Labels for the tokens of one text: a token holding part of a character (byte-level BPE splits many
    Chinese characters into 2-3 tokens) is labelled with the whole character(s) it overlaps and a "*"."""
    pieces = [tokenizer.id_to_bytes(i) for i in ids]
    text = b"".join(pieces).decode("utf-8", errors="surrogateescape")
    char_ends = np.cumsum([1 if "\udc80" <= c <= "\udcff" else len(c.encode()) for c in text])
    labels, start = [], 0
    for i, piece in zip(ids, pieces):
        end = start + len(piece)
        try:
            piece.decode("utf-8")
            labels.append(token_label(tokenizer, i))
        except UnicodeDecodeError:
            first = np.searchsorted(char_ends, start, side="right")  # the character holding byte `start`
            last = np.searchsorted(char_ends, end - 1, side="right")
            chars = text[first:last + 1].encode("utf-8", errors="surrogateescape").decode("utf-8", "backslashreplace")
            labels.append(_readable(chars) + "*")
        start = end
    return labels


CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "WenQuanYi Zen Hei", "Droid Sans Fallback")


def pyplot_cjk():
    """matplotlib (Agg) with a CJK-capable font first in the list when one is installed (a font installed
    after matplotlib built its font cache is found through fontconfig and registered)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    def installed() -> str | None:
        names = {f.name for f in font_manager.fontManager.ttflist}
        return next((n for n in CJK_FONTS if n in names), None)

    cjk = installed()
    if cjk is None:
        for path in font_manager.findSystemFonts():
            if any(key in Path(path).name for key in ("CJK", "wqy", "DroidSansFallback")):
                font_manager.fontManager.addfont(path)
        cjk = installed()
    if cjk:
        plt.rcParams["font.family"] = ["DejaVu Sans", cjk]  # per-glyph fallback: Latin from DejaVu, CJK from cjk
    else:
        log.warning("no font with CJK glyphs found (apt-get install fonts-noto-cjk): CJK labels may show as boxes")
    return plt


def plot_attention(maps: torch.Tensor, labels: list[str], out_dir: Path) -> list[Path]:
    """One PNG per layer (a subplot per head, token labels on both axes) and grid.png (layers x heads)."""
    plt = pyplot_cjk()
    out_dir.mkdir(parents=True, exist_ok=True)
    n_layer, n_head, T, _ = maps.shape
    written = []
    cols = min(n_head, 4)
    rows = math.ceil(n_head / cols)
    size = max(3.0, 0.28 * T)
    for layer in range(n_layer):
        fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
        for h, ax in enumerate(axes.flat):
            if h >= n_head:
                ax.axis("off")
                continue
            ax.imshow(maps[layer, h].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"head {h}", fontsize=9)
            ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(T), labels, fontsize=7)
        fig.suptitle(f"layer {layer}: attention (row = query, column = key)")
        written.append(save_figure(fig, out_dir / f"layer_{layer:02d}.png", dpi=80))
    fig, axes = plt.subplots(n_layer, n_head, figsize=(1.1 * n_head, 1.1 * n_layer), squeeze=False)
    for layer in range(n_layer):
        for h in range(n_head):
            ax = axes[layer, h]
            ax.imshow(maps[layer, h].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_ylabel(f"L{layer}", fontsize=7)
            if layer == 0:
                ax.set_title(f"h{h}", fontsize=7)
    fig.suptitle("attention, layers x heads", fontsize=9)
    return [*written, save_figure(fig, out_dir / "grid.png", dpi=80)]


def plot_neighbours(model: GPT, tokenizer: Tokenizer, queries: list[int],
                    neighbours: list[list[tuple[int, float]]], out: Path) -> None:
    plt = pyplot_cjk()
    ids = list(dict.fromkeys([*queries, *(i for row in neighbours for i, _ in row)]))
    coords = pca_2d(model.model.embed_tokens.weight[ids].detach().float().numpy())
    where = dict(zip(ids, coords))
    fig, ax = plt.subplots(figsize=(7, 6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (query, row) in enumerate(zip(queries, neighbours)):
        colour = colours[n % len(colours)]
        for i, _ in row:
            ax.plot(*zip(where[query], where[i]), color=colour, alpha=0.3, lw=0.8)
            ax.annotate(token_label(tokenizer, i), where[i], fontsize=8, color=colour)
        ax.scatter(*where[query], color=colour, s=60, marker="*")
        ax.annotate(token_label(tokenizer, query), where[query], fontsize=11, weight="bold", color=colour)
    ax.scatter(coords[:, 0], coords[:, 1], s=6, color="grey")
    ax.set_title("token embeddings: nearest neighbours by cosine, 2-D PCA")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    save_figure(fig, out, dpi=80)


def plot_logit_lens(probs: np.ndarray, guesses: list[list[str]], labels: list[str], out: Path) -> None:
    """Heatmap of the top guess's probability (layers x positions), each cell labelled with the guess."""
    plt = pyplot_cjk()
    n_rows, T = probs.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * T + 2), max(3.0, 0.32 * n_rows + 1.5)))
    ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    for layer in range(n_rows):
        for t in range(T):
            ax.text(t, layer, guesses[layer][t][:8], ha="center", va="center", fontsize=6,
                    color="white" if probs[layer, t] > 0.6 else "black")
    ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n_rows), ["emb", *(str(i) for i in range(1, n_rows))], fontsize=6)
    ax.set_xlabel("input token (the guess is for the token after it)")
    ax.set_ylabel("after layer")
    ax.set_title("logit lens: top next-token guess and its probability")
    save_figure(fig, out, dpi=80)


# ---- commands -------------------------------------------------------------------------------------------


def _load(model: str) -> tuple[GPT, Tokenizer]:
    from ..apps.models import resolve_model_dir
    from ..checkpoint import load_model_dir

    return load_model_dir(resolve_model_dir(model), device="cpu", dtype=torch.float32)


def _cmd_attention(args: argparse.Namespace) -> None:
    model, tokenizer = _load(args.model)
    ids = tokenizer.encode(args.prompt)
    maps = attention_maps(model, ids)
    written = plot_attention(maps, sequence_labels(tokenizer, ids), Path(args.out))
    print(f"{len(ids)} tokens, {maps.shape[0]} layers x {maps.shape[1]} heads: wrote {len(written)} PNGs to {args.out}")


def _cmd_neighbours(args: argparse.Namespace) -> None:
    model, tokenizer = _load(args.model)
    queries = [single_token(tokenizer, t) for t in args.tokens.split(",")]
    vocab = min(tokenizer.vocab_size, model.config.vocab_size)
    neighbours = nearest_neighbours(model, queries, args.k, vocab)
    for query, row in zip(queries, neighbours):
        print(f"{token_label(tokenizer, query):>12}: " + "  ".join(f"{token_label(tokenizer, i)} {s:.2f}"
                                                                 for i, s in row))
    plot_neighbours(model, tokenizer, queries, neighbours, Path(args.out))
    print(f"wrote {args.out}")


def _cmd_logit_lens(args: argparse.Namespace) -> None:
    model, tokenizer = _load(args.model)
    ids = tokenizer.encode(args.prompt)
    probs = torch.softmax(logit_lens(model, ids), dim=-1)
    top_p, top_i = probs.max(dim=-1)
    guesses = [[token_label(tokenizer, i) for i in row] for row in top_i.tolist()]
    labels = sequence_labels(tokenizer, ids)
    width = max(8, *(len(g) for row in guesses for g in row), *(len(label) for label in labels))
    print("layer  " + " ".join(f"{label:>{width}}" for label in labels))
    for layer, row in enumerate(guesses):
        print(f"{'emb' if layer == 0 else layer:>5}  " + " ".join(f"{g:>{width}}" for g in row))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = ["| layer | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    table += [f"| {'emb' if layer == 0 else layer} | " + " | ".join(
        f"{g} ({p:.2f})" for g, p in zip(row, top_p[layer].tolist())) + " |" for layer, row in enumerate(guesses)]
    (out / "logit_lens.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    plot_logit_lens(top_p.numpy(), guesses, labels, out / "logit_lens.png")
    print(f"wrote {out / 'logit_lens.md'} and {out / 'logit_lens.png'}")


def register_lab(commands) -> None:
    p = commands.add_parser("attention", help="attention heatmaps per layer and head for a prompt")
    p.add_argument("--model", required=True, help="model directory or registry name")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="folder for layer_NN.png and grid.png")
    p.set_defaults(func=_cmd_attention)
    p = commands.add_parser("neighbours", help="nearest tokens by embedding cosine, and a 2-D PCA plot")
    p.add_argument("--model", required=True, help="model directory or registry name")
    p.add_argument("--tokens", required=True, help="comma-separated single tokens, e.g. ' king, queen,Paris'")
    p.add_argument("--k", type=int, default=8, help="neighbours per token")
    p.add_argument("--out", required=True, help="PNG to write")
    p.set_defaults(func=_cmd_neighbours)
    p = commands.add_parser("logit-lens", help="the top next-token guess after every layer (final norm + head)")
    p.add_argument("--model", required=True, help="model directory or registry name")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="folder for logit_lens.md and logit_lens.png")
    p.set_defaults(func=_cmd_logit_lens)
