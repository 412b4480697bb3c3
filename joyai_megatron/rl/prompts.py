"""Which prompts each rollout uses: a seeded epoch order, or the report's pass-rate curriculum.

Both are pure functions of (seed, rollout index), so a resumed run draws exactly the prompts the
interrupted run would have drawn, and every rank agrees without communication.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from joyai_megatron.rl.curriculum import CurriculumSampler


@dataclass(frozen=True)
class Prompt:
    """What a rollout needs from one ``data_prep rl`` record."""

    id: str
    token_ids: list[int]
    reference: str  # the answer, or the tests joined by newlines (code verifier)
    verifier: str
    domain: str
    enable_thinking: bool = True
    tools: tuple[str, ...] | None = None  # agentic prompts: the tools its environment executes


def load_prompts(path: str | Path, vocab_size: int) -> list[Prompt]:
    """Read a ``data_prep rl`` JSONL file; errors name the file and the offending record."""
    from data_prep.rl import read_rl_prompts

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: RL prompt file not found (run `python -m data_prep rl` or `demo`)")
    prompts = []
    for record in read_rl_prompts(path):
        if not record.prompt_ids:
            raise ValueError(f"{path}: prompt {record.id} has no tokens")
        if max(record.prompt_ids) >= vocab_size:
            raise ValueError(
                f"{path}: prompt {record.id} has token ids >= the model's vocab_size {vocab_size}"
            )
        tests = record.tests
        reference = record.answer if record.answer is not None else "\n".join(map(str, tests or []))
        prompts.append(
            Prompt(
                record.id,
                list(record.prompt_ids),
                reference,
                record.verifier,
                record.domain,
                record.enable_thinking,
                tuple(record.tools) if record.tools else None,
            )
        )
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def epoch_order(num_prompts: int, count: int, start: int, seed: int) -> np.ndarray:
    """Positions [start, start + count) of an endless sequence of seeded per-epoch permutations."""
    out = np.empty(count, dtype=np.int64)
    cache: dict[int, np.ndarray] = {}
    for i, pos in enumerate(range(start, start + count)):
        epoch = pos // num_prompts
        if epoch not in cache:
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(num_prompts)
        out[i] = cache[epoch][pos % num_prompts]
    return out


class PromptSampler:
    """Prompt indices for rollout r (the same on every rank)."""

    def __init__(
        self,
        prompts: list[Prompt],
        per_rollout: int,
        total_rollouts: int,
        seed: int,
        pass_rates: list[float] | None = None,
    ) -> None:
        self.prompts, self.per_rollout, self.seed = prompts, per_rollout, seed
        self.curriculum = None
        if pass_rates is not None:
            self.curriculum = CurriculumSampler(
                pass_rates,
                [p.domain for p in prompts],
                total_steps=total_rollouts,
                batch_size=per_rollout,
                seed=seed,
            )

    def indices(self, rollout: int) -> np.ndarray:
        if self.curriculum is not None:
            return self.curriculum.sample(min(rollout, self.curriculum.total_steps - 1))
        return epoch_order(len(self.prompts), self.per_rollout, rollout * self.per_rollout, self.seed)

    def metrics(self, rollout: int) -> dict[str, float]:
        if self.curriculum is None:
            return {}
        return self.curriculum.metrics(min(rollout, self.curriculum.total_steps - 1))


def read_pass_rates(path: str | Path, prompts: list[Prompt]) -> list[float]:
    """``{prompt id: pass rate}`` JSON -> rates in prompt order; every prompt must be covered."""
    table = json.loads(Path(path).read_text())
    missing = [p.id for p in prompts if p.id not in table]
    if missing:
        raise ValueError(f"rl.pass_rates {path}: no pass rate for {len(missing)} prompts, e.g. {missing[0]}")
    return [float(table[p.id]) for p in prompts]
