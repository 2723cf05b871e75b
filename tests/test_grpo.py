"""GRPO's clipped loss and SLAS against hand values, and DanceGRPOTrainer end to end on the shapes world."""

import pytest
import torch
from helpers import MODEL, tiny_config, train_prompts
from peft import LoraConfig

from flow_trl import DanceGRPOConfig, DanceGRPOTrainer
from flow_trl.advantages import shape_advantages, slas_advantages
from flow_trl.toy import shapes_dataset
from flow_trl.trainer.grpo_trainer import grpo_clip_loss


GRPO = dict(learning_rate=1e-2, timestep_fraction=1.0)


def grpo_config(tmp_path, **overrides):
    return tiny_config(DanceGRPOConfig, tmp_path / "grpo", **{**GRPO, **overrides})


def test_clip_loss_matches_the_hand_formula_inside_and_outside_the_clip():
    eps = 0.2
    old = torch.zeros(4)
    log_ratio = torch.tensor([0.1, 0.5, -0.5, 0.5])  # ratios 1.105 (inside), 1.65, 0.61, 1.65 (outside)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    new = log_ratio.clone().requires_grad_(True)
    loss, metrics = grpo_clip_loss(new, old, advantages, eps)
    r = log_ratio.exp()
    # per sample max(-A r, -A clip(r)): A>0 takes the clipped value above 1+eps; A<0 takes -A r above 1+eps
    expected = torch.stack([-r[0], -torch.tensor(1 + eps), torch.tensor(1 - eps), r[3]]).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # clipped terms give no gradient; the others -A r / B
    torch.testing.assert_close(new.grad, torch.tensor([-r[0] / 4, 0.0, 0.0, r[3] / 4]))
    assert metrics["clip_frac"] == 0.75
    assert metrics["approx_kl"] == pytest.approx(0.5 * (log_ratio**2).mean().item())


def test_slas_shaping_on_the_hand_example():
    torch.testing.assert_close(shape_advantages(torch.tensor([-2.0, -0.5, 0.5, 2.0]), gamma=1.0),
                               torch.tensor([-4.0, -0.25, 0.25, 4.0]))
    torch.testing.assert_close(shape_advantages(torch.tensor([-2.0, 3.0]), gamma=0.0), torch.tensor([-2.0, 3.0]))


def test_slas_normalises_by_the_batch_std():
    rewards = torch.tensor([0.0, 1.0, 10.0, 14.0])
    delta = torch.tensor([-0.5, 0.5, -2.0, 2.0])  # r - group mean, groups of 2
    batch_std = rewards.std(unbiased=False)
    expected = torch.sign(delta) * (delta.abs() / (batch_std + 1e-4)) ** 1.5
    torch.testing.assert_close(slas_advantages(rewards, 2, gamma=0.5), expected)
    other = slas_advantages(rewards, 2, gamma=0.5, order="shape_then_normalize")
    shaped = torch.sign(delta) * delta.abs() ** 1.5
    torch.testing.assert_close(other, shaped / (shaped.std(unbiased=False) + 1e-4))


@pytest.mark.parametrize("sde_type", ["dance_sde", "flow_sde", "cps"])
def test_first_replay_has_ratio_one_and_never_trains_the_last_transition(tmp_path, sde_type):
    noise = {"dance_sde": 0.3, "flow_sde": 0.7, "cps": 0.5}[sde_type]
    args = grpo_config(tmp_path, sde_type=sde_type, noise_level=noise)
    trainer = DanceGRPOTrainer(MODEL, args=args, reward_funcs="shapes",
                               train_dataset=train_prompts(8), peft_config=LoraConfig(r=4))
    inputs = trainer._generate_and_score(list(shapes_dataset("train").select([0, 0, 1, 1])))
    assert inputs["step_indices"].max() < args.num_inference_steps - 1  # the transition to sigma 0 is not recorded
    assert inputs["train_steps"].shape == (4, args.num_inference_steps - 1)
    for chunk in range(trainer._num_loss_chunks(inputs)):
        trainer._compute_loss(trainer.model, inputs, chunk)
    ratios = trainer._metrics["train"]["ratio"]
    assert len(ratios) == 3 and all(abs(r - 1) < 1e-5 for r in ratios)
    assert all(c == 0 for c in trainer._metrics["train"]["clip_frac"])


def test_grpo_trains_with_slas_and_the_sde_mean_kl(tmp_path):
    args = grpo_config(tmp_path, max_steps=2, advantage_shaping="slas", beta=0.01, same_initial_noise=True)
    trainer = DanceGRPOTrainer(MODEL, args=args, reward_funcs="shapes",
                               train_dataset=train_prompts(8), peft_config=LoraConfig(r=4))
    noise = trainer._initial_noise(4, torch.Generator().manual_seed(0))
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[1], noise[2])  # one noise per group
    before = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if ".default." in n}
    trainer.train()
    params = dict(trainer.transformer.named_parameters())
    assert any(not torch.equal(before[n], params[n]) for n in before)
    logs = {k for entry in trainer.state.log_history for k in entry}
    assert {"ratio", "clip_frac", "approx_kl", "kl", "velocity_norm_ratio", "advantages/std"} <= logs


def test_grpo_config_errors(tmp_path):
    with pytest.raises(ValueError, match="timestep_fraction must be in"):
        grpo_config(tmp_path, timestep_fraction=1.5)
    with pytest.raises(ValueError, match="timestep_fraction must be in"):
        grpo_config(tmp_path, timestep_fraction=0.0)
    with pytest.raises(ValueError, match="noise_level \\(eta\\) must be positive"):
        grpo_config(tmp_path, noise_level=0.0)
    with pytest.raises(ValueError, match="num_generations must be at least 2"):
        grpo_config(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="not 'ode'"):
        grpo_config(tmp_path, sde_type="ode")
    with pytest.raises(ValueError, match=r"one of \('ode', 'flow_sde', 'dance_sde', 'cps'\); got 'flow'"):
        grpo_config(tmp_path, sde_type="flow")


def test_sde_mean_kl_matches_flow_grpo():
    from flow_trl.trainer.transitions import sde_mean_kl

    mean, ref = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    std_dev_t = torch.tensor([0.5, 0.8])  # Flow-GRPO's s_t; the step's std is s_t sqrt(-dt)
    dt = torch.tensor([-0.1, -0.2])
    std = (std_dev_t * (-dt).sqrt()).view(2, 1, 1, 1)
    expected = ((mean - ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)
    torch.testing.assert_close(sde_mean_kl(mean, ref, std, dt), expected)


def test_kl_targeted_slas_gamma():
    from flow_trl.advantages import adapt_slas_gamma

    assert adapt_slas_gamma(1.0, approx_kl=1e-6, target_kl=1e-4) == pytest.approx(1.1)  # moving too little: amplify
    assert adapt_slas_gamma(1.0, approx_kl=1e-3, target_kl=1e-4) == pytest.approx(1 / 1.1)  # too much: shrink
    assert adapt_slas_gamma(1.0, approx_kl=1e-4, target_kl=1e-4) == 1.0
    assert adapt_slas_gamma(0.0, approx_kl=0.0, target_kl=1e-4) == 0.05  # can leave 0
    assert adapt_slas_gamma(3.9, approx_kl=0.0, target_kl=1e-4) == 4.0  # clamped


def test_grpo_adapts_gamma_to_the_kl_target(tmp_path):
    args = grpo_config(tmp_path, max_steps=2, advantage_shaping="slas", slas_gamma=1.0, slas_target_kl=1.0)
    trainer = DanceGRPOTrainer(MODEL, args=args, reward_funcs="shapes",
                               train_dataset=train_prompts(8), peft_config=LoraConfig(r=4))
    trainer.train()
    assert trainer.slas_gamma == pytest.approx(1.1)  # one adaptation (before the second rollout), tiny KL
    assert trainer.args.slas_gamma == 1.0  # the config keeps what the user gave
    assert any("slas/gamma" in entry for entry in trainer.state.log_history)
    with pytest.raises(ValueError, match="needs advantage_shaping='slas'"):
        grpo_config(tmp_path, slas_target_kl=1e-3)


def test_resume_restores_the_adapted_slas_gamma(tmp_path):
    from transformers import TrainerCallback

    class StopAtTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    def run(out, stop=False, resume=None):
        args = tiny_config(DanceGRPOConfig, out, **GRPO, max_steps=4, save_strategy="steps", save_steps=2,
                           advantage_shaping="slas", slas_gamma=1.0, slas_target_kl=1.0)
        trainer = DanceGRPOTrainer(MODEL, args=args, reward_funcs="shapes", peft_config=LoraConfig(r=4),
                                   train_dataset=train_prompts(8),
                                   callbacks=[StopAtTwo()] if stop else None)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.slas_gamma, {n: p.detach().clone() for n, p in trainer.transformer.named_parameters()
                                    if "lora_" in n}

    full_gamma, full = run(tmp_path / "full")
    run(tmp_path / "part", stop=True)
    resumed_gamma, resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    assert full_gamma == pytest.approx(1.1**3)  # adapted before rollouts 2, 3 and 4 (tiny KL: amplify)
    assert resumed_gamma == pytest.approx(full_gamma)  # not restarted from the config's 1.0
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0, msg=name)


def test_timestep_fraction_counts_the_sampling_steps_as_flow_grpo(tmp_path):
    """0.99 of 4 sampling steps trains the 3 recorded transitions (all but the final one), 0.5 trains 2 of them."""
    trainer = DanceGRPOTrainer(MODEL, args=grpo_config(tmp_path), reward_funcs="shapes",
                               train_dataset=train_prompts(8), peft_config=LoraConfig(r=4))
    inputs = {"log_probs": torch.zeros(4, 3)}
    for fraction, expected in [(0.99, 3), (0.5, 2), (0.1, 1)]:
        trainer.args.timestep_fraction = fraction
        steps = trainer._prepare_training_inputs(inputs, torch.Generator().manual_seed(0))["train_steps"]
        assert steps.shape == (4, expected)
        assert all(len(set(row.tolist())) == expected for row in steps)  # distinct transitions per sample


def test_sde_window_rollouts_are_stochastic_only_inside_the_window(tmp_path):
    """Flow-GRPO-Fast: with `sde_window_size=2` in `[1, 4)` of 6 steps, each rollout's window is two consecutive
    steps starting at 1 or 2 (both drawn), the rollout records exactly those transitions, and training picks among
    them. (`sampling.rollout` itself is tested to be ODE outside `sde_steps`.)"""
    args = grpo_config(tmp_path, num_inference_steps=6, sde_window_size=2, sde_window_range=[1, 4],
                       timestep_fraction=0.99)
    trainer = DanceGRPOTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=train_prompts(8),
                               peft_config=LoraConfig(r=4))
    starts = set()
    for seed in range(8):
        steps = trainer._rollout_sde_steps(torch.Generator().manual_seed(seed))
        assert len(steps) == 2 and steps[1] == steps[0] + 1 and 1 <= steps[0] <= 2
        starts.add(steps[0])
    assert starts == {1, 2}

    rows = [{"prompt": p} for p in train_prompts(2)["prompt"] for _ in range(2)]
    trainer._rollout_sde_steps = lambda generator: [2, 3]
    inputs = trainer._generate_and_score(rows)
    assert inputs["step_indices"][0].tolist() == [2, 3]
    assert inputs["log_probs"].shape == (4, 2) and inputs["train_steps"].shape == (4, 2)


@pytest.mark.parametrize("bad, match", [
    (dict(sde_window_size=3, sde_window_range=[0, 2]), "must fit"),
    (dict(sde_window_size=2, sde_window_range=[2, 4]), "must fit"),  # end 4 reaches the last step of 4
    (dict(sde_window_range=[0, 2]), "needs sde_window_size"),
    (dict(sde_window_size=0), "sde_window_size"),
])
def test_sde_window_config_errors(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(DanceGRPOConfig, tmp_path, **bad)
