"""Views into a model (gptlab.lab.views): attention maps against the model's own attention output, the logit
lens against the model's prediction, nearest neighbours and PCA on constructed embeddings, and the CLI
(figures written, one-line errors). A tiny random-init GPT with grouped-query heads and QK-norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptlab.checkpoint import save_model_dir
from gptlab.cli import main as cli_main
from gptlab.lab import views
from gptlab.model import GPT, GPTConfig

PROMPT = "def decode(self, s): 天下大势"


@pytest.fixture(scope="module")
def model(small_tokenizer):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=small_tokenizer.vocab_size, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                       head_dim=8, intermediate_size=64, max_seq_len=32, qk_norm=True)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
    return model


def test_attention_maps_reproduce_the_models_attention(model, small_tokenizer):
    ids = small_tokenizer.encode(PROMPT)
    T = len(ids)
    maps = views.attention_maps(model, ids)
    assert maps.shape == (2, 4, T, T)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, T), rtol=0, atol=1e-5)
    assert torch.all(maps.triu(diagonal=1) == 0)  # causal
    assert maps[:, :, 1:].max() < 0.999  # not trivially one-hot: the check below is meaningful
    # weights @ v must equal what the model's SDPA produced, i.e. the input of o_proj
    seen = {}
    hooks = []
    for i, block in enumerate(model.model.layers):
        hooks.append(block.self_attn.v_proj.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("v", i), out)))
        hooks.append(block.self_attn.o_proj.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("y", i), a[0])))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    for i in range(2):
        v = seen["v", i].view(T, 2, 8).transpose(0, 1).repeat_interleave(2, dim=0)  # (heads, T, head_dim)
        y = (maps[i] @ v).transpose(0, 1).reshape(T, 32)
        torch.testing.assert_close(y, seen["y", i][0], rtol=1e-4, atol=1e-5)


def test_logit_lens_last_layer_is_the_models_prediction(model, small_tokenizer):
    ids = small_tokenizer.encode(PROMPT)
    lens = views.logit_lens(model, ids)
    assert lens.shape == (3, len(ids), model.config.vocab_size)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(lens[-1], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(lens[-1].argmax(-1), logits.argmax(-1))
    # row 0 reads the embeddings: the head applied to the normed embedding, nothing else
    with torch.no_grad():
        direct = model.lm_head(model.model.norm(model.model.embed_tokens(torch.tensor(ids))))
    torch.testing.assert_close(lens[0], direct, rtol=1e-5, atol=1e-5)


def test_neighbours_and_pca():
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_embd=16, n_head=2, n_kv_head=2, head_dim=8,
                          intermediate_size=32)).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[7] = 3 * emb[3]  # same direction: cosine 1
        emb[9] = -emb[3]  # opposite: the least similar
    top = views.nearest_neighbours(model, [3], k=49, vocab_size=50)[0]
    assert top[0][0] == 7 and top[0][1] == pytest.approx(1.0, abs=1e-5)
    assert top[-1][0] == 9 and top[-1][1] == pytest.approx(-1.0, abs=1e-5)
    assert 3 not in [i for i, _ in top]
    points = np.outer(np.arange(5.0), [1.0, 2.0, 2.0]) + 4.0  # on a line: all variance on PC 1
    coords = views.pca_2d(points)
    np.testing.assert_allclose(np.abs(coords[:, 0]), np.abs(np.arange(5.0) - 2) * 3, atol=1e-9)
    np.testing.assert_allclose(coords[:, 1], 0, atol=1e-9)


def test_token_label(small_tokenizer):
    by_bytes = {small_tokenizer.id_to_bytes(i): i for i in range(small_tokenizer.vocab_size)}
    label = lambda piece: views.token_label(small_tokenizer, by_bytes[piece])  # noqa: E731
    assert label(b"\xe5") == "\\xe5"  # the first byte of a Chinese character, escaped
    assert label(b" ") == "·" and label(b"\n") == "\\n"
    assert label(b"def") == "def"
    # in a prompt, the pieces of a split character are labelled with the character itself
    ids = small_tokenizer.encode("x 鬱 y")  # a character the tokenizer never saw: split into byte tokens
    split = [i for i in ids if not small_tokenizer.id_to_bytes(i).decode("utf-8", "ignore")]
    labels = views.sequence_labels(small_tokenizer, ids)
    assert split and len(labels) == len(ids)
    assert sorted(set(l for l in labels if l.endswith("*"))) in (["鬱*"], ["·鬱*", "鬱*"])
    assert sum(l.endswith("*") for l in labels) >= len(split)
    assert labels[0] == "x" and labels[-1] == "·y"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, small_tokenizer):
    return save_model_dir(tmp_path_factory.mktemp("views") / "m", model, small_tokenizer)


def test_cli_figures_and_errors(model_dir, tmp_path, capsys):
    out = tmp_path / "att"
    assert cli_main(["lab", "attention", "--model", str(model_dir), "--prompt", "天下 x", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "layer_00.png", "layer_01.png"]
    lens = tmp_path / "lens"
    assert cli_main(["lab", "logit-lens", "--model", str(model_dir), "--prompt", "def f(x):", "--out", str(lens)]) == 0
    table = (lens / "logit_lens.md").read_text(encoding="utf-8").splitlines()
    assert len(table) == 2 + 3 and (lens / "logit_lens.png").stat().st_size > 0
    png = tmp_path / "nb.png"
    assert cli_main(["lab", "neighbours", "--model", str(model_dir), "--tokens", "def,self", "--k", "3",
                     "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    capsys.readouterr()

    assert cli_main(["lab", "attention", "--model", str(model_dir), "--prompt", "word " * 40, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the prompt is") and "longer than the model's context of 32" in err
    assert err.count("\n") == 1
    assert cli_main(["lab", "neighbours", "--model", str(model_dir), "--tokens", "def,JSONDecoderXYZ",
                     "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'JSONDecoderXYZ' is") and "not one" in err
