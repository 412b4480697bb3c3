"""The RL prompt curriculum of the JoyAI-LLM Flash report (section 3), as a seeded sampler.

Each prompt i has a pass rate p_i (the DPO model's success rate over its rollouts, 10 in the
report). At training progress t the prompt's weight is a Gaussian around a moving target,

    w_i = exp(-0.5 * ((p_i - mu_t) / 0.15)^2),   mu_t linear from 0.8 (first step) to 0.2 (last),

so training starts on prompts the model mostly solves and moves toward hard ones. Prompts with
p_i = 1 teach nothing under group-relative advantages (every rollout is rewarded alike) and are
dropped. Domains are balanced with probability proportional to sqrt(N_domain), N_domain counting
the prompts kept: large domains still get more steps, but sub-linearly.

Sampling is a pure function of (seed, step): a resumed run draws exactly the batches the
interrupted one would have drawn, whatever happened before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def curriculum_mu(step: int, total_steps: int, *, mu_start: float = 0.8, mu_end: float = 0.2) -> float:
    """Target pass rate at `step` in [0, total_steps): mu_start at step 0, mu_end at the last step."""
    if total_steps < 1 or not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside [0, {total_steps})")
    progress = step / (total_steps - 1) if total_steps > 1 else 0.0
    return mu_start + (mu_end - mu_start) * progress


def curriculum_weights(pass_rates: np.ndarray, mu: float, *, sigma: float = 0.15) -> np.ndarray:
    """Gaussian preference w_i = exp(-0.5 * ((p_i - mu) / sigma)^2)."""
    return np.exp(-0.5 * ((np.asarray(pass_rates, dtype=np.float64) - mu) / sigma) ** 2)


def estimate_pass_rates(rewards: np.ndarray, *, success_threshold: float = 1.0) -> np.ndarray:
    """p_i from rollout rewards [num_prompts, num_rollouts]: the fraction scoring >= threshold."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] == 0:
        raise ValueError(f"rewards must be [num_prompts, num_rollouts], got shape {rewards.shape}")
    return (rewards >= success_threshold).mean(axis=1)


class CurriculumSampler:
    """Prompt indices per step: domains by sqrt(N_domain), prompts within a domain by w_i."""

    def __init__(
        self,
        pass_rates: Sequence[float] | np.ndarray,
        domains: Sequence[str],
        *,
        total_steps: int,
        batch_size: int,
        seed: int,
        mu_start: float = 0.8,
        mu_end: float = 0.2,
        sigma: float = 0.15,
    ) -> None:
        rates = np.asarray(pass_rates, dtype=np.float64)
        if rates.ndim != 1 or len(domains) != rates.shape[0]:
            raise ValueError("pass_rates and domains must be 1-D and of equal length")
        if ((rates < 0) | (rates > 1)).any():
            raise ValueError("pass rates must lie in [0, 1]")
        if batch_size < 1 or total_steps < 1:
            raise ValueError("batch_size and total_steps must be >= 1")
        self.pass_rates = rates
        self.total_steps, self.batch_size, self.seed = total_steps, batch_size, seed
        self.mu_start, self.mu_end, self.sigma = mu_start, mu_end, sigma
        solved = rates >= 1.0
        self.num_dropped_solved = int(solved.sum())
        names = np.asarray(domains, dtype=object)
        self.domains: list[str] = sorted(set(names[~solved]))
        if not self.domains:
            raise ValueError("every prompt is solved (p = 1): nothing left to train on")
        self.domain_members = {d: np.flatnonzero((names == d) & ~solved) for d in self.domains}
        sizes = np.array([self.domain_members[d].size for d in self.domains], dtype=np.float64)
        self.domain_probs = np.sqrt(sizes) / np.sqrt(sizes).sum()

    @property
    def num_kept(self) -> int:
        return sum(m.size for m in self.domain_members.values())

    def mu(self, step: int) -> float:
        return curriculum_mu(step, self.total_steps, mu_start=self.mu_start, mu_end=self.mu_end)

    def probabilities(self, step: int) -> np.ndarray:
        """Marginal probability of each prompt (original indexing, 0 for dropped) for one draw."""
        probs = np.zeros_like(self.pass_rates)
        weights = curriculum_weights(self.pass_rates, self.mu(step), sigma=self.sigma)
        for domain, p_domain in zip(self.domains, self.domain_probs, strict=True):
            members = self.domain_members[domain]
            probs[members] = p_domain * weights[members] / weights[members].sum()
        return probs

    def sample(self, step: int) -> np.ndarray:
        """`batch_size` prompt indices for `step`: domain counts are multinomial in the domain
        probabilities, prompts are drawn without replacement inside a domain (with replacement only
        for whatever exceeds its size), and the batch is shuffled."""
        rng = np.random.default_rng([self.seed, step])
        weights = curriculum_weights(self.pass_rates, self.mu(step), sigma=self.sigma)
        counts = rng.multinomial(self.batch_size, self.domain_probs)
        picked = []
        for domain, count in zip(self.domains, counts, strict=True):
            members = self.domain_members[domain]
            p = weights[members] / weights[members].sum()
            unique = min(int(count), members.size)
            picked.append(rng.choice(members, size=unique, replace=False, p=p))
            picked.append(rng.choice(members, size=int(count) - unique, replace=True, p=p))
        batch = np.concatenate(picked)
        rng.shuffle(batch)
        return batch

    def metrics(self, step: int) -> dict[str, float]:
        """`curriculum_mu`, `prompts_kept`, `prompts_dropped_solved` for logging."""
        return {
            "curriculum_mu": self.mu(step),
            "prompts_kept": float(self.num_kept),
            "prompts_dropped_solved": float(self.num_dropped_solved),
        }
