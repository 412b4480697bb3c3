"""Curriculum: Gaussian weights, the mu schedule, dropping solved prompts, sqrt(N) domain balance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from joyai_megatron.rl.curriculum import (
    CurriculumSampler,
    curriculum_mu,
    curriculum_weights,
    estimate_pass_rates,
)


def test_weights_at_known_points():
    p = np.array([0.8, 0.65, 0.95, 0.5, 0.2])
    expected = [1.0, math.exp(-0.5), math.exp(-0.5), math.exp(-2.0), math.exp(-8.0)]
    np.testing.assert_allclose(curriculum_weights(p, 0.8), expected, rtol=1e-12)


def test_mu_is_linear_from_0_8_to_0_2():
    assert curriculum_mu(0, 101) == pytest.approx(0.8)
    assert curriculum_mu(50, 101) == pytest.approx(0.5)
    assert curriculum_mu(100, 101) == pytest.approx(0.2)
    assert curriculum_mu(0, 1) == pytest.approx(0.8)
    mus = [curriculum_mu(s, 11) for s in range(11)]
    np.testing.assert_allclose(np.diff(mus), -0.06, rtol=1e-9)
    with pytest.raises(ValueError):
        curriculum_mu(11, 11)


def test_pass_rates_from_rollouts():
    rewards = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1.0, 0.9, 1.0, 1.0]])
    np.testing.assert_allclose(estimate_pass_rates(rewards), [0.75, 0.0, 0.75])
    np.testing.assert_allclose(estimate_pass_rates(rewards, success_threshold=0.5), [0.75, 0.0, 1.0])


def _sampler(batch_size: int = 32, total_steps: int = 1000) -> CurriculumSampler:
    rng = np.random.default_rng(0)
    sizes = {"math": 400, "code": 100, "if": 25}
    rates, domains = [], []
    for name, size in sizes.items():
        rates += list(rng.integers(0, 10, size) / 10)  # p < 1: all kept
        domains += [name] * size
    rates += [1.0] * 30  # solved prompts, dropped (and one domain that is all solved)
    domains += ["math"] * 20 + ["solved_only"] * 10
    return CurriculumSampler(rates, domains, total_steps=total_steps, batch_size=batch_size, seed=7)


def test_solved_prompts_are_dropped_and_counted():
    sampler = _sampler()
    assert sampler.num_dropped_solved == 30 and sampler.num_kept == 525
    assert "solved_only" not in sampler.domains
    solved = np.flatnonzero(sampler.pass_rates >= 1.0)
    drawn = np.concatenate([sampler.sample(s) for s in range(0, 1000, 10)])
    assert not np.isin(drawn, solved).any()
    assert sampler.metrics(0) == {"curriculum_mu": 0.8, "prompts_kept": 525.0, "prompts_dropped_solved": 30.0}


def test_domain_frequencies_follow_sqrt_of_domain_size():
    sampler = _sampler()
    expected = {"math": 20 / 35, "code": 10 / 35, "if": 5 / 35}  # sqrt(400) : sqrt(100) : sqrt(25)
    for name, prob in zip(sampler.domains, sampler.domain_probs, strict=True):
        assert prob == pytest.approx(expected[name])
    draws = np.concatenate([sampler.sample(s) for s in range(1000)])  # 32,000 draws
    domain_of = {int(i): d for d, members in sampler.domain_members.items() for i in members}
    counts = {d: 0 for d in expected}
    for index in draws:
        counts[domain_of[int(index)]] += 1
    for name, prob in expected.items():
        assert counts[name] / draws.size == pytest.approx(prob, abs=0.01)


def test_prompt_preference_moves_from_easy_to_hard():
    sampler = _sampler(batch_size=8)

    def mean_pass_rate(steps: range) -> float:
        return float(np.mean([sampler.pass_rates[sampler.sample(s)].mean() for s in steps]))

    early, late = mean_pass_rate(range(0, 100)), mean_pass_rate(range(900, 1000))
    assert early > 0.65 and late < 0.35
    probs = sampler.probabilities(0)
    assert probs.sum() == pytest.approx(1.0)
    math_members = sampler.domain_members["math"]
    easy = math_members[sampler.pass_rates[math_members] == 0.8][0]
    hard = math_members[sampler.pass_rates[math_members] == 0.2][0]
    assert probs[easy] / probs[hard] == pytest.approx(1 / math.exp(-8.0))


def test_sampling_is_a_pure_function_of_seed_and_step():
    a, b = _sampler(), _sampler()
    np.testing.assert_array_equal(a.sample(17), b.sample(17))
    b.sample(3)  # drawing other steps first changes nothing
    np.testing.assert_array_equal(a.sample(18), b.sample(18))
    assert not np.array_equal(a.sample(17), a.sample(18))
    batch = a.sample(5)
    assert batch.size == 32
    assert len(set(batch.tolist())) == 32  # no repeats while domains have enough prompts


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="equal length"):
        CurriculumSampler([0.5], ["a", "b"], total_steps=10, batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CurriculumSampler([1.5], ["a"], total_steps=10, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="every prompt is solved"):
        CurriculumSampler([1.0, 1.0], ["a", "b"], total_steps=10, batch_size=2, seed=0)
