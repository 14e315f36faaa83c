"""The tool protocol shared by training tasks, rollouts, the server and the application layer's agents:
tools are typed Python functions (see base.py)."""

from .base import Tool, Toolbox, ToolResult, tool

__all__ = ["Tool", "Toolbox", "ToolResult", "tool"]
