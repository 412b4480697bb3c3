"""Model-independent RL pieces for the `rl` stage: losses, advantages, rewards, curriculum."""

from joyai_megatron.rl.baselines import grpo_loss, gspo_loss
from joyai_megatron.rl.fiberpo import fiberpo_loss
from joyai_megatron.rl.fiberpo_domain import fiberpo_domain_loss

__all__ = ["fiberpo_domain_loss", "fiberpo_loss", "grpo_loss", "gspo_loss"]
