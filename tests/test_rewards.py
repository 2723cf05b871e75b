"""Reward plumbing: abstentions, weighting, and clear errors for bad reward output."""

import math

import pytest
import torch

from flow_trl.rewards import compute_rewards, resolve_reward_funcs, weighted_reward


def test_none_abstains_and_weighting_skips_it():
    def half(prompts, images, **kwargs):
        return [0.5, None]

    def one(prompts, images, **kwargs):
        return [1.0, 2.0]

    rewards = compute_rewards([half, one], ["a", "b"], torch.zeros(2, 3, 4, 4))
    assert rewards[0].tolist() == [0.5, 1.0] and math.isnan(rewards[1, 0]) and rewards[1, 1] == 2.0
    assert weighted_reward(rewards, [2.0, 1.0]).tolist() == [2.0, 2.0]


def test_infinite_reward_fails_clearly():
    def bad(prompts, images, **kwargs):
        return [float("inf")] * len(prompts)

    with pytest.raises(ValueError, match="'bad' returned an infinite value"):
        compute_rewards([bad], ["a", "b"], torch.zeros(2, 3, 4, 4))


def test_unknown_reward_name_fails_clearly():
    with pytest.raises(ValueError, match="Unknown reward 'pickscroe'"):
        resolve_reward_funcs(["pickscroe"])


def test_builtin_shapes_rewards_score_ground_truth_and_quality():
    from flow_trl.toy import render_batch

    prompts = ["a photo of a red circle", "a photo of two squares"]
    images = render_batch(prompts, [0, 1])
    shapes, quality = resolve_reward_funcs(["shapes", "shapes_quality"])
    assert shapes(prompts, images) == [1.0, 1.0]
    assert quality.__name__ == "shapes_quality" and all(0.9 < q <= 1.0 for q in quality(prompts, images))
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert all(q < 0.1 for q in quality(prompts, noise))


def test_shapes_rewards_are_registered_by_name_and_imported_on_resolution():
    import subprocess
    import sys

    from flow_trl.rewards import BUILTIN_REWARDS, BuiltinReward

    assert BUILTIN_REWARDS["shapes_strict"] == BuiltinReward("flow_trl.toy.scorer:ShapesReward", {"strict": True})
    assert all(isinstance(entry, BuiltinReward) for entry in BUILTIN_REWARDS.values())
    code = (
        "import sys\n"
        "from flow_trl.rewards import resolve_reward_funcs\n"
        "assert 'flow_trl.toy' not in sys.modules, 'importing flow_trl.rewards imported the toy world'\n"
        "funcs = resolve_reward_funcs(['shapes', 'shapes_strict', 'shapes_quality'])\n"
        "print([type(f).__name__ for f in funcs], [getattr(f, 'strict', None) for f in funcs], funcs[2].__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = "['ShapesReward', 'ShapesReward', 'function'] [False, True, None] shapes_quality"
    assert result.stdout.strip() == expected
