"""NormGuard's diagnostics: profiles, renormalisation and the adjoint sensitivity on exactly known models."""

import pytest
import torch

from flow_trl.diagnostics import (
    norm_scaling_sensitivity,
    pipeline_velocity_fns,
    renormalized,
    sensitivity_stats,
    velocity_norm_profile,
)
from flow_trl.sampling import rollout, sigma_grid
from flow_trl.toy.scorer import soft_color_reward


SIGMAS = sigma_grid(6, shift=2.0)


def reference_fn(x, sigma):
    """A smooth nonlinear stand-in for a velocity field."""
    s = sigma.view(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x) * (1 + s) - 0.3 * x.roll(1, dims=-1)


def test_profile_of_a_scaled_model_reports_the_scale_at_every_step():
    noise = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    profile = velocity_norm_profile(lambda x, s: 1.2 * reference_fn(x, s), reference_fn, noise, SIGMAS)
    assert len(profile["ratio_mean"]) == 6 and profile["num_samples"] == 5
    assert profile["ratio_mean"] == pytest.approx([1.2] * 6, abs=1e-6)
    assert profile["ratio_std"] == pytest.approx([0.0] * 6, abs=1e-6)
    assert profile["norm_mean"] == pytest.approx([1.2 * r for r in profile["ref_norm_mean"]], rel=1e-6)
    assert profile["sigma"] == pytest.approx(SIGMAS[:-1].tolist())


def test_renormalising_a_scaled_model_reproduces_the_reference_samples():
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    scaled = renormalized(lambda x, s: 1.3 * reference_fn(x, s), reference_fn)
    ours = rollout(scaled, noise, SIGMAS).latents
    theirs = rollout(reference_fn, noise, SIGMAS).latents
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert not torch.allclose(rollout(lambda x, s: 1.3 * reference_fn(x, s), noise, SIGMAS).latents, theirs)


def test_sensitivity_matches_a_finite_difference_of_scaling_one_step():
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigmas = SIGMAS.double()
    weights = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def reward(x):
        return (torch.sin(x) * weights).flatten(1).sum(dim=1)

    sensitivity = norm_scaling_sensitivity(reference_fn, noise, sigmas, reward)
    assert sensitivity.shape == (3, 6)

    def reward_with_step_scaled(k, eps):
        x = noise
        for j in range(6):
            v = reference_fn(x, sigmas[j].expand(3)) * (1 + eps if j == k else 1)
            x = x + (sigmas[j + 1] - sigmas[j]) * v
        return reward(x)

    eps = 1e-5
    for k in (0, 3, 5):
        finite_difference = (reward_with_step_scaled(k, eps) - reward_with_step_scaled(k, -eps)) / (2 * eps)
        dt = (sigmas[k] - sigmas[k + 1]).abs()
        # S_k |dsigma_k| is dR/deps for scaling step k's velocity by (1 + eps); tolerance 1e-6 relative (fp64)
        torch.testing.assert_close(sensitivity[:, k].double() * dt, finite_difference, rtol=1e-5, atol=1e-8)
    checkpointed = norm_scaling_sensitivity(reference_fn, noise, sigmas, reward, checkpoint_steps=True)
    torch.testing.assert_close(checkpointed, sensitivity)
    stats = sensitivity_stats(sensitivity)
    assert len(stats["mean"]) == 6 and all(v >= 0 for v in stats["noise_to_signal"])


def test_pipeline_velocity_fns_reference_disables_the_lora(shapes_pipe):
    from peft import LoraConfig

    from flow_trl.toy import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                            target_modules=["attn.to_q", "attn.to_v"]))
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    prompts = ["a photo of a red circle", "a photo of two squares"]
    policy, reference = pipeline_velocity_fns(pipe, prompts)
    base_policy, _ = pipeline_velocity_fns(shapes_pipe, prompts)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 0.7)
    with torch.no_grad():
        torch.testing.assert_close(reference(x, sigma), base_policy(x, sigma))
        assert not torch.allclose(policy(x, sigma), reference(x, sigma))


def test_soft_color_reward_is_differentiable_and_prefers_the_named_colour():
    from flow_trl.toy import render

    red = render("a photo of a red circle", seed=0)[None]
    blue = render("a photo of a blue circle", seed=0)[None]
    prompts = ["a photo of a red circle"]
    assert soft_color_reward(prompts, red) > 5 * soft_color_reward(prompts, blue)
    image = blue.clone().requires_grad_(True)
    soft_color_reward(prompts, image).sum().backward()
    assert image.grad.abs().sum() > 0
