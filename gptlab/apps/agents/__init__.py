"""Agents on the application layer's LLM client: the ReAct loop (react.py), traces (trace.py) and teams
with a mediator (team.py)."""

from .react import AgentResult, neutralise, parse_reply, run_agent
from .team import TeamConfig, TeamResult, load_team, run_team
from .trace import Trace, read_trace, render_text, write_html

__all__ = ["AgentResult", "TeamConfig", "TeamResult", "Trace", "load_team", "neutralise", "parse_reply",
           "read_trace", "render_text", "run_agent", "run_team", "write_html"]
