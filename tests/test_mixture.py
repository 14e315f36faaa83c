"""Data sources and mixtures: every reader on real local files, cleaning, dedup, weights, split
stability, determinism, the embedded default mixture, and each bad input with its one-line error."""

import bz2
import json
import sys
import textwrap
from pathlib import Path

import pytest

import gptlab
from gptlab.cli import main
from gptlab.common import GptlabError
from gptlab.data.mixture import is_val, load_mixture, mixture_digest

PARAGRAPHS = [f"Paragraph {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs." for i in range(300)]


def write_mixture(folder, body: str, name="mix.toml"):
    path = folder / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


@pytest.fixture
def text_folder(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    for i in range(30):
        (books / f"b{i:02d}.txt").write_text("\n\n".join(PARAGRAPHS[i * 10:(i + 1) * 10]), encoding="utf-8")
    return tmp_path


def test_text_source_reads_every_file_losslessly(text_folder):
    path = write_mixture(text_folder, """
        val_fraction = 0.0
        [[sources]]
        name = "books"
        kind = "text"
        paths = ["books/*.txt"]
    """)
    docs = list(load_mixture(path).documents("train"))
    assert len(docs) == 30
    assert sorted(d.text for d in docs) == sorted("\n\n".join(PARAGRAPHS[i * 10:(i + 1) * 10]) for i in range(30))


def test_paragraph_grouping_keeps_all_text(text_folder):
    path = write_mixture(text_folder, """
        val_fraction = 0.0
        [[sources]]
        name = "books"
        kind = "text"
        paths = ["books/b00.txt"]
        doc_unit = "paragraph"
        max_doc_chars = 200
    """)
    docs = [d.text for d in load_mixture(path).documents("train")]
    assert len(docs) > 1
    assert "\n\n".join(docs) == "\n\n".join(PARAGRAPHS[:10])


def test_cleaning_newlines_empty_and_duplicates(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\rline three")
    (tmp_path / "b.txt").write_bytes(b"line one\nline two\nline three")  # same text after cleaning
    (tmp_path / "c.txt").write_bytes(b"  \n\t\n")
    (tmp_path / "d.txt").write_bytes(b"something else")
    path = write_mixture(tmp_path, """
        val_fraction = 0.0
        [[sources]]
        name = "s"
        kind = "text"
        paths = ["*.txt"]
    """)
    mix = load_mixture(path)
    docs = [d.text for d in mix.documents("train")]
    assert docs == ["line one\nline two\nline three", "something else"]
    assert mix.stats["s"].duplicates == 1 and mix.stats["s"].empty == 1


def test_dedup_across_sources(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same.txt").write_text("shared document")
        (tmp_path / folder / "own.txt").write_text(f"only in {folder}")
    path = write_mixture(tmp_path, """
        val_fraction = 0.0
        [[sources]]
        name = "x"
        kind = "text"
        paths = ["x"]
        [[sources]]
        name = "y"
        kind = "text"
        paths = ["y"]
    """)
    mix = load_mixture(path)
    texts = [d.text for d in mix.documents("train")]
    assert texts.count("shared document") == 1 and len(texts) == 3
    assert mix.stats["y"].duplicates == 1


def test_jsonl_source_and_malformed_line(tmp_path):
    rows = [{"text": p, "id": i} for i, p in enumerate(PARAGRAPHS[:20])]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    path = write_mixture(tmp_path, """
        val_fraction = 0.0
        [[sources]]
        name = "j"
        kind = "jsonl"
        paths = ["good.jsonl"]
        text_field = "text"
    """)
    assert [d.text for d in load_mixture(path).documents("train")] == PARAGRAPHS[:20]
    bad = tmp_path / "good.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + '{"text": "unterminated\n')
    with pytest.raises(GptlabError, match=r"good\.jsonl:2: malformed JSON"):
        load_mixture(path).load()
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(GptlabError, match=r"good\.jsonl:1: no field 'text'"):
        load_mixture(path).load()


def test_parquet_source_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": PARAGRAPHS[:50], "n": list(range(50))}), tmp_path / "d.parquet")
    body = """
        val_fraction = 0.0
        [[sources]]
        name = "p"
        kind = "parquet"
        paths = ["d.parquet"]
        text_field = "{col}"
    """
    ok = write_mixture(tmp_path, body.format(col="content"))
    assert [d.text for d in load_mixture(ok).documents("train")] == PARAGRAPHS[:50]
    bad = write_mixture(tmp_path, body.format(col="text"), name="bad.toml")
    with pytest.raises(GptlabError, match=r"has no column 'text' \(columns: content, n\)"):
        load_mixture(bad).load()


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": PARAGRAPHS[:40]}).save_to_disk(str(tmp_path / "ds"))
    path = write_mixture(tmp_path, """
        val_fraction = 0.0
        [[sources]]
        name = "hf"
        kind = "hf"
        paths = ["ds"]
    """)
    assert [d.text for d in load_mixture(path).documents("train")] == PARAGRAPHS[:40]


def test_python_object_source(tmp_path, monkeypatch):
    (tmp_path / "fake_corpus_pkg.py").write_text(f"corpus = {{'a': {PARAGRAPHS[0]!r}, 'b': {PARAGRAPHS[1]!r}}}\n"
                                                 f"def pages():\n    return {PARAGRAPHS[2]!r} + '\\n\\n' + "
                                                 f"{PARAGRAPHS[3]!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_mixture(tmp_path, """
        val_fraction = 0.0
        [[sources]]
        name = "py"
        kind = "python"
        object = "fake_corpus_pkg:corpus"
        keys = ["b", "a"]
    """)
    assert [d.text for d in load_mixture(path).documents("train")] == [PARAGRAPHS[1], PARAGRAPHS[0]]
    path = write_mixture(tmp_path, """
        val_fraction = 0.0
        [[sources]]
        name = "made"
        kind = "python"
        object = "fake_corpus_pkg:pages"
        doc_unit = "paragraph"
    """)  # a function is called for its text
    assert [d.text for d in load_mixture(path).documents("train")] == [PARAGRAPHS[2], PARAGRAPHS[3]]
    sys.modules.pop("fake_corpus_pkg", None)


def test_wikidump_source(tmp_path):
    pages = "".join(
        f"<page><title>Title {i}</title><ns>0</ns><id>{i}</id><revision><text>'''Bold''' fact {i} "
        f"about [[Link|linked text]].</text></revision></page>" for i in range(5))
    redirect = "<page><title>R</title><ns>0</ns><id>99</id><revision><text>#REDIRECT [[Title 1]]</text></revision></page>"
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><siteinfo></siteinfo>{pages}{redirect}</mediawiki>'
    (tmp_path / "dump.xml.bz2").write_bytes(bz2.compress(xml.encode()))
    path = write_mixture(tmp_path, """
        val_fraction = 0.0
        [[sources]]
        name = "wiki"
        kind = "wikidump"
        paths = ["dump.xml.bz2"]
    """)
    docs = [d.text for d in load_mixture(path).documents("train")]
    assert len(docs) == 5
    assert docs[0].startswith("Title 0\n\nBold fact 0 about linked text")


def test_weights_are_epochs_and_stable(text_folder):
    body = """
        val_fraction = 0.0
        [[sources]]
        name = "books"
        kind = "text"
        paths = ["books/*.txt"]
        doc_unit = "paragraph"
        weight = {w}
    """
    def train(w):
        return [d.text for d in load_mixture(write_mixture(text_folder, body.format(w=w), f"w{w}.toml")).documents("train")]

    once, twice, half = train(1.0), train(2.0), train(0.5)
    assert len(once) == 300 and len(twice) == 600 and sorted(set(twice)) == sorted(once)
    assert 100 < len(half) < 200 and set(half) <= set(once)
    assert train(0.5) == half  # the same half every time
    assert set(half) <= set(train(0.75))  # a larger fraction keeps what the smaller one kept


def test_split_is_stable_when_sources_change(text_folder):
    one = write_mixture(text_folder, """
        val_fraction = 0.1
        [[sources]]
        name = "books"
        kind = "text"
        paths = ["books/*.txt"]
        doc_unit = "paragraph"
    """, "one.toml")
    (text_folder / "extra.txt").write_text("\n\n".join(f"extra paragraph {i}" for i in range(100)))
    two = write_mixture(text_folder, """
        val_fraction = 0.1
        [[sources]]
        name = "extra"
        kind = "text"
        paths = ["extra.txt"]
        doc_unit = "paragraph"
        [[sources]]
        name = "books"
        kind = "text"
        paths = ["books/*.txt"]
        doc_unit = "paragraph"
    """, "two.toml")
    val_one = {d.text for d in load_mixture(one).documents("val")}
    val_two = {d.text for d in load_mixture(two).documents("val") if d.source == "books"}
    assert val_one == val_two and 10 <= len(val_one) <= 55  # ~10% of 300
    train_one = {d.text for d in load_mixture(one).documents("train")}
    assert not val_one & train_one and len(val_one | train_one) == 300


def test_is_val_fraction_is_close():
    import hashlib

    digests = [hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in range(20000)]
    share = sum(is_val(d, 0.05) for d in digests) / len(digests)
    assert abs(share - 0.05) < 0.006


def test_mixture_is_deterministic(text_folder):
    path = write_mixture(text_folder, """
        [[sources]]
        name = "books"
        kind = "text"
        paths = ["books/*.txt"]
        doc_unit = "line"
    """)
    a = [(d.source, d.text) for d in load_mixture(path).documents("train")]
    b = [(d.source, d.text) for d in load_mixture(path).documents("train")]
    assert a == b and len(a) > 100


def test_max_bytes_caps_each_source_by_weight(text_folder):
    path = write_mixture(text_folder, """
        val_fraction = 0.0
        [[sources]]
        name = "books"
        kind = "text"
        paths = ["books/*.txt"]
        doc_unit = "paragraph"
    """)
    capped = load_mixture(path, max_bytes=2000)
    n = sum(len(d.text) for d in capped.documents("train"))
    assert 2000 <= n < 2200


@pytest.mark.parametrize("body, message", [
    ("name = 'x'\n", "has no \\[\\[sources\\]\\]"),
    ("[[sources]]\nname = 'a'\nkind = 'text'\npaths = ['nowhere/*.txt']\n", "no files match"),
    ("[[sources]]\nname = 'a'\nkind = 'carrier-pigeon'\n", "unknown kind 'carrier-pigeon'"),
    ("[[sources]]\nname = 'a'\nkind = 'text'\npath = ['x']\n", "unknown keys \\['path'\\]"),
    ("[[sources]]\nname = 'a'\nkind = 'text'\npaths = ['empty.txt']\n", "source 'a' yielded no text"),
    ("[[sources]]\nname = 'a'\nkind = 'text'\npackage = 'no_such_pkg_xyz'\npaths = ['*']\n", "needs the Python package"),
    ("[[sources\nname = 'a'\n", "not valid TOML"),
    ("[[sources]]\nname = 'a'\nkind = 'text'\npaths = ['empty.txt']\nweight = -1\n", "weight must be >= 0"),
])
def test_bad_mixtures_raise_clear_errors(tmp_path, body, message):
    (tmp_path / "empty.txt").write_text("   \n")
    path = write_mixture(tmp_path, body)
    with pytest.raises(GptlabError, match=message):
        load_mixture(path).load()


def test_missing_mixture_path_cli_error(capsys, tmp_path):
    assert main(["data", "stats", "--mixture", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: mixture") and "not found" in err[0]


def test_mixture_digest_follows_the_parsed_file(tmp_path):
    """What a speedrun fingerprints: equal for a built-in name and its file, blind to comments and layout,
    changed by any value."""
    text = (Path(gptlab.__file__).parent / "mixtures" / "default.toml").read_text(encoding="utf-8")
    path = tmp_path / "mix.toml"
    path.write_text(text, encoding="utf-8")
    assert mixture_digest("default") == mixture_digest(path)
    path.write_text("# a comment\n\n" + text.replace("weight = 0.5", "weight   =   0.5"), encoding="utf-8")
    assert mixture_digest(path) == mixture_digest("default")
    path.write_text(text.replace("weight = 0.5", "weight = 0.4"), encoding="utf-8")
    assert mixture_digest(path) != mixture_digest("default")
    with pytest.raises(GptlabError, match="not found"):
        mixture_digest(tmp_path / "missing.toml")


def test_default_mixture_sources_all_present():
    """The embedded default mixture needs nothing but the pip-installed packages."""
    mix = load_mixture("default", max_bytes=600_000)
    by_source = dict(mix.documents_by_source(split=None))
    assert list(by_source) == ["shakespeare", "treebank", "bbcnews", "wikipedia", "python", "facts"]
    for spec in mix.sources:
        assert by_source[spec.name], spec.name
        assert spec.licence, f"source {spec.name} must document its licence"
    assert any("Enter " in d.text for d in by_source["shakespeare"])  # stage directions
    assert any("def " in d.text for d in by_source["python"])
    assert any("The capital of " in d.text or "the capital of " in d.text for d in by_source["facts"])
