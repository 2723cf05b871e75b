"""Diffusion-NFT: the pure loss against a hand-written formula, its gradient direction, and its schedules."""

import pytest
import torch
from peft import LoraConfig

from flow_trl import FlowNFTConfig, FlowNFTTrainer
from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_dataset
from flow_trl.trainer.nft_trainer import advantage_to_r, nft_loss
from flow_trl.trainer.utils import soft_update_decay


def _hand_nft(v, v_old, x_t, x0, sigma, r, b, scale):
    total = 0.0
    for i in range(v.shape[0]):
        s = float(sigma[i])
        xp = x_t[i] - s * (b * v[i] + (1 - b) * v_old[i])
        xn = x_t[i] - s * ((1 + b) * v_old[i] - b * v[i])
        wp = max(float((xp - x0[i]).abs().mean()), 1e-5)
        wn = max(float((xn - x0[i]).abs().mean()), 1e-5)
        lp = float(((xp - x0[i]) ** 2).mean()) / wp
        ln = float(((xn - x0[i]) ** 2).mean()) / wn
        total += (float(r[i]) * lp + (1 - float(r[i])) * ln) / b
    return scale * total / v.shape[0]


@pytest.mark.parametrize("strength", [1.0, 0.1])
def test_nft_loss_matches_the_hand_formula(strength):
    g = torch.Generator().manual_seed(0)
    v, v_old, x_t, x0 = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(4))
    sigma, r = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([1.0, 0.5, 0.0])
    loss, metrics = nft_loss(v, v_old, x_t, x0, sigma, r, strength, loss_scale=5.0)
    assert loss.item() == pytest.approx(_hand_nft(v, v_old, x_t, x0, sigma, r, strength, 5.0), rel=1e-5)
    assert metrics["nft/positive_loss"] > 0 and metrics["nft/negative_loss"] > 0


def _x0_error_after_a_step(r_value):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    sigma = torch.full((4,), 0.6)
    x_t = 0.4 * x0 + 0.6 * noise
    v = (noise - x0 + 0.5 * torch.randn(4, 2, 4, 4, generator=g)).requires_grad_(True)  # an imperfect policy
    v_old = v.detach().clone()
    loss, _ = nft_loss(v, v_old, x_t, x0, sigma, torch.full((4,), r_value), strength=1.0)
    loss.backward()
    before = (x_t - 0.6 * v - x0).pow(2).mean().item()
    after = (x_t - 0.6 * (v - 0.05 * v.grad) - x0).pow(2).mean().item()
    return before, after, v.grad


def test_gradient_pulls_toward_x0_for_r1_and_away_for_r0():
    before, after, _ = _x0_error_after_a_step(1.0)
    assert after < before  # positive sample: the x0-prediction moves toward the clean image
    before, after, _ = _x0_error_after_a_step(0.0)
    assert after > before  # negative sample: it moves away
    _, _, grad = _x0_error_after_a_step(0.5)
    assert grad.abs().max() < 1e-6  # r = 0.5 with v = v_old: the two terms cancel (no signal)


def test_old_policy_gets_no_gradient():
    v = torch.randn(2, 3, requires_grad=True)
    v_old = torch.randn(2, 3, requires_grad=True)
    loss, _ = nft_loss(v, v_old, torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0.5, 0.5]),
                       torch.tensor([1.0, 0.0]), 1.0)
    loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert v_old.grad is None


def test_advantage_to_r():
    r = advantage_to_r(torch.tensor([-7.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0]), 5.0)
    assert r.tolist() == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_soft_update_schedules():
    assert soft_update_decay(100, "none") == 0.0
    assert soft_update_decay(100, "linear") == pytest.approx(0.1)
    assert soft_update_decay(10_000, "linear") == 0.5
    assert soft_update_decay(10_000, "linear", max_decay=0.3) == 0.3  # AWM's EMA adapter
    assert soft_update_decay(74, "delayed") == 0.0
    assert soft_update_decay(175, "delayed") == pytest.approx(0.75)
    assert soft_update_decay(10_000, "delayed") == 0.999
    with pytest.raises(ValueError, match="Unknown soft-update schedule"):
        soft_update_decay(1, "cosine")


def test_rollout_guidance_scale_guides_rollouts_only(tmp_path):
    args = FlowNFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                         num_inference_steps=4, max_steps=1, save_strategy="no", report_to="none",
                         rollout_guidance_scale=3.0)
    trainer = FlowNFTTrainer(str(SHAPES_PIPELINE_DIR), args=args, reward_funcs="shapes",
                             train_dataset=shapes_dataset("train").select(range(8)), peft_config=LoraConfig(r=4))
    scales = []
    velocity = trainer.adapter.velocity

    def recording(transformer, latents, sigma, cond, guidance_scale=1.0, negative_cond=None):
        scales.append(guidance_scale)
        return velocity(transformer, latents, sigma, cond, guidance_scale, negative_cond)

    trainer.adapter.velocity = recording
    rows = [row for row in shapes_dataset("train").select(range(2)) for _ in range(2)]
    inputs = trainer._generate_and_score(rows)
    assert scales == [3.0] * 4  # every rollout step is guided
    prompts = [row["prompt"] for row in rows]
    # the same draws as the rollout (the rollout generator of step 0), sampled with CFG 3 and without
    guided = trainer.sample(prompts, trainer._rollout_generator(), "old", guidance_scale=3.0)[1][0].latents
    plain = trainer.sample(prompts, trainer._rollout_generator(), "old")[1][0].latents
    torch.testing.assert_close(inputs["latents"], guided)
    assert not torch.allclose(inputs["latents"], plain, atol=1e-3)
    scales.clear()
    trainer._compute_loss(trainer.model, inputs, chunk=0)
    assert scales and set(scales) == {1.0}  # the loss uses the CFG-free velocities, as does evaluation


def test_rollout_guidance_scale_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="rollout_guidance_scale must be positive"):
        FlowNFTConfig(output_dir=str(tmp_path), rollout_guidance_scale=0.0)
