"""The base trainer and FlowNFTTrainer end to end on the shapes world (CPU, offline, seconds each)."""

import pytest
import torch
from datasets import Dataset
from helpers import MODEL, redness, tiny_config, tiny_lora, train_prompts
from peft import LoraConfig
from transformers import TrainerCallback

from flow_trl import FlowNFTConfig, FlowNFTTrainer
from flow_trl.sampling import STEP_TYPES, step
from flow_trl.toy import load_shapes_pipeline, shapes_dataset
from flow_trl.trainer.rollout_buffer import RepeatSampler


NFT = dict(max_steps=2, learning_rate=1e-2)


def nft_config(tmp_path, **overrides):
    return tiny_config(FlowNFTConfig, tmp_path / "out", **{**NFT, **overrides})


def test_nft_trains_the_lora_and_nothing_else(tmp_path):
    trainer = FlowNFTTrainer(MODEL, args=nft_config(tmp_path), reward_funcs=[redness, "shapes"],
                             train_dataset=train_prompts(16), peft_config=tiny_lora())
    before = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters()}
    trainer.train()
    after = dict(trainer.transformer.named_parameters())
    # the last block's context stream is discarded (SD3's context_pre_only), so its add_q_proj LoRA gets no gradient
    dead = f"transformer_blocks.{len(trainer.transformer.transformer_blocks) - 1}.attn.add_q_proj.lora_B"
    trained = [n for n in before if ".default." in n and not n.startswith(dead)]
    assert trained and all(not torch.equal(before[n], after[n]) for n in trained), "a LoRA weight did not change"
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith(dead))
    frozen = [n for n in before if "lora_" not in n]
    assert all(torch.equal(before[n], after[n]) for n in frozen), "a base weight changed"
    # the old policy followed the trained one once (decay 0.001 * 1 at the second rollout), not by gradient
    old = [n for n in before if ".old." in n and not n.startswith(dead)]
    assert all(not torch.equal(before[n], after[n]) for n in old)
    logs = {k for entry in trainer.state.log_history for k in entry}
    for key in ("loss", "reward", "rewards/shapes/mean", "advantages/std", "velocity_norm_ratio", "nft/positive_loss"):
        assert key in logs, key


def test_lora_targets_default_to_the_family_attention_projections(tmp_path):
    trainer = FlowNFTTrainer(MODEL, args=nft_config(tmp_path), reward_funcs="shapes", train_dataset=train_prompts(16),
                             peft_config=LoraConfig(r=4))
    names = [n for n, _ in trainer.transformer.named_parameters() if ".default." in n]
    assert any("add_q_proj" in n for n in names) and any("attn.to_q" in n for n in names)
    assert not any("ff." in n for n in names)
    last = len(trainer.transformer.transformer_blocks) - 1  # context_pre_only: its text queries are never used
    assert not any(f"transformer_blocks.{last}.attn.add_q_proj" in n for n in names)
    assert any(f"transformer_blocks.{last}.attn.add_k_proj" in n for n in names)


def test_every_default_lora_weight_gets_a_gradient(tmp_path):
    trainer = FlowNFTTrainer(MODEL, args=nft_config(tmp_path, max_steps=1), reward_funcs=redness,
                             train_dataset=train_prompts(16), peft_config=LoraConfig(r=4))
    trainer.train()
    lora_b = {n: p for n, p in trainer.transformer.named_parameters() if ".default." in n and "lora_B" in n}
    dead = [n for n, p in lora_b.items() if torch.count_nonzero(p) == 0]  # B starts at 0: one step moves it
    assert lora_b and not dead, dead


def test_saved_lora_loads_in_diffusers_and_reproduces_samples(tmp_path):
    trainer = FlowNFTTrainer(MODEL, args=nft_config(tmp_path), reward_funcs="shapes", train_dataset=train_prompts(16),
                             peft_config=tiny_lora())
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()

    kwargs = dict(num_inference_steps=4, guidance_scale=1.0, max_sequence_length=16, output_type="pt")
    expected = trainer.pipe("a photo of a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    fresh = load_shapes_pipeline()
    base = fresh("a photo of a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    fresh.load_lora_weights(str(tmp_path / "adapter"))
    assert sum("lora_" in n for n, _ in fresh.transformer.named_parameters()) > 0, "no LoRA layer was loaded"
    loaded = fresh("a photo of a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (loaded - base).abs().max() > 1e-3  # the LoRA changes the output ...
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=0)  # ... exactly as in the trainer


class StopAt(TrainerCallback):
    """Interrupt training after `step` optimizer steps (the checkpoint of that step is written first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("mode", ["lora", "full_linear"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, mode):
    options = dict(full_finetune_params="linear", lora_export_rank=128, learning_rate=1e-3) if mode != "lora" else {}

    def run(out, stop_at=None, resume=None):
        args = nft_config(tmp_path, output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=2, **options)
        trainer = FlowNFTTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=train_prompts(16),
                                 peft_config=None if options else tiny_lora(),
                                 callbacks=[StopAt(stop_at)] if stop_at else None)
        trainer.train(resume_from_checkpoint=resume)
        if not options:
            return {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if "lora_" in n}
        trained = {f"default.{n}": p.detach().clone() for n, p in trainer.transformer.named_parameters()}
        return {**trained, **trainer.policies.state_dict()}  # the old policy as "old.<name>"

    full = run(tmp_path / "full")
    interrupted = run(tmp_path / "part", stop_at=2)
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    assert full.keys() == resumed.keys()
    assert any(not torch.equal(interrupted[n], full[n]) for n in full)  # steps 3-4 did change the weights
    for name in full:  # the trained weights and NFT's old policy alike
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("step_type", [t for t in STEP_TYPES if t != "ode"])
def test_rollout_and_training_share_one_velocity_function_ratio_is_one(tmp_path, step_type):
    trainer = FlowNFTTrainer(MODEL, args=nft_config(tmp_path, guidance_scale=3.0), reward_funcs="shapes",
                             train_dataset=train_prompts(16), peft_config=tiny_lora())
    batch = ["a photo of a red circle", "a photo of two squares"]
    cond, chunks = trainer.sample(batch, torch.Generator().manual_seed(0), step_type=step_type)
    out = chunks[0]
    assert out.log_probs.shape == (2, len(out.step_indices)) and len(out.step_indices) == 3
    for k, j in enumerate(out.step_indices):
        sigma = trainer.sigmas[j].expand(2)
        with torch.no_grad():
            v = trainer.velocity(trainer.model, out.latents_before[:, k], sigma, cond)
        replay = step(step_type, out.latents_before[:, k], v, trainer.sigmas[j], trainer.sigmas[j + 1],
                      trainer.args.noise_level, sigma_max=float(trainer.sigmas[1]),
                      prev_sample=out.latents_after[:, k])
        ratio = torch.exp(replay.log_prob - out.log_probs[:, k])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_norm_guard_is_applied_and_logged(tmp_path):
    args = nft_config(tmp_path, norm_guard_coef=1.0, max_steps=1)
    trainer = FlowNFTTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=train_prompts(16),
                             peft_config=tiny_lora())
    trainer.train()
    logs = {k for entry in trainer.state.log_history for k in entry}
    assert {"norm_guard/loss", "norm_guard/active_frac", "velocity_norm_ratio"} <= logs


def test_full_fine_tuning_trains_every_transformer_weight(tmp_path):
    trainer = FlowNFTTrainer(MODEL, args=nft_config(tmp_path, max_steps=1, learning_rate=1e-3),
                             reward_funcs=redness, train_dataset=train_prompts(16))
    before = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.transformer.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) > 0.9 * len(before)
    trainer.save_model(str(tmp_path / "full"))
    assert (tmp_path / "full" / "transformer" / "config.json").is_file()


def test_linear_full_fine_tuning_trains_only_linear_weights_and_exports_an_exact_lora(tmp_path):
    args = nft_config(tmp_path, max_steps=1, learning_rate=1e-3, full_finetune_params="linear", lora_export_rank=128)
    trainer = FlowNFTTrainer(MODEL, args=args, reward_funcs=redness, train_dataset=train_prompts(16))
    linear = {f"{n}.weight" for n, m in trainer.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n, p in trainer.transformer.named_parameters() if p.requires_grad} == linear
    before = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.transformer.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= linear  # biases, norms and the patch embedding stay the base model's
    assert len(changed) > 0.8 * len(linear)
    trainer.save_model(str(tmp_path / "full"))
    assert (tmp_path / "full" / "transformer" / "config.json").is_file()

    kwargs = dict(num_inference_steps=4, guidance_scale=1.0, max_sequence_length=16, output_type="pt")
    expected = trainer.pipe("a photo of a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    fresh = load_shapes_pipeline()
    base = fresh("a photo of a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    fresh.load_lora_weights(str(tmp_path / "full"))
    loaded = fresh("a photo of a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (loaded - base).abs().max() > 1e-3  # the exported LoRA changes the output ...
    torch.testing.assert_close(loaded, expected, atol=1e-4, rtol=0)  # ... as the fine-tuned transformer does
    card = (tmp_path / "out" / "README.md")
    trainer.create_model_card()
    assert "load_lora_weights" in card.read_text()


def test_full_fine_tuning_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="full_finetune_params must be one of"):
        nft_config(tmp_path, full_finetune_params="attention")
    with pytest.raises(ValueError, match="full_finetune_params='linear'"):
        nft_config(tmp_path, lora_export_rank=8)
    with pytest.raises(ValueError, match="apply to full fine-tuning"):
        FlowNFTTrainer(MODEL, args=nft_config(tmp_path, full_finetune_params="linear"), reward_funcs="shapes",
                       train_dataset=train_prompts(16), peft_config=tiny_lora())


def test_evaluate_scores_held_out_prompts_with_fixed_seeds(tmp_path):
    args = nft_config(tmp_path, num_images_to_log=4, per_device_eval_batch_size=4)
    trainer = FlowNFTTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=train_prompts(16),
                             eval_dataset=shapes_dataset("test").select(range(6)), peft_config=tiny_lora())
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second
    assert 0.0 <= first["eval_rewards/shapes/mean"] <= 1.0
    assert first["eval_reward"] == first["eval_rewards/shapes/mean"]
    assert list((tmp_path / "out" / "samples").glob("*.png"))


def test_evaluate_at_several_step_counts(tmp_path):
    args = nft_config(tmp_path, num_images_to_log=0, eval_num_inference_steps=[4, 2])
    trainer = FlowNFTTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=train_prompts(16),
                             eval_dataset=shapes_dataset("test").select(range(6)), peft_config=tiny_lora())
    metrics = trainer.evaluate()
    assert metrics["eval_reward@4"] == metrics["eval_reward"]  # 4 is the training step count: same samples
    assert "eval_reward@2" in metrics and "eval_rewards/shapes/mean@2" in metrics


def test_repeat_sampler_keeps_groups_together():
    sampler = RepeatSampler(num_rows=6, num_generations=3, prompts_per_generation=2, repeat_count=2, seed=0)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 6 * 3 * 2
    for start in range(0, len(indices), 12):  # one rollout (2 prompts x 3) served twice
        rollout = indices[start : start + 6]
        assert rollout == indices[start + 6 : start + 12]
        assert rollout[:3] == [rollout[0]] * 3 and rollout[3:] == [rollout[3]] * 3
    sampler.set_epoch(1)
    assert list(sampler) != indices


# ---- clear errors --------------------------------------------------------------------------------------------


def test_dataset_without_prompt_column(tmp_path):
    with pytest.raises(ValueError, match="needs a 'prompt' column"):
        FlowNFTTrainer(MODEL, args=nft_config(tmp_path), reward_funcs="shapes",
                       train_dataset=Dataset.from_dict({"text": ["a photo of a circle"]}))


def test_batch_not_divisible_by_num_generations(tmp_path):
    with pytest.raises(ValueError, match="must be divisible by num_generations"):
        nft_config(tmp_path, per_device_train_batch_size=3, num_generations=2)


def test_unknown_reward_name(tmp_path):
    with pytest.raises(ValueError, match="Unknown reward 'pickscroe'"):
        FlowNFTTrainer(MODEL, args=nft_config(tmp_path), reward_funcs=["pickscroe"], train_dataset=train_prompts(16))


def test_unsupported_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    class MyPipeline(DiffusionPipeline):
        pass

    with pytest.raises(ValueError, match="MyPipeline is not supported.*StableDiffusion3Pipeline"):
        FlowNFTTrainer(MyPipeline(), args=nft_config(tmp_path), reward_funcs="shapes", train_dataset=train_prompts(16))


def test_trl_style_positional_reward_is_refused(tmp_path):
    def reward(prompts, images, **kwargs):
        return [0.0] * len(prompts)

    with pytest.raises(TypeError, match="pass reward functions by keyword"):
        FlowNFTTrainer(MODEL, reward, train_dataset=train_prompts(16))


def test_wrong_length_reward(tmp_path):
    def bad(prompts, images, **kwargs):
        return [1.0]

    trainer = FlowNFTTrainer(MODEL, args=nft_config(tmp_path), reward_funcs=bad, train_dataset=train_prompts(16),
                             peft_config=tiny_lora())
    with pytest.raises(ValueError, match="'bad' returned 1 values for 4 images"):
        trainer.train()


def test_gradient_checkpointing_goes_through_the_diffusers_api(tmp_path):
    args = nft_config(tmp_path, gradient_checkpointing=True, max_steps=1)
    trainer = FlowNFTTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=train_prompts(16),
                             peft_config=tiny_lora())
    assert trainer.transformer.gradient_checkpointing
    assert not trainer.args.gradient_checkpointing and not trainer.args.activation_checkpointing  # not Trainer's
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.state.log_history[0]["loss"] > 0
