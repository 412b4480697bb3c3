"""Model-independent RL pieces for the `rl` stage: losses, advantages, rewards, curriculum.

Rewards live in `joyai_megatron.rl.rewards` (imported on demand: it registers the verifiers).
"""

from joyai_megatron.rl.advantages import GroupAdvantages, group_advantages
from joyai_megatron.rl.baselines import grpo_loss, gspo_loss
from joyai_megatron.rl.curriculum import (
    CurriculumSampler,
    curriculum_mu,
    curriculum_weights,
    estimate_pass_rates,
)
from joyai_megatron.rl.fiberpo import fiberpo_loss
from joyai_megatron.rl.fiberpo_domain import fiberpo_domain_loss

__all__ = [
    "CurriculumSampler",
    "GroupAdvantages",
    "curriculum_mu",
    "curriculum_weights",
    "estimate_pass_rates",
    "fiberpo_domain_loss",
    "fiberpo_loss",
    "group_advantages",
    "grpo_loss",
    "gspo_loss",
]
