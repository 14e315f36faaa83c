"""Built-in tools: calculator, files confined to the workspace, chart, search, make_toolbox, `gptlab tools`,
and the one tool format shared by the calculator task and the server."""

import json
import os

import pytest

from test_rag import HashingEmbedder
from gptlab.apps.rag import RagIndex
from gptlab.apps.toolset import BUILTIN_TOOLS, make_toolbox, search_tool
from gptlab.cli import main
from gptlab.common import GptlabError
from gptlab.tools.calls import parse_tools, to_chat_messages
from gptlab.tasks import get_task
from gptlab.tasks.calculator import SYSTEM
from gptlab.tools import Toolbox
from gptlab.tools.calculator import calculator
from gptlab.tools.files import chart_tool, file_tools

DOCS = {
    "1930s.txt": "The President spoke of relief for farmers and of new taxes on income to pay for public works.",
    "1960s.txt": "Space exploration and the race to the moon; tax cuts were proposed to speed growth.",
    "1990s.txt": "The budget was balanced. Welfare reform passed. Crime fell in the cities.",
}


@pytest.fixture
def workspace(tmp_path):
    path = tmp_path / "ws"
    path.mkdir()
    (path / "notes.txt").write_text("inside the workspace")
    return path


def test_calculator_tool_and_its_schema():
    box = Toolbox([calculator])
    assert box.call("calculator", {"expression": "(12 + 3) * 4 ** 2"}).output == str((12 + 3) * 4 ** 2)
    assert box.call_written('{"name": "calculator", "arguments": {"expression": "7 / 2"}}').output == "3.5"
    spec = calculator.describe()
    assert spec["parameters"]["required"] == ["expression"] and calculator("2 ** 10") == "1024"


def test_calculator_task_describes_its_tool_as_the_server_does():
    """The system prompt the calculator task trains with is what the server builds for a request that offers
    the calculator tool (and has no system message of its own): one format, no glue."""
    served = to_chat_messages([{"role": "user", "content": "1+1?"}],
                              parse_tools(Toolbox([calculator]).openai_specs()))
    assert served[0]["content"] == SYSTEM
    example = get_task("calculator").generate(__import__("random").Random(0), "train")
    assert example.messages[0] == {"role": "system", "content": SYSTEM}
    assert json.loads(SYSTEM.splitlines()[-1])["name"] == "calculator"


def test_a_hanging_tool_times_out_promptly():
    import threading
    import time

    from gptlab.tools import tool

    release = threading.Event()

    @tool
    def wait_forever(seconds: float) -> str:
        """Wait (a tool that hangs).

        Args:
            seconds: how long
        """
        release.wait(seconds)
        return "done"

    box = Toolbox([wait_forever, calculator], timeout=0.5)
    start = time.perf_counter()
    result = box.call("wait_forever", {"seconds": 60})
    assert time.perf_counter() - start < 5 and not result.ok
    assert result.output == "error: wait_forever did not finish within 0.5 s; its result will be ignored"
    release.set()
    assert box.call("calculator", {"expression": "1 + 1"}).output == "2"  # errors still pass through the thread
    assert box.call("calculator", {"expression": "1 / 0"}).output == "error: calculator: division by zero"
    assert "Field required" in box.call("calculator", {}).output


def test_files_are_confined_to_the_workspace(workspace, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    os.symlink(outside, workspace / "link.txt")
    os.symlink(tmp_path, workspace / "linkdir")
    box = Toolbox(file_tools(workspace))
    assert box.call("read_file", {"path": "notes.txt"}).output == "inside the workspace"
    for path in ["../outside.txt", str(outside), "link.txt", "linkdir/outside.txt", "sub/../../outside.txt"]:
        for name, args in [("read_file", {"path": path}), ("write_file", {"path": path, "content": "x"})]:
            result = box.call(name, args)
            assert not result.ok and ("leaves the workspace" in result.output or "relative" in result.output), result
    assert outside.read_text() == "secret"
    written = box.call("write_file", {"path": "out/report.md", "content": "# Report\n"})
    assert written.ok and written.files == ["out/report.md"]
    assert (workspace / "out" / "report.md").read_text() == "# Report\n"
    listing = box.call("list_files", {}).output.splitlines()
    assert "notes.txt  20" in listing and "out/report.md  9" in listing and "link.txt -> (link, not followed)" in listing
    assert "secret" not in box.call("list_files", {"path": "."}).output
    assert box.call("read_file", {"path": "missing.txt"}).output == "error: no file 'missing.txt' in the workspace"


def test_chart_writes_a_real_png(workspace):
    from matplotlib.image import imread

    box = Toolbox([chart_tool(workspace)])
    result = box.call("chart", {"kind": "bar", "x": ["1930s", "1960s", "1990s"],
                                "series": {"taxes": [12, 7, 3], "war": [2, 9, 1]}, "title": "Mentions",
                                "filename": "charts/mentions.png"})
    assert result.ok and result.files == ["charts/mentions.png"], result
    png = workspace / "charts" / "mentions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(png).shape
    assert (width, height) == (700, 450)
    for args, message in [({"kind": "pie", "x": [1], "series": {"a": [1]}}, "kind"),
                          ({"kind": "line", "x": [1, 2], "series": {"a": [1]}}, "has 1 values for 2 x values"),
                          ({"kind": "line", "x": [1], "series": {"a": [1]}, "filename": "../x.png"}, "leaves"),
                          ({"kind": "line", "x": [1], "series": {"a": [1]}, "filename": "x.txt"}, "must end in .png")]:
        bad = box.call("chart", args)
        assert not bad.ok and message in bad.output, bad


def test_search_over_a_folder_ranks_with_bm25(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    (folder / "image.png").write_bytes(b"\x89PNG\x00\x00binary")  # skipped, not an error
    box = Toolbox([search_tool(folder=folder)])
    hits = box.call("search", {"query": "taxes on income", "k": 2}).output.splitlines()
    assert hits[0].startswith("[1] 1930s.txt (1930s) chars 0-") and len(hits) == 1  # only one mentions them
    assert box.call("search", {"query": "moon"}).output.startswith("[1] 1960s.txt")
    assert box.call("search", {"query": "zebra"}).output == "no passage matches the query"
    assert "k must be between 1 and 20" in box.call("search", {"query": "tax", "k": 50}).output


def test_search_over_a_rag_index(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    index = RagIndex(tmp_path / "ix", HashingEmbedder(dim=64), create=True)
    index.update([str(folder)], progress=False)
    output = Toolbox([search_tool(index=index)]).call("search", {"query": "welfare reform budget", "k": 1}).output
    assert output.startswith("[1] ") and "1990s.txt" in output.splitlines()[0], output


def test_make_toolbox_checks_names_and_workspace(workspace, tmp_path):
    box = make_toolbox(["calculator", "read_file", "chart", "calculator"], workspace)
    assert [t.name for t in box] == ["calculator", "read_file", "chart"]
    assert set(BUILTIN_TOOLS) == {"calculator", "python", "search", "chart", "read_file", "list_files", "write_file"}
    with pytest.raises(GptlabError, match="unknown tool 'shell' \\(known: calculator, python"):
        make_toolbox(["shell"], workspace)
    with pytest.raises(GptlabError, match="does not exist"):
        make_toolbox(["read_file"], tmp_path / "nowhere")
    with pytest.raises(GptlabError, match="exactly one"):
        make_toolbox(["search"], workspace)


def test_tools_cli(workspace, capsys):
    assert main(["tools", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("calculator ")
    assert main(["tools", "run", "calculator", "--args", '{"expression": "12 * 34"}']) == 0
    assert capsys.readouterr().out == "408\n"
    assert main(["tools", "run", "read_file", "--args", '{"path": "../x"}', "--workspace", str(workspace)]) == 1
    assert capsys.readouterr().out == "error: path '../x' leaves the workspace\n"
    assert main(["tools", "run", "calculator", "--args", "{oops"]) == 1
    assert "not valid JSON" in capsys.readouterr().out
    assert main(["tools", "run", "python", "--workspace", str(workspace),
                 "--args", '{"code": "print(open(\'notes.txt\').read().upper())"}']) == 0
    assert capsys.readouterr().out == "INSIDE THE WORKSPACE\n"
    assert main(["tools", "run", "shell"]) == 2
    assert "unknown tool 'shell'" in capsys.readouterr().err
