"""Tools on one workspace folder: `read_file`, `list_files`, `write_file` and `chart` (data -> PNG).

Design decisions
- Every path the model writes is relative to the workspace and must stay inside it: the path is resolved
  (`..` collapsed, symlinks followed) and refused unless the result lies under the resolved workspace, so
  neither `../x`, an absolute path nor a symlink pointing out of the workspace reaches another file.
  (A process racing to swap a checked folder for a symlink is outside this model: only the sandboxed
  `python` tool writes into the workspace besides these tools, and it never creates symlinks there;
  see docs/sandbox.md.)
- The tools are made per workspace (`file_tools(workspace)`, `chart_tool(workspace)`): the folder is bound
  when the toolbox is built, never an argument the model could change.
- Sizes are bounded both ways: `read_file` returns at most MAX_READ_CHARS characters (and says so),
  `write_file` refuses more than MAX_WRITE_BYTES, `list_files` lists at most MAX_LIST_ENTRIES entries:
  an observation must fit in a context window.
- `chart` draws with matplotlib's object API (`Figure`, no pyplot state: safe in a threaded server) and
  writes the PNG atomically (`common.save_figure`); the result lists the file in `ToolResult.files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..common import GptlabError, atomic_write_bytes, save_figure
from .base import Tool, ToolResult, tool

MAX_READ_CHARS = 20_000
MAX_WRITE_BYTES = 1 << 20
MAX_LIST_ENTRIES = 200
MAX_POINTS = 10_000


def check_workspace(workspace: str | Path) -> Path:
    """The workspace as an absolute resolved path; GptlabError if it is not an existing folder."""
    path = Path(workspace).expanduser()
    if not path.is_dir():
        raise GptlabError(f"workspace {path} does not exist or is not a folder (create it first)")
    return path.resolve()


def inside(workspace: Path, relative: str) -> Path:
    """`relative` resolved inside `workspace` (already resolved); GptlabError if it would leave it."""
    if not relative or "\0" in relative:
        raise GptlabError("path must be a non-empty workspace-relative path")
    if Path(relative).is_absolute():
        raise GptlabError(f"path {relative!r} must be relative to the workspace, not absolute")
    target = (workspace / relative).resolve()
    if target != workspace and not target.is_relative_to(workspace):
        raise GptlabError(f"path {relative!r} leaves the workspace")
    return target


def file_tools(workspace: str | Path) -> list[Tool]:
    """`read_file`, `list_files` and `write_file` confined to `workspace`."""
    root = check_workspace(workspace)

    @tool
    def read_file(path: str) -> str:
        """Read a text file from the workspace.

        Args:
            path: the file's path relative to the workspace
        """
        target = inside(root, path)
        if not target.is_file():
            raise GptlabError(f"no file {path!r} in the workspace")
        text = target.read_bytes().decode("utf-8", errors="replace")
        if len(text) > MAX_READ_CHARS:
            return text[:MAX_READ_CHARS] + f"\n[... truncated: {len(text)} characters, first {MAX_READ_CHARS} shown]"
        return text

    @tool
    def list_files(path: str = ".") -> str:
        """List the files and folders under a workspace folder (recursively), with file sizes in bytes.

        Args:
            path: a folder relative to the workspace
        """
        folder = inside(root, path)
        if not folder.is_dir():
            raise GptlabError(f"no folder {path!r} in the workspace")
        lines = []
        for entry in sorted(folder.rglob("*")):
            name = entry.relative_to(root).as_posix()
            if entry.is_symlink():
                lines.append(f"{name} -> (link, not followed)")
            elif entry.is_dir():
                lines.append(name + "/")
            else:
                lines.append(f"{name}  {entry.stat().st_size}")
            if len(lines) == MAX_LIST_ENTRIES:
                lines.append(f"[... more entries not shown: the first {MAX_LIST_ENTRIES} are listed]")
                break
        return "\n".join(lines) if lines else "(empty)"

    @tool
    def write_file(path: str, content: str) -> ToolResult:
        """Write a text file in the workspace (folders are created; an existing file is replaced).

        Args:
            path: the file's path relative to the workspace
            content: the whole text of the file
        """
        target = inside(root, path)
        data = content.encode("utf-8")
        if len(data) > MAX_WRITE_BYTES:
            raise GptlabError(f"content is {len(data)} bytes, more than the {MAX_WRITE_BYTES} allowed")
        if target.is_dir():
            raise GptlabError(f"{path!r} is a folder")
        atomic_write_bytes(target, data)
        name = target.relative_to(root).as_posix()
        return ToolResult(True, f"wrote {len(data)} bytes to {name}", files=[name])

    return [read_file, list_files, write_file]


def chart_tool(workspace: str | Path) -> Tool:
    """`chart`: data -> a PNG in `workspace`."""
    root = check_workspace(workspace)

    @tool
    def chart(kind: Literal["bar", "line", "scatter"], x: list[int | float | str], series: dict[str, list[float]],
              filename: str = "chart.png", title: str = "", xlabel: str = "", ylabel: str = "") -> ToolResult:
        """Draw a bar, line or scatter chart of one or more data series and save it as a PNG in the workspace.

        Args:
            kind: bar, line or scatter
            x: the x values (numbers, or labels such as years or names)
            series: each series' name and its y values, one per x value
            filename: the PNG's path relative to the workspace
            title: the chart's title
            xlabel: the x axis label
            ylabel: the y axis label
        """
        if not series:
            raise GptlabError("series must name at least one series of y values")
        for name, ys in series.items():
            if len(ys) != len(x):
                raise GptlabError(f"series {name!r} has {len(ys)} values for {len(x)} x values")
        if len(x) * len(series) > MAX_POINTS:
            raise GptlabError(f"at most {MAX_POINTS} points per chart")
        if not filename.lower().endswith(".png"):
            raise GptlabError(f"filename {filename!r} must end in .png")
        target = inside(root, filename)
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        labels = [str(v) for v in x]
        categorical = any(isinstance(v, str) for v in x)
        for i, (name, ys) in enumerate(series.items()):
            if kind == "bar":  # grouped bars: each series shifted within its category's slot
                width = 0.8 / len(series)
                ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(x))], ys, width, label=name)
            else:
                xs = list(range(len(x))) if categorical else x
                (ax.plot if kind == "line" else ax.scatter)(xs, ys, label=name)
        if kind == "bar" or categorical:
            ax.set_xticks(range(len(x)), labels, rotation=45 if max(map(len, labels), default=0) > 6 else 0)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if len(series) > 1:
            ax.legend()
        save_figure(fig, target, dpi=100)
        name = target.relative_to(root).as_posix()
        return ToolResult(True, f"saved a {kind} chart of {len(series)} series to {name}", files=[name])

    return chart
