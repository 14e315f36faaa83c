"""The tool protocol shared by training tasks, rollouts, the server and the application layer's agents:
tools are typed Python functions (see base.py). Built in here: `calculator` (calculator.py), the file tools
and `chart` (files.py), `python` in a sandbox (sandbox.py); `search` needs the RAG index and lives in
gptlab/apps/toolset.py, which assembles a Toolbox by names."""

from .base import TOOLS_HEADER, Tool, Toolbox, ToolResult, tool, tool_system_prompt

__all__ = ["TOOLS_HEADER", "Tool", "Toolbox", "ToolResult", "tool", "tool_system_prompt"]
