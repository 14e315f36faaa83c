"""Input that is not UTF-8: replaced by U+FFFD exactly as Python's `errors="replace"` does, counted per
source (files or records, bytes), logged and shown in the statistics table; `--strict-utf8 true` stops at
the first bad byte, naming file, line and byte offset. Valid input reads exactly as before."""

import json
import logging
import textwrap

import pytest

from gptlab.cli import main
from gptlab.common import GptlabError
from gptlab.data.mixture import load_mixture

GOOD = "Grüße aus Köln, 東京 and naïve café.\n"
# Three malformed spots: a Latin-1 byte (1 bad byte), a 3-byte character cut after 2 bytes (2 bytes, one
# U+FFFD), a stray continuation byte (1 byte).
BAD_TEXT = b"caf\xe9 au lait\n" + GOOD.encode() + b"cut \xe2\x82 here, stray \x80 byte\n"
JSONL_RECORDS = [json.dumps({"text": f"record {i}: {GOOD}"}, ensure_ascii=False).encode() for i in range(3)]
# record 2 has one bad byte inside its string, record 3 a cut 2-byte character (1 byte); record 1 is valid
BAD_JSONL = (JSONL_RECORDS[0] + b"\n" + b'{"text": "na\xefve"}\n' + JSONL_RECORDS[1] + b"\n"
             + b'{"text": "end \xc3"}\n' + JSONL_RECORDS[2] + b"\n")

MIXTURE = """
    val_fraction = 0.0
    [[sources]]
    name = "books"
    kind = "text"
    paths = ["books/*.txt"]
    [[sources]]
    name = "records"
    kind = "jsonl"
    paths = ["records.jsonl"]
"""


@pytest.fixture
def bad_mixture(tmp_path):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a_good.txt").write_bytes(GOOD.encode() * 3)
    (tmp_path / "books" / "b_bad.txt").write_bytes(BAD_TEXT)
    (tmp_path / "records.jsonl").write_bytes(BAD_JSONL)
    path = tmp_path / "mix.toml"
    path.write_text(textwrap.dedent(MIXTURE), encoding="utf-8")
    return path


def test_default_replaces_counts_and_warns(bad_mixture, caplog):
    with caplog.at_level(logging.WARNING, logger="gptlab"):
        mix = load_mixture(bad_mixture)
        texts = {d.origin.rsplit("/", 1)[-1]: d.text for d in mix.documents(None)}
    # the text is what Python's own replacing decoder makes of the bytes (one U+FFFD per maximal bad run)
    assert texts["b_bad.txt#0"] == BAD_TEXT.decode("utf-8", errors="replace")
    assert texts["b_bad.txt#0"].count("\ufffd") == 3
    assert texts["a_good.txt#0"] == GOOD * 3
    assert texts["records.jsonl:2"] == "na\ufffdve" and texts["records.jsonl:4"] == "end \ufffd"
    books, records = mix.stats["books"], mix.stats["records"]
    assert (books.files, books.non_utf8, books.replaced) == (2, 1, 4)
    assert (records.files, records.non_utf8, records.replaced) == (1, 2, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "source 'books': 1 file(s) or record(s) not valid UTF-8, 4 byte(s) replaced" in warnings[0]
    assert "b_bad.txt: invalid UTF-8 byte 0xe9 at byte offset 3" in warnings[0]
    assert "source 'records': 2 file(s) or record(s) not valid UTF-8, 2 byte(s) replaced" in warnings[1]

    table = mix.stats_table().splitlines()
    head = table[1].split()
    assert head[6:9] == ["!utf8", "!utf8", "B"]  # the two columns "!utf8" and "!utf8 B"
    rows = {line.split()[0]: line.split() for line in table[2:4]}
    assert rows["books"][6:8] == ["1", "4"] and rows["records"][6:8] == ["2", "2"]
    assert table[-1].startswith("warning: 6 byte(s) that are not UTF-8 were replaced by U+FFFD in books, records")


def test_strict_names_file_line_and_byte_offset(bad_mixture):
    with pytest.raises(GptlabError, match=r"b_bad\.txt: invalid UTF-8 byte 0xe9 at byte offset 3 "):
        load_mixture(bad_mixture, strict_utf8=True).load()
    (bad_mixture.parent / "books" / "b_bad.txt").write_bytes(GOOD.encode())  # now only the JSONL is bad
    offset = len(JSONL_RECORDS[0]) + 1 + len(b'{"text": "na')  # the bad byte's offset in the file
    with pytest.raises(GptlabError, match=rf"records\.jsonl:2: invalid UTF-8 byte 0xef at byte offset {offset} "):
        load_mixture(bad_mixture, strict_utf8=True).load()


def test_source_field_makes_one_source_strict(bad_mixture):
    text = bad_mixture.read_text(encoding="utf-8").replace('paths = ["records.jsonl"]',
                                                           'paths = ["records.jsonl"]\nstrict_utf8 = true')
    bad_mixture.write_text(text, encoding="utf-8")
    (bad_mixture.parent / "books" / "b_bad.txt").unlink()
    with pytest.raises(GptlabError, match=r"records\.jsonl:2: invalid UTF-8"):
        load_mixture(bad_mixture).load()


def test_every_command_that_reads_a_mixture_takes_strict_utf8(bad_mixture, tmp_path, capsys):
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--mixture", str(bad_mixture), "--vocab-size", "300", "--out", str(tok)]) == 0
    assert main(["data", "stats", "--mixture", str(bad_mixture)]) == 0
    assert "warning: 6 byte(s) that are not UTF-8" in capsys.readouterr().out
    mix = ["--mixture", str(bad_mixture)]
    commands = [["tokenizer", "train", *mix, "--vocab-size", "300", "--out", str(tok)],
                ["tokenizer", "stats", "--tokenizer", str(tok), *mix],
                ["data", "stats", *mix],
                ["data", "prepare", *mix, "--tokenizer", str(tok), "--out", str(tmp_path / "d")],
                ["speedrun", *mix, "--run-dir", str(tmp_path / "run"), "--stages", "tokenizer"]]
    for command in commands:
        assert main(command + ["--strict-utf8", "true"]) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
        assert "b_bad.txt: invalid UTF-8 byte 0xe9 at byte offset 3" in err[0]
    assert not (tmp_path / "d" / "meta.json").exists() and not (tmp_path / "run" / "tokenizer.json").exists()


def test_valid_utf8_reads_exactly_and_quietly(tmp_path, caplog):
    (tmp_path / "books").mkdir()
    samples = [GOOD, "emoji 😀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, ZWJ 👩‍💻\n", "\u00a0no-break, U+FFFD itself: \ufffd\n"]
    for i, sample in enumerate(samples):
        (tmp_path / "books" / f"{i}.txt").write_bytes(sample.encode("utf-8"))
    records = [f"record: {s}" for s in samples]  # unlike the files' texts, so deduplication keeps them
    lines = [json.dumps({"text": r}, ensure_ascii=i % 2 == 0) for i, r in enumerate(records)]  # \u escapes or raw
    (tmp_path / "records.jsonl").write_text("\n".join(lines), encoding="utf-8")
    path = tmp_path / "mix.toml"
    path.write_text(textwrap.dedent(MIXTURE), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="gptlab"):
        mix = load_mixture(path, strict_utf8=True)
        docs = list(mix.documents(None))
    assert [d.text for d in docs] == samples + records
    assert all(s.non_utf8 == 0 and s.replaced == 0 for s in mix.stats.values())
    assert not caplog.records and "warning" not in mix.stats_table()


def test_parquet_string_column_with_bad_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Arrow refuses to build such a column through its checked constructors; real files can still hold one
    raw = pa.array([GOOD.encode(), b"bad \xff\xfe here"], type=pa.binary())
    column = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    pq.write_table(pa.table({"text": column}), tmp_path / "d.parquet")
    path = tmp_path / "mix.toml"
    path.write_text('val_fraction = 0.0\n[[sources]]\nname = "p"\nkind = "parquet"\npaths = ["d.parquet"]\n')
    mix = load_mixture(path)
    assert sorted(d.text for d in mix.documents(None)) == sorted([GOOD, "bad \ufffd\ufffd here"])
    assert (mix.stats["p"].non_utf8, mix.stats["p"].replaced) == (1, 2)
    with pytest.raises(GptlabError, match=r"d\.parquet row 2: invalid UTF-8 byte 0xff at byte offset 4 "):
        load_mixture(path, strict_utf8=True).load()


def test_lone_surrogates_from_json_escapes_are_counted_or_refused(tmp_path, capsys):
    """`\\udc80` is valid JSON but no character: without this check tiktoken would encode it as U+FFFD
    silently and rustbpe would fail on it."""
    records = [{"text": f"record {i}: {GOOD}"} for i in range(3)] + [{"text": "lone \udc80 and \ud800 here"}]
    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="ascii")
    path = tmp_path / "mix.toml"
    path.write_text('val_fraction = 0.0\n[[sources]]\nname = "j"\nkind = "jsonl"\npaths = ["records.jsonl"]\n')
    mix = load_mixture(path)
    assert [d.text for d in mix.documents(None)][-1] == "lone \ufffd and \ufffd here"
    assert (mix.stats["j"].non_utf8, mix.stats["j"].replaced) == (1, 2)
    with pytest.raises(GptlabError, match=r"records\.jsonl:4: lone surrogate U\+DC80 at character 5 "):
        load_mixture(path, strict_utf8=True).load()
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--mixture", str(path), "--vocab-size", "300", "--out", str(tok)]) == 0


def test_wiki_dump_with_a_bad_byte_is_a_one_line_error(tmp_path):
    """XML must be well-formed, so a dump cannot be read around a bad byte: the parser's position is reported
    (it was an uncaught ParseError traceback)."""
    page = b"<page><title>T</title><ns>0</ns><id>1</id><revision><text>caf\xe9</text></revision></page>"
    (tmp_path / "dump.xml").write_bytes(b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
                                        b"<siteinfo></siteinfo>\n" + page + b"</mediawiki>")
    path = tmp_path / "mix.toml"
    path.write_text('[[sources]]\nname = "w"\nkind = "wikidump"\npaths = ["dump.xml"]\n')
    with pytest.raises(GptlabError, match=r"dump\.xml: not well-formed XML \(not well-formed \(invalid token\): "
                                          r"line 2, column 61\)"):
        load_mixture(path).load()
