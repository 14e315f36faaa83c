"""The command line: every subcommand answers --help and states its defaults once (the speedrun, the main
job, is tested in tests/test_speedrun.py)."""

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


def test_help_states_each_default_once(capsys):
    """A config field whose help already explains its default must not also get "(default: None)"."""
    checked = 0
    for path in subcommand_paths(build_parser()):
        with pytest.raises(SystemExit):
            main([*path, "--help"])
        options: list[str] = []  # one entry per option: its flag line plus the wrapped help lines under it
        for line in capsys.readouterr().out.splitlines():
            if line.startswith("  -"):
                options.append(line)
            elif options and line.startswith("   "):
                options[-1] += " " + line.strip()
            else:
                options.append("")  # a section title or blank line ends the option
        for text in options:
            checked += "(default:" in text
            assert text.count("(default:") <= 1, f"gptlab {' '.join(path)}: {text}"
    assert checked > 50  # the parsing above found the options' help texts


@pytest.mark.parametrize("command", [["sft", "--out", "{tmp}"], ["rm", "--out", "{tmp}"],
                                     ["sample", "--model", "{tmp}", "--prompt", "hi"]])
def test_bad_device_is_a_clear_error(command, tmp_path, capsys):
    # CI has no GPU: "cuda" names a device this machine lacks, "tpu9" one torch does not know; the device
    # is checked before anything is read or written
    for device, message in (("cuda", "CUDA is not available"), ("tpu9", "invalid device 'tpu9'")):
        args = [a.format(tmp=tmp_path / device) for a in command]
        assert main([*args, "--device", device]) == 2
        assert message in capsys.readouterr().err


def test_auto_device_is_the_cpu_without_cuda():
    import torch

    from gptlab.common import torch_device

    assert torch_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert torch_device("cpu") == torch.device("cpu")


def test_dtype_names_and_the_auto_rule(tmp_path, capsys):
    import torch

    from gptlab.common import GptlabError, torch_dtype

    assert torch_dtype("auto", torch.device("cuda")) == torch.bfloat16  # naming a CUDA device needs no GPU
    assert torch_dtype("auto", "cpu") == torch_dtype("auto") == torch.float32
    assert [torch_dtype(n) for n in ("float32", "bfloat16", "float16")] == [torch.float32, torch.bfloat16,
                                                                            torch.float16]
    with pytest.raises(GptlabError, match=r"^dtype must be auto, float32 or bfloat16, got 'float16'$"):
        torch_dtype("float16", allowed=("auto", "float32", "bfloat16"))
    # eval keeps its narrower choice (no float16), checked before the (here empty) model directory is read
    assert main(["eval", "--model", str(tmp_path), "--device", "cpu", "--dtype", "float16"]) == 2
    assert "dtype must be auto, float32 or bfloat16, got 'float16'" in capsys.readouterr().err
