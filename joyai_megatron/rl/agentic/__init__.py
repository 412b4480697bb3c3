"""Agentic RL: multi-turn episodes with tool calls (environment, tools, episode runner, advantages)."""

from joyai_megatron.rl.agentic.env import Environment, EpisodeLimits, StepResult, ToolEnvironment
from joyai_megatron.rl.agentic.tools import (
    Tool,
    ToolCall,
    ToolResult,
    available_tools,
    calculate,
    get_tool,
    parse_tool_calls,
    register_tool,
)

__all__ = [
    "Environment",
    "EpisodeLimits",
    "StepResult",
    "Tool",
    "ToolCall",
    "ToolEnvironment",
    "ToolResult",
    "available_tools",
    "calculate",
    "get_tool",
    "parse_tool_calls",
    "register_tool",
]
