"""The environment interface of agentic RL (reset / step / reward) and the tool-calling environment.

An episode: ``reset(prompt)``, then for every assistant turn ``step(text, stopped)`` returns the
messages to append (tool results) or ``done``; ``reward()`` scores the episode once it is done.

Limits (``EpisodeLimits``): ``max_turns`` assistant turns, ``turn_timeout_s`` per turn for the
tools it calls (each call gets what is left of it), ``total_timeout_s`` of wall clock per episode.

**Truncation.** An episode is *truncated* when it ends without a final answer: its last turn
still called tools at the turn limit (``max_turns``), a turn was cut at ``rl.max_new_tokens``
without a stop token (``length``), the conversation outgrew ``train.seq_length`` (``context``, set
by the episode runner), or the total timeout passed (``timeout``). Truncated episodes are counted
(``truncated_frac``), kept in their group and scored ``truncated_reward`` (default 0, the score of
a wrong answer): they are failures the policy should learn to avoid, not noise to drop.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from joyai_megatron.rl.agentic.tools import Tool, ToolResult, get_tool, parse_tool_calls


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 4
    turn_timeout_s: float = 10.0
    total_timeout_s: float = 300.0
    truncated_reward: float = 0.0

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"rl.agentic.max_turns must be >= 1, got {self.max_turns}")
        if not (self.turn_timeout_s > 0 and self.total_timeout_s > 0):
            raise ValueError("rl.agentic timeouts must be > 0")


@dataclass
class StepResult:
    """What one assistant turn led to."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # tool replies to append
    done: bool = False
    tool_calls: int = 0
    tool_errors: int = 0


class Environment(ABC):
    @abstractmethod
    def reset(self, prompt: Any) -> None:
        """Start an episode on ``prompt`` (a :class:`joyai_megatron.rl.prompts.Prompt`)."""

    @abstractmethod
    def step(self, text: str, stopped: bool) -> StepResult:
        """Consume one assistant turn (decoded, stop token removed)."""

    @abstractmethod
    def reward(self) -> float:
        """The finished episode's score in [0, 1]."""

    truncated: str | None = None  # why the episode ended without an answer (None: it did not)

    def truncate(self, reason: str) -> None:
        self.truncated = reason


class ToolEnvironment(Environment):
    """Executes the turn's tool calls and returns their results as ``tool`` messages; a turn
    without a tool call is the final answer, scored by ``reward_fn(answer, reference)``."""

    def __init__(
        self,
        tools: dict[str, Tool],
        reward_fn: Callable[[str, str], float],
        limits: EpisodeLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tools, self.reward_fn, self.limits, self.clock = tools, reward_fn, limits, clock
        self.prompt: Any = None

    def reset(self, prompt: Any) -> None:
        self.prompt, self.turns, self.answer = prompt, 0, None
        self.truncated = None
        self.started = self.clock()

    def step(self, text: str, stopped: bool) -> StepResult:
        self.turns += 1
        calls = parse_tool_calls(text)
        if not calls:
            if stopped:
                self.answer = text
            else:
                self.truncate("length")
            return StepResult(done=True)
        if self.turns >= self.limits.max_turns:
            self.truncate("max_turns")
            return StepResult(done=True, tool_calls=len(calls))
        if self.clock() - self.started > self.limits.total_timeout_s:
            self.truncate("timeout")
            return StepResult(done=True, tool_calls=len(calls))
        turn_end = self.clock() + self.limits.turn_timeout_s
        out = StepResult(tool_calls=len(calls))
        for call in calls:
            result = self._run(call, turn_end)
            out.tool_errors += int(result.error)
            out.messages.append({"role": "tool", "content": result.content})
        return out

    def _run(self, call: Any, turn_end: float) -> ToolResult:
        if call.error is not None:
            return ToolResult(f"error: {call.error}", True)
        tool = self.tools.get(call.name)
        if tool is None:
            return ToolResult(f"error: unknown tool {call.name!r}", True)
        left = min(turn_end, self.started + self.limits.total_timeout_s) - self.clock()
        if left <= 0:
            return ToolResult("error: turn timeout", True)
        return tool.run(call.arguments, timeout_s=left)

    def reward(self) -> float:
        if self.truncated is not None or self.answer is None:
            return self.limits.truncated_reward
        return float(self.reward_fn(self.answer, self.prompt.reference))


def tool_environment(
    tool_names: list[str], reward_fn: Callable[[str, str], float], limits: EpisodeLimits
) -> ToolEnvironment:
    return ToolEnvironment({name: get_tool(name) for name in tool_names}, reward_fn, limits)


def check_agentic_config(rl: Any) -> None:
    """Fail on a bad ``rl.agentic`` section before any model is built."""
    from joyai_megatron.rl.agentic.tools import available_tools
    from joyai_megatron.rl.replay import replay_mode
    from joyai_megatron.rl.rewards.sandbox import bubblewrap_available
    from joyai_megatron.rl.rewards.sandbox.isolation import SETUP_HINT

    cfg = rl.agentic
    EpisodeLimits(cfg.max_turns, cfg.turn_timeout_s, cfg.total_timeout_s, cfg.truncated_reward)
    unknown = sorted(set(cfg.tools) - set(available_tools()))
    if unknown:
        raise ValueError(f"rl.agentic.tools: unknown tools {unknown}; registered: {available_tools()}")
    if cfg.advantage_level not in ("trajectory", "turn"):
        raise ValueError(
            f"rl.agentic.advantage_level must be trajectory or turn, got {cfg.advantage_level!r}"
        )
    if replay_mode(rl.routing_replay) == "r3":
        raise ValueError("rl.agentic: rollout routing replay (r3) is single-turn only; use r2")
    if "python" in cfg.tools and not rl.unsafe_code_execution and not bubblewrap_available():
        raise ValueError(f"rl.agentic.tools has python, and no sandbox is available: {SETUP_HINT}")
