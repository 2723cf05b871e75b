"""Diffusion-DPO's loss against the hand formula, and FlowDPOTrainer online and offline on the shapes world."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import MODEL, tiny_config, tiny_lora, train_prompts

from flow_trl import FlowDPOConfig, FlowDPOTrainer
from flow_trl.preference import encode_preference_dataset
from flow_trl.toy import shapes_preference_dataset
from flow_trl.trainer.base_trainer import format_training_summary
from flow_trl.trainer.dpo_trainer import diffusion_dpo_loss


DPO = dict(num_train_timesteps=2, max_steps=2, learning_rate=1e-2)


def dpo_config(tmp_path, **overrides):
    return tiny_config(FlowDPOConfig, tmp_path / "dpo", **{**DPO, **overrides})


def test_dpo_loss_matches_the_hand_formula():
    mse_w = torch.tensor([0.30, 0.50, 0.20], requires_grad=True)
    mse_l = torch.tensor([0.40, 0.45, 0.20], requires_grad=True)
    ref_w, ref_l = torch.tensor([0.35, 0.50, 0.25]), torch.tensor([0.35, 0.50, 0.10])
    beta = 100.0
    loss, metrics = diffusion_dpo_loss(mse_w, mse_l, ref_w, ref_l, beta)
    inside = [-0.5 * beta * ((w - rw) - (lo - rl)) for w, lo, rw, rl in
              zip([0.30, 0.50, 0.20], [0.40, 0.45, 0.20], [0.35, 0.50, 0.25], [0.35, 0.50, 0.10])]
    expected = sum(math.log1p(math.exp(-x)) for x in inside) / 3  # -log sigmoid(x)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(sum(inside) / 3, rel=1e-5)
    assert metrics["rewards/accuracies"] == pytest.approx(sum(x > 0 for x in inside) / 3)
    assert metrics["rewards/chosen"] == pytest.approx(-0.5 * beta * (-0.05 + 0.0 - 0.05) / 3, rel=1e-4)
    loss.backward()
    assert (mse_w.grad > 0).all() and (mse_l.grad < 0).all()  # lower the winner's error, raise the loser's


def test_dpo_loss_ignores_invalid_pairs():
    args = [torch.tensor([0.1, 5.0]), torch.tensor([0.2, -5.0]), torch.zeros(2), torch.zeros(2)]
    masked, _ = diffusion_dpo_loss(*args, beta=10.0, valid=torch.tensor([True, False]))
    alone, _ = diffusion_dpo_loss(*[a[:1] for a in args], beta=10.0)
    torch.testing.assert_close(masked, alone)


def test_identical_winner_and_loser_give_log2_and_zero_gradient(tmp_path):
    """Through the trainer's own loss: only a shared sigma and shared noise make the two MSEs equal."""
    trainer = FlowDPOTrainer(MODEL, args=dpo_config(tmp_path), reward_funcs="shapes",
                             train_dataset=train_prompts(8), peft_config=tiny_lora())
    trainer.transformer.double()  # fp64: batch rows of equal inputs give equal outputs to the last fp32 bit
    with torch.no_grad():  # move the policy away from the reference so that the MSEs differ from it
        for name, param in trainer.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pairs = torch.stack([latents, latents], dim=1)
    cond = trainer.encode_prompts(["a photo of a circle", "a photo of two squares", "an image of a red square"])
    inputs = trainer._pair_inputs(cond, pairs, torch.ones(3, dtype=torch.bool), torch.Generator().manual_seed(1))
    assert inputs["train_sigmas"].shape == (3, 2) and inputs["train_noise"].shape == (3, 2, 4, 8, 8)
    loss = trainer._compute_loss(trainer.model, inputs, chunk=0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    grads = [p.grad for n, p in trainer.transformer.named_parameters() if p.requires_grad]
    assert grads and all(g is None or g.abs().max() < 1e-9 for g in grads)


def _held_out_accuracy(trainer, pairs):
    """Implicit accuracy (chosen's implicit reward above rejected's) on encoded pairs, at fresh sigmas and noise."""
    inputs = trainer._generate_and_score(list(pairs))
    accuracies = []
    with torch.no_grad():
        for chunk in range(trainer._num_loss_chunks(inputs)):
            trainer._compute_loss(trainer.model, inputs, chunk)
            accuracies.append(trainer._metrics["train"]["rewards/accuracies"][-1])
    return sum(accuracies) / len(accuracies)


def test_offline_dpo_raises_held_out_implicit_accuracy(tmp_path):
    args = dpo_config(tmp_path, max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3, num_train_timesteps=4)
    trainer = FlowDPOTrainer(MODEL, args=args, train_dataset=shapes_preference_dataset("train", num_pairs=64),
                             peft_config=tiny_lora(r=8, lora_alpha=16))
    assert trainer.offline and trainer.reward_funcs == []
    assert {"prompt", "chosen_latents", "rejected_latents"} <= set(trainer.train_dataset.column_names)
    held_out = encode_preference_dataset(shapes_preference_dataset("test", num_pairs=32, seed=100),
                                         trainer.adapter.encode_images, trainer.resolution)
    assert _held_out_accuracy(trainer, held_out) == 0.0  # policy == reference: every margin is exactly 0
    trainer.train()
    assert _held_out_accuracy(trainer, held_out) > 0.6
    logs = {k for entry in trainer.state.log_history for k in entry}
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= logs
    summary = trainer.training_summary()  # no image is generated offline: the summary counts pairs
    assert summary["pairs_seen"] == 12 * 8  # 12 steps of 8 pairs
    assert "images_generated" not in summary and "96 preference pairs seen" in format_training_summary(summary)


def test_online_dpo_pairs_best_and_worst_and_refreshes_its_reference(tmp_path):
    args = dpo_config(tmp_path, num_generations=2, ref_update_steps=1, rollout_policy="reference", norm_guard_coef=1.0)
    trainer = FlowDPOTrainer(MODEL, args=args, reward_funcs="shapes",
                             train_dataset=train_prompts(16), peft_config=tiny_lora())
    assert not trainer.offline and trainer._sampling_policy == "dpo_ref"
    params = dict(trainer.transformer.named_parameters())
    ref_before = {n: p.detach().clone() for n, p in params.items() if ".dpo_ref." in n}
    trainer.train()
    # the reference followed the policy at step 1 (before the second rollout), not by gradient
    moved = [n for n in ref_before if not torch.equal(ref_before[n], params[n])]
    assert moved and all(params[n].grad is None for n in moved)
    logs = {k for entry in trainer.state.log_history for k in entry}
    assert {"rewards/accuracies", "dpo/valid_pair_frac", "rewards/shapes/mean", "velocity_norm_ratio",
            "norm_guard/loss"} <= logs


def test_online_pairs_come_from_groups(tmp_path):
    trainer = FlowDPOTrainer(MODEL, args=dpo_config(tmp_path, num_generations=4), reward_funcs="shapes",
                             train_dataset=train_prompts(8), peft_config=tiny_lora())
    latents = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 4, 8, 8)
    cond = trainer.encode_prompts(["a photo of a circle"] * 4 + ["a photo of a square"] * 4)
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.0, 0.3, 0.3, 0.3, 0.3])
    inputs = trainer._prepare_training_inputs({"latents": latents, "cond": cond, "rewards": rewards},
                                              torch.Generator().manual_seed(0))
    assert inputs["latents"].shape == (2, 2, 4, 8, 8)
    assert inputs["latents"][0, 0, 0, 0, 0] == 1 and inputs["latents"][0, 1, 0, 0, 0] == 3  # best 0.9, worst 0.0
    assert inputs["valid"].tolist() == [True, False]  # all-equal group: no preference


def test_online_pairs_per_group_match_ranks(tmp_path):
    trainer = FlowDPOTrainer(MODEL, args=dpo_config(tmp_path, num_generations=4, pairs_per_group=2),
                             reward_funcs="shapes", train_dataset=train_prompts(8), peft_config=tiny_lora())
    latents = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 4, 8, 8)
    cond = trainer.encode_prompts(["a photo of a circle"] * 4 + ["a photo of a square"] * 4)
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.0, 0.3, 0.3, 0.3, 0.3])
    inputs = trainer._prepare_training_inputs({"latents": latents, "cond": cond, "rewards": rewards},
                                              torch.Generator().manual_seed(0))
    # group 1: (0.9 vs 0.0), then (0.5 vs 0.1); group 2 is all ties
    assert inputs["latents"][:, :, 0, 0, 0].tolist() == [[1, 3], [2, 0], [4, 4], [5, 5]]
    assert inputs["valid"].tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="pairs_per_group \\(3\\) must be between 1 and num_generations // 2 \\(2\\)"):
        dpo_config(tmp_path, num_generations=4, pairs_per_group=3)
    with pytest.raises(ValueError, match="pairs_per_group must be at least 1; got 0"):
        dpo_config(tmp_path, pairs_per_group=0)
    with pytest.raises(ValueError, match="pairs_per_group applies to online DPO"):
        FlowDPOTrainer(MODEL, args=dpo_config(tmp_path, pairs_per_group=2, num_generations=None),
                       train_dataset=shapes_preference_dataset("train").select(range(4)))


def test_online_dpo_needs_groups_of_two(tmp_path):
    with pytest.raises(ValueError, match="num_generations must be at least 2"):
        FlowDPOTrainer(MODEL, args=dpo_config(tmp_path, num_generations=1), reward_funcs="shapes",
                       train_dataset=train_prompts(8))
    with pytest.raises(ValueError, match="per_device_train_batch_size \\(4\\) must be divisible by num_generations"):
        dpo_config(tmp_path, num_generations=8, gradient_accumulation_steps=2)


def test_offline_dataset_errors(tmp_path):
    good = shapes_preference_dataset("train", num_pairs=2)
    with pytest.raises(ValueError, match="lacks \\['rejected'\\]"):
        FlowDPOTrainer(MODEL, args=dpo_config(tmp_path), train_dataset=good.remove_columns("rejected"))
    broken = Dataset.from_dict({"prompt": ["a photo of a circle"], "chosen": ["/no/such/image.png"],
                                "rejected": ["/no/such/other.png"]})
    with pytest.raises(ValueError, match="Row 0 of the preference dataset: cannot read its 'chosen' image"):
        FlowDPOTrainer(MODEL, args=dpo_config(tmp_path), train_dataset=broken)
    with pytest.raises(ValueError, match="reward_funcs"):
        FlowDPOTrainer(MODEL, args=dpo_config(tmp_path), train_dataset=train_prompts(8))


def test_best_worst_pairs_keeps_each_groups_extremes():
    """Groups of 3: the best and worst image of each become a pair; a tie, a group within `min_margin` and NaN
    rewards give no pair or are skipped."""
    from flow_trl.preference import best_worst_pairs

    images = torch.arange(9, dtype=torch.float32).div(10).view(9, 1, 1, 1).expand(9, 3, 2, 2)  # image i is i/10 grey
    prompts = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.3, float("nan"), 0.2, 0.6])
    pairs = best_worst_pairs(prompts, images, rewards, num_generations=3)
    assert pairs["prompt"] == ["a", "c"]  # "b" ties
    chosen = [int(np.asarray(c)[0, 0, 0]) for c in pairs["chosen"]]
    rejected = [int(np.asarray(r)[0, 0, 0]) for r in pairs["rejected"]]
    assert chosen == [round(0.1 * 255), round(0.8 * 255)] and rejected == [0, round(0.7 * 255)]  # NaN never chosen
    assert pairs["chosen_reward"] == pytest.approx([0.9, 0.6])
    assert pairs["rejected_reward"] == pytest.approx([0.1, 0.2])
    assert best_worst_pairs(prompts, images, rewards, 3, min_margin=0.5)["prompt"] == ["a"]  # 0.4 <= 0.5
    with pytest.raises(ValueError, match="whole groups"):
        best_worst_pairs(prompts[:8], images[:8], rewards[:8], num_generations=3)
