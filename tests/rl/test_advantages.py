"""Group-normalised advantages and dynamic-sampling filtering."""

from __future__ import annotations

import pytest
import torch

from joyai_megatron.rl.advantages import group_advantages


def test_group_normalisation_matches_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 0.0])
    out = group_advantages(rewards, 4)
    for k in range(3):
        r = rewards[4 * k : 4 * k + 4].tolist()
        mean = sum(r) / 4
        std = (sum((x - mean) ** 2 for x in r) / 3) ** 0.5  # unbiased
        expected = [0.0] * 4 if std == 0 else [(x - mean) / (std + 1e-6) for x in r]
        assert out.advantages[4 * k : 4 * k + 4].tolist() == pytest.approx(expected)
    assert out.keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert (out.num_groups, out.num_kept_groups, out.num_filtered_groups) == (3, 2, 1)
    assert out.metrics() == {
        "groups_total": 3.0,
        "groups_kept": 2.0,
        "groups_filtered": 1.0,
        "filtered_frac": 1 / 3,
    }


def test_without_std_and_without_filtering():
    rewards = torch.tensor([3.0, 1.0, 2.0, 2.0])
    out = group_advantages(rewards, 2, scale_by_std=False, filter_zero_variance=False)
    assert out.advantages.tolist() == [1.0, -1.0, 0.0, 0.0]
    assert out.keep.all() and out.num_filtered_groups == 0


def test_every_kept_group_has_zero_mean_and_unit_std():
    rewards = torch.rand(64, generator=torch.Generator().manual_seed(0)).round()
    out = group_advantages(rewards, 8)
    grouped = out.advantages.view(8, 8)
    kept = out.keep.view(8, 8)[:, 0]
    torch.testing.assert_close(grouped.mean(dim=1), torch.zeros(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(grouped[kept].std(dim=1), torch.ones(int(kept.sum())), atol=1e-4, rtol=0)


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(4), 1)
