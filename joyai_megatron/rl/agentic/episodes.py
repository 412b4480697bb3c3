"""Multi-turn rollouts: the policy and an environment take turns until an answer or a limit.

Every turn, all unfinished episodes of the batch generate one assistant turn together (one
``engine.generate`` call, any engine: local, in a process, vLLM, SGLang), each episode's
environment executes the tool calls, and the tool replies are appended to its context rendered
exactly as the chat template renders ``tool`` messages followed by the next generation prompt.
The episode's response is then ``turn_1 + tools_1 + turn_2 + ... + turn_k``; ``response_mask`` is 1
on the policy's tokens only (tool replies and template scaffolding never train), and the tool
tokens carry log-prob 0 (they are masked everywhere).

Sampling seeds derive from (rollout seed, turn), so episodes are a function of the weights, the
prompts and the seed, as single-turn rollouts are: resume stays exact (wall-clock limits aside,
which only bite when a tool or the machine is slower than ``total_timeout_s`` allows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from joyai_megatron.rl.agentic.env import Environment
from joyai_megatron.rl.rollout.base import RolloutEngine, SamplingParams


@dataclass
class EpisodeInfo:
    """What a multi-turn trajectory did (typed rollout state, saved with pending rollouts)."""

    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: str | None = None  # max_turns | length | context | timeout (see env.py)
    turn_ids: list[int] = field(default_factory=list)  # per response token: its turn (tools: the caller's)
    turn_errors: list[int] = field(default_factory=list)  # per turn: tool errors it caused


@dataclass
class Episode:
    """One episode in flight."""

    prompt_ids: list[int]
    env: Environment
    enable_thinking: bool
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    info: EpisodeInfo = field(default_factory=EpisodeInfo)
    done: bool = False

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def add(self, ids: list[int], logprobs: list[float] | None, turn: int) -> None:
        self.response_ids += ids
        self.response_mask += [int(logprobs is not None)] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.info.turn_ids += [turn] * len(ids)


@cache
def observation_text(tool_replies: tuple[str, ...], enable_thinking: bool) -> str:
    """The text between an assistant turn's ``<|im_end|>`` and the next turn's first generated
    token: the chat template's rendering of the tool messages plus the generation prompt (taken as
    the difference of two renderings, so it follows the template, whatever it is)."""
    from data_prep.chat import Conversation, render

    base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    tools = [{"role": "tool", "content": c} for c in tool_replies]
    before, _ = render(Conversation(base, None, enable_thinking))
    after, _ = render(Conversation(base + tools, None, enable_thinking), add_generation_prompt=True)
    if not (after.startswith(before) and before.endswith("\n")):
        raise ValueError("chat template: a tool turn does not extend the conversation's rendering")
    # The newline after <|im_end|> belongs to the template, not to the generated turn.
    return "\n" + after[len(before) :]


def turn_seed(seed: int, turn: int) -> int:
    return int(np.random.SeedSequence([seed, turn]).generate_state(1)[0])


def run_episodes(
    engine: RolloutEngine,
    episodes: list[Episode],
    params: SamplingParams,
    seed: int,
    max_turns: int,
    seq_length: int,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
) -> list[Episode]:
    """Play every episode to its end (in place); returns them in the given order."""
    for turn in range(max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        gens = engine.generate([e.context for e in active], 1, params, turn_seed(seed, turn))
        for episode, (sample,) in zip(active, gens, strict=True):
            _advance(episode, sample, turn, seq_length, encode, decode)
    for episode in episodes:
        if not episode.done:  # the environment allowed more turns than the runner's max_turns
            episode.env.truncate("max_turns")
            episode.info.truncated, episode.done = "max_turns", True
    return episodes


def _advance(episode: Episode, sample, turn: int, seq_length: int, encode, decode) -> None:
    room = seq_length - len(episode.context)
    ids, logprobs = sample.token_ids[:room], sample.logprobs[:room]
    episode.add(ids, logprobs, turn)
    episode.info.turns += 1
    if len(sample.token_ids) > room:  # the turn outgrew train.seq_length: cut, never trained past it
        _truncate(episode, "context")
        return
    text = decode(ids)
    result = episode.env.step(text, sample.stopped)
    episode.info.tool_calls += result.tool_calls
    episode.info.tool_errors += result.tool_errors
    episode.info.turn_errors.append(result.tool_errors)
    if result.done:
        episode.done = True
        episode.info.truncated = episode.env.truncated
        return
    observation = encode(
        observation_text(tuple(m["content"] for m in result.messages), episode.enable_thinking)
    )
    if len(episode.context) + len(observation) >= seq_length:  # no room left for another turn
        _truncate(episode, "context")
        return
    episode.add(observation, None, turn)


def _truncate(episode: Episode, reason: str) -> None:
    episode.env.truncate(reason)
    episode.info.truncated, episode.done = reason, True
