"""The command line: every subcommand answers --help, and the main job runs end to end on a slice of the
embedded default mixture."""

import json

import pytest

from gptlab.cli import STAGES, build_parser, main


def subcommand_paths(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from subcommand_paths(sub, prefix + (name,))


def test_every_subcommand_has_help(capsys):
    paths = list(subcommand_paths(build_parser()))
    assert ("tokenizer", "train") in paths and ("data", "prepare") in paths and ("speedrun",) in paths
    assert len(STAGES) == len(set(STAGES))
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0
        assert "usage: gptlab " + " ".join(path) in capsys.readouterr().out


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", "--no-such-flag", "1"])
    assert exit_info.value.code == 2


def test_speedrun_on_default_mixture_slice(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["speedrun", "--preset", "cpu", "--run-dir", str(run), "--max-bytes", "400000",
                 "--vocab-size", "600"]) == 0
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["complete"] and meta["vocab_size"] == 600 and meta["splits"]["train"]["tokens"] > 50_000
    table = capsys.readouterr().out
    for source in ("shakespeare", "treebank", "bbcnews", "wikipedia", "python"):
        assert source in table
    # rerunning reuses the tokenizer and finds the data already prepared
    before = (run / "tokenizer.json").read_bytes()
    assert main(["speedrun", "--preset", "cpu", "--run-dir", str(run), "--max-bytes", "400000",
                 "--vocab-size", "600"]) == 0
    assert (run / "tokenizer.json").read_bytes() == before
