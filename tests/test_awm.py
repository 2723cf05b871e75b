"""AWM's loss against hand-written formulas, and FlowAWMTrainer end to end on the shapes world."""

import pytest
import torch
from helpers import MODEL, tiny_config, tiny_lora, train_prompts

from flow_trl import FlowAWMConfig, FlowAWMTrainer
from flow_trl.trainer.awm_trainer import awm_loss, flow_matching_log_likelihood


def _inputs(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(b, 2, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    target = torch.randn(b, 2, 3, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.2, 0.5, 0.9][:b], dtype=torch.float64)
    advantages = torch.tensor([1.0, -0.5, 0.25][:b], dtype=torch.float64)
    return v, target, sigma, advantages


@pytest.mark.parametrize("weighting", ["ghuber", "uniform"])
def test_log_likelihood_matches_the_hand_formula(weighting):
    v, target, sigma, _ = _inputs()
    mse = ((v - target) ** 2).mean(dim=(1, 2, 3))
    p = 0.25
    expected = -sigma * ((mse + 1e-10) ** p - 1e-10**p) / p if weighting == "ghuber" else -mse
    torch.testing.assert_close(flow_matching_log_likelihood(mse, sigma, weighting, p), expected)


@pytest.mark.parametrize("weighting", ["ghuber", "uniform"])
def test_awm_ratio_is_one_and_gradient_is_advantage_weighted_flow_matching(weighting):
    v, target, sigma, advantages = _inputs()
    p, b, d = 0.25, 3, 18
    loss, metrics = awm_loss(v, target, sigma, advantages, weighting, p, clip_range=1.0)
    torch.testing.assert_close(loss.double(), -advantages.mean())  # ratio == 1 exactly: loss = mean(-A)
    assert metrics["awm/clip_frac"] == 0.0
    loss.backward()
    mse = ((v - target) ** 2).mean(dim=(1, 2, 3)).detach()
    grad_mse = 2 * (v - target).detach() / d
    weight = sigma * (mse + 1e-10) ** (p - 1) if weighting == "ghuber" else torch.ones(b, dtype=torch.float64)
    expected = (advantages * weight).view(-1, 1, 1, 1) * grad_mse / b  # A t mse^(p-1) grad(mse), batch mean
    torch.testing.assert_close(v.grad, expected)


def test_positive_advantage_pulls_toward_the_target_and_negative_pushes_away():
    for sign in (1.0, -1.0):
        v, target, sigma, _ = _inputs(b=2)
        advantages = torch.full((2,), sign, dtype=torch.float64)
        loss, _ = awm_loss(v, target, sigma, advantages)
        loss.backward()
        with torch.no_grad():
            before = ((v - target) ** 2).mean()
            after = ((v - 0.05 * v.grad - target) ** 2).mean()
        assert (after < before) == (sign > 0)


def test_zero_advantage_gives_zero_gradient():
    v, target, sigma, _ = _inputs()
    loss, _ = awm_loss(v, target, sigma, torch.zeros(3, dtype=torch.float64))
    loss.backward()
    assert torch.count_nonzero(v.grad) == 0


AWM = dict(num_train_timesteps=2, max_steps=2, learning_rate=1e-2)


def tiny_awm_config(tmp_path, **overrides):
    return tiny_config(FlowAWMConfig, tmp_path / "awm", **{**AWM, **overrides})


def test_awm_trains_the_lora_keeps_an_ema_adapter_and_logs(tmp_path):
    trainer = FlowAWMTrainer(MODEL, args=tiny_awm_config(tmp_path, norm_guard_coef=0.01),
                             reward_funcs="shapes", train_dataset=train_prompts(16),
                             peft_config=tiny_lora())
    before = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters()}
    trainer.train()
    params = dict(trainer.transformer.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], params[n])}
    assert any(".default." in n for n in changed)
    assert all("lora_" in n for n in changed), "a base weight changed"
    # the EMA adapter moved once, by the soft update before the second rollout (d = 0.001): not by gradient
    ema = [n for n in changed if ".ema." in n]
    assert ema and all(params[n].grad is None for n in ema)
    for n in ema:
        default = n.replace(".ema.", ".default.")
        assert not torch.equal(params[n], params[default])
    logs = {k for entry in trainer.state.log_history for k in entry}
    for key in ("awm/mse", "awm/ema_kl", "awm/ema_decay", "kl", "norm_guard/loss", "velocity_norm_ratio"):
        assert key in logs, key


def test_awm_config_errors(tmp_path):
    with pytest.raises(ValueError, match="timestep_sampler must be one of"):
        tiny_awm_config(tmp_path, timestep_sampler="grid_subset")
    with pytest.raises(ValueError, match="weighting must be one of"):
        tiny_awm_config(tmp_path, weighting="huber")
    with pytest.raises(ValueError, match="ghuber_power must be in"):
        tiny_awm_config(tmp_path, ghuber_power=0.0)
