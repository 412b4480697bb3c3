"""Group-relative advantages (GRPO) with dynamic-sampling filtering of zero-variance groups.

A prompt's n rollouts form a group; each sample's advantage is its reward relative to the group:
(r - mean) / (std + eps), or r - mean with `scale_by_std=False` (Dr. GRPO drops the std because it
up-weights near-solved and near-failed prompts). A group whose rewards are all equal carries no
learning signal (every advantage is 0) but still costs a forward/backward and dilutes the batch
mean, so dynamic sampling (DAPO) drops it and reports how many were dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupAdvantages:
    """Per-sample advantages [N], the samples to keep [N], and group counts for logging."""

    advantages: torch.Tensor
    keep: torch.Tensor
    num_groups: int
    num_kept_groups: int

    @property
    def num_filtered_groups(self) -> int:
        return self.num_groups - self.num_kept_groups

    def metrics(self) -> dict[str, float]:
        """Counts as plain floats: `groups_total`, `groups_kept`, `groups_filtered`, `filtered_frac`."""
        return {
            "groups_total": float(self.num_groups),
            "groups_kept": float(self.num_kept_groups),
            "groups_filtered": float(self.num_filtered_groups),
            "filtered_frac": self.num_filtered_groups / max(self.num_groups, 1),
        }


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    filter_zero_variance: bool = True,
) -> GroupAdvantages:
    """Advantages for rewards [N] laid out prompt-major: samples [k*n, (k+1)*n) share prompt k.

    The std is the unbiased (Bessel-corrected) group std, as in TRL and verl. With
    `filter_zero_variance`, `keep` is False for every sample of a group whose rewards are all equal;
    otherwise all samples are kept. Advantages of such groups are exactly 0 either way.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale_by_std and group_size < 2:
        raise ValueError("the group std needs group_size >= 2 (or scale_by_std=False)")
    grouped = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    varied = grouped.amax(dim=1) > grouped.amin(dim=1)
    advantages = torch.where(varied[:, None], centred, torch.zeros_like(centred))
    keep = varied if filter_zero_variance else torch.ones_like(varied)
    return GroupAdvantages(
        advantages=advantages.flatten(),
        keep=keep.repeat_interleave(group_size),
        num_groups=grouped.shape[0],
        num_kept_groups=int(keep.sum()),
    )
