import math

import numpy as np
import pytest
import torch

from flow_trl.advantages import advantage_stats, best_worst_pairs, clip_advantages, group_advantages, reward_stats


NAN = float("nan")
REWARDS = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])


def test_group_scale_uses_each_groups_population_std():
    adv = group_advantages(REWARDS, num_generations=3, scale="group")
    std1, std2 = math.sqrt(2 / 3), math.sqrt(2)  # population stds of [1, 2, 3] and [10, 10, 13]
    expected = [-1 / (std1 + 1e-4), 0.0, 1 / (std1 + 1e-4), -1 / (std2 + 1e-4), -1 / (std2 + 1e-4), 2 / (std2 + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert adv.dtype == torch.float32


def test_batch_scale_uses_the_std_of_all_rewards():
    adv = group_advantages(REWARDS, num_generations=3, scale="batch", eps=0.0)
    std = float(np.std(REWARDS.numpy()))  # numpy's default is the population std, as in flow_grpo
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]) / std)


def test_none_scale_only_centres():
    adv = group_advantages(REWARDS, num_generations=3, scale="none")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]))


def test_groups_are_contiguous_blocks():
    adv = group_advantages(torch.tensor([0.0, 1.0, 0.0, 1.0]), num_generations=2, scale="none")
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5, -0.5, 0.5]))


def test_nan_rewards_are_excluded_and_get_zero_advantage():
    rewards = torch.tensor([1.0, NAN, 3.0, 5.0, NAN, NAN, 4.0, 4.0, 4.0])
    adv = group_advantages(rewards, num_generations=3, scale="group")
    # group 1: finite [1, 3] -> mean 2, population std 1; group 2 has one finite reward; group 3 has zero variance
    expected = torch.tensor([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)
    batch = group_advantages(rewards, num_generations=3, scale="batch", eps=0.0)
    finite = rewards[~rewards.isnan()]
    std = finite.std(unbiased=False)
    torch.testing.assert_close(batch, torch.tensor([-1.0, 0, 1, 0, 0, 0, 0, 0, 0]) / std)
    assert torch.isfinite(group_advantages(torch.full((4,), NAN), 2)).all()


def test_invalid_geometry_and_scale_fail_clearly():
    with pytest.raises(ValueError, match=r"N=5.*G=2"):
        group_advantages(torch.zeros(5), num_generations=2)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.zeros(4), num_generations=2, scale="global")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), num_generations=2)
    with pytest.raises(ValueError, match=r"N=3.*G=2"):
        reward_stats(torch.zeros(3), num_generations=2)


def test_clip_advantages():
    adv = torch.tensor([-7.0, -1.0, 0.5, 6.0])
    assert clip_advantages(adv, None) is adv
    torch.testing.assert_close(clip_advantages(adv, 5.0), torch.tensor([-5.0, -1.0, 0.5, 5.0]))
    with pytest.raises(ValueError, match="positive"):
        clip_advantages(adv, 0.0)


def test_reward_stats():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, NAN])
    stats = reward_stats(rewards, num_generations=2)
    finite = np.array([1.0, 3.0, 2.0, 2.0, 5.0])
    assert stats["reward"] == pytest.approx(finite.mean())
    assert stats["reward_std"] == pytest.approx(finite.std())
    assert stats["frac_reward_zero_std"] == pytest.approx(2 / 3)  # [2, 2] and the single finite reward [5, nan]


def test_advantage_stats():
    stats = advantage_stats(torch.tensor([-2.0, 0.0, 1.0, 1.0]))
    assert stats == pytest.approx({
        "advantages/mean": 0.0,
        "advantages/std": math.sqrt(1.5),
        "advantages/abs_mean": 1.0,
        "advantages/max": 1.0,
        "advantages/min": -2.0,
    })


def test_best_worst_pairs():
    rewards = torch.tensor([0.2, 0.9, 0.1, 0.5, 0.5, 0.5, float("nan"), 0.3, 0.7])
    winners, losers, valid = best_worst_pairs(rewards, num_generations=3)
    assert winners.tolist()[0] == 1 and losers.tolist()[0] == 2
    assert valid.tolist() == [True, False, True]  # the tied group carries no preference
    assert winners.tolist()[2] == 8 and losers.tolist()[2] == 7  # the NaN (abstained) reward is skipped
    single = best_worst_pairs(torch.tensor([float("nan"), 1.0]), num_generations=2)[2]
    assert single.tolist() == [False]


def test_best_worst_pairs_by_rank():
    rewards = torch.tensor([0.2, 0.9, 0.1, 0.5, 1.0, 1.0, 0.0, 0.0, float("nan"), 0.4, 0.3, 0.8])
    winners, losers, valid = best_worst_pairs(rewards, num_generations=4, pairs_per_group=2)
    assert winners.tolist() == [1, 3, 4, 5, 11, 9]
    assert losers.tolist() == [2, 0, 6, 7, 10, 9]  # ties keep the earliest first; NaN is never picked
    assert valid.tolist() == [True, True, True, True, True, False]  # 3 finite rewards: the middle one pairs itself
    assert best_worst_pairs(rewards, 4, pairs_per_group=1)[0].tolist() == [1, 4, 11]
    with pytest.raises(ValueError, match="pairs_per_group must be between 1 and num_generations // 2 = 2"):
        best_worst_pairs(rewards, 4, pairs_per_group=3)
