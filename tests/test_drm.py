"""DRM: the model built from the generator, its losses against hand values, shared pair noise, save/load, reward
wrapper and step-wise sampling."""

import math
from statistics import NormalDist

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from flow_trl import DiffusionRewardModel, DRMConfig, DRMTrainer
from flow_trl.drm import DRMReward, stepwise_sample
from flow_trl.models import get_adapter
from flow_trl.trainer.drm_trainer import bradley_terry_loss, thurstone_loss


PROMPTS = [
    "a photo of a red circle",
    "a photo of a blue square",
    "a photo of a green triangle",
    "a photo of a red square",
]


def latent_pairs(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = {
        "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n)],
        "chosen_latents": torch.randn(n, 4, 16, 16, generator=g).numpy(),
        "rejected_latents": torch.randn(n, 4, 16, 16, generator=g).numpy(),
    }
    ds = Dataset.from_dict(rows)
    ds.set_format("torch", columns=["chosen_latents", "rejected_latents"], output_all_columns=True)
    return ds


def drm_config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "drm"),
        num_blocks=1,
        head_dim=16,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        eval_sigmas=[0.0, 0.5, 1.0],
    )
    kwargs.update(overrides)
    return DRMConfig(**kwargs)


def test_bradley_terry_and_thurstone_losses_match_hand_values():
    s_w, s_l, sigma = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5])
    expected_bt = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert bradley_terry_loss(s_w, s_l).item() == pytest.approx(expected_bt, rel=1e-6)
    # Thurstone: var = 2 sigma^2 + 0.05 -> [0.05, 0.55]; p = Phi(d / sqrt(2 var)); loss = mean(1 - sqrt(p + 1e-6))
    p = [NormalDist().cdf(1.0 / math.sqrt(0.1)), NormalDist().cdf(-1.0 / math.sqrt(1.1))]
    expected_th = sum(1 - math.sqrt(q + 1e-6) for q in p) / 2
    assert thurstone_loss(s_w, s_l, sigma, 0.05).item() == pytest.approx(expected_th, rel=1e-5)
    # both push the chosen score up and the rejected one down
    for loss_fn in (bradley_terry_loss, lambda a, b: thurstone_loss(a, b, sigma)):
        w, lo = s_w.clone().requires_grad_(True), s_l.clone().requires_grad_(True)
        loss_fn(w, lo).backward()
        assert (w.grad < 0).all() and (lo.grad > 0).all()
    # the same score gap counts less at high noise (Thurstone's noise calibration)
    gap = torch.tensor([1.0])
    assert thurstone_loss(gap, torch.zeros(1), torch.tensor([0.9])) > thurstone_loss(
        gap, torch.zeros(1), torch.tensor([0.0])
    )


@pytest.mark.parametrize("num_blocks", [2, 4])  # 4: the generator's full depth, ending in its context_pre_only block
def test_drm_is_built_from_the_first_blocks_of_the_generator(tmp_path, shapes_pipe, num_blocks):
    transformer = shapes_pipe.transformer
    drm = DiffusionRewardModel.from_transformer(transformer, num_blocks=num_blocks, head_dim=8)
    assert len(drm.transformer_blocks) == num_blocks and drm.config.num_blocks == num_blocks
    assert drm.transformer_blocks[-1].context_pre_only == (num_blocks == transformer.config.num_layers)
    source = transformer.state_dict()
    backbone = {k: v for k, v in drm.state_dict().items() if not k.startswith("head_")}
    kept = {k for k in source if k.split(".")[0] != "transformer_blocks" or int(k.split(".")[1]) < num_blocks}
    assert set(backbone) == kept - {k for k in kept if k.startswith(("norm_out", "proj_out"))}
    for key, value in backbone.items():
        torch.testing.assert_close(value, source[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_blocks must be in"):
        DiffusionRewardModel.from_transformer(transformer, num_blocks=transformer.config.num_layers + 1)
    cond = get_adapter(shapes_pipe).encode_prompts(PROMPTS[:2])
    x = torch.randn(2, 4, 16, 16)
    clean, noisy = drm(x, torch.zeros(2), cond), drm(x, torch.full((2,), 0.7), cond)
    assert clean.shape == (2,) and not torch.allclose(clean, noisy)  # sigma-conditioned
    drm.save_pretrained(tmp_path / "drm")
    torch.testing.assert_close(DiffusionRewardModel.from_pretrained(tmp_path / "drm")(x, torch.zeros(2), cond), clean)


def test_pairs_share_one_noise_and_one_sigma(tmp_path, shapes_pipe):
    trainer = DRMTrainer(shapes_pipe, args=drm_config(tmp_path), train_dataset=latent_pairs())
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, latents, sigma, cond):
            seen.update(latents=latents, sigma=sigma)
            return self.inner(latents, sigma, cond)

    batch = trainer._prepare_inputs(trainer._collate(list(latent_pairs())[:4]))
    trainer.compute_loss(Spy(trainer.model), batch)
    x_w, x_l = seen["latents"].chunk(2)
    s_w, s_l = seen["sigma"].chunk(2)
    torch.testing.assert_close(s_w, s_l)
    assert len(set(s_w.tolist())) == 4  # one sigma per pair
    s = s_w.view(-1, 1, 1, 1)
    noise_w = (x_w - (1 - s) * batch["chosen"]) / s
    noise_l = (x_l - (1 - s) * batch["rejected"]) / s
    torch.testing.assert_close(noise_w, noise_l, rtol=1e-4, atol=1e-4)
    logged = trainer._metrics["train"]
    assert "accuracy" in logged and any(k.startswith("accuracy/sigma_") for k in logged)


@pytest.mark.parametrize("lora", [False, True])
def test_save_load_round_trip_gives_identical_scores(tmp_path, shapes_pipe, lora):
    trainer = DRMTrainer(
        shapes_pipe,
        args=drm_config(tmp_path),
        train_dataset=latent_pairs(),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian") if lora else None,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded = DiffusionRewardModel.from_pretrained(str(tmp_path / "saved"))
    cond = get_adapter(shapes_pipe).encode_prompts(PROMPTS)
    x, sigma = torch.randn(4, 4, 16, 16), torch.tensor([0.0, 0.3, 0.6, 0.9])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, cond), trainer.model(x, sigma, cond), rtol=1e-5, atol=1e-5)
        fresh = DiffusionRewardModel.from_transformer(shapes_pipe.transformer, 1, 16)
        assert not torch.allclose(loaded(x, sigma, cond), fresh(x, sigma, cond))  # it did train
    if lora:
        assert not any("lora" in k for k in loaded.state_dict())


@pytest.mark.parametrize("num_blocks", [1, 2, 4])
def test_every_default_lora_weight_of_the_drm_gets_a_gradient(tmp_path, shapes_pipe, num_blocks):
    trainer = DRMTrainer(shapes_pipe, args=drm_config(tmp_path, num_blocks=num_blocks, max_steps=1),
                         train_dataset=latent_pairs(), peft_config=LoraConfig(r=4))
    names = [n for n, _ in trainer.model.named_parameters() if "lora_B" in n]
    last = f"transformer_blocks.{num_blocks - 1}.attn"  # its text output is dropped: no adapter on the text queries
    assert not any(n.startswith((f"{last}.add_q_proj", f"{last}.to_add_out")) for n in names)
    assert any(n.startswith(f"{last}.add_k_proj") for n in names)
    trainer.train()
    lora_b = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    dead = [n for n, p in lora_b.items() if torch.count_nonzero(p) == 0]  # B starts at 0: one step moves it
    assert lora_b and not dead, dead


def test_evaluate_reports_accuracy_per_sigma_with_ties_at_pure_noise(tmp_path, shapes_pipe):
    trainer = DRMTrainer(
        shapes_pipe, args=drm_config(tmp_path), train_dataset=latent_pairs(), eval_dataset=latent_pairs(seed=1)
    )
    metrics = trainer.evaluate()
    assert set(metrics) == {"eval_accuracy@0.00", "eval_accuracy@0.50", "eval_accuracy@1.00", "eval_accuracy"}
    assert metrics["eval_accuracy"] == metrics["eval_accuracy@0.00"]
    assert metrics["eval_accuracy@1.00"] == 0.5  # shared noise: both latents are the same at sigma 1, a tie


def test_drm_reward_scores_images_as_clean_latents(shapes_pipe):
    drm = DiffusionRewardModel.from_transformer(shapes_pipe.transformer, 1, 8)
    reward = DRMReward(drm, shapes_pipe)
    images = torch.rand(2, 3, 64, 64)
    adapter = get_adapter(shapes_pipe)
    with torch.no_grad():
        expected = drm(adapter.encode_images(images), torch.zeros(2), adapter.encode_prompts(PROMPTS[:2]))
    torch.testing.assert_close(reward(prompts=PROMPTS[:2], images=images), expected)


def test_stepwise_sampling_keeps_the_best_branch_and_counts_forwards():
    branch_scores = []

    def score_fn(x, sigma):
        scores = -x.float().flatten(1).abs().mean(1)  # prefers small latents
        branch_scores.append(scores)
        return scores

    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    out = stepwise_sample(
        lambda x, s: torch.zeros_like(x),
        score_fn,
        torch.randn(3, 4, 8, 8),
        sigmas,
        num_branches=4,
        noise_level=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.num_policy_forwards == 4 and out.num_scorer_forwards == 4 * 3
    assert len(branch_scores) == 4 * 3 and out.step_scores.shape == (3, 3)
    per_step = torch.stack(branch_scores).view(3, 4, 3)  # [steps, branches, batch]
    torch.testing.assert_close(out.step_scores, per_step.max(dim=1).values.T)
    # the final step is ODE with a zero velocity: the output is the kept branch of the last SDE step
    torch.testing.assert_close(score_fn(out.latents, None), out.step_scores[:, -1])
    with pytest.raises(ValueError, match="stochastic"):
        stepwise_sample(lambda x, s: x, score_fn, torch.randn(1, 4, 8, 8), sigmas, step_type="ode")


def test_drm_config_errors(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        drm_config(tmp_path, loss_type="hinge")
    with pytest.raises(ValueError, match="sigma_min <= sigma_max"):
        drm_config(tmp_path, sigma_min=0.8, sigma_max=0.2)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, shapes_pipe, lora):
    def make(name, **kw):
        peft = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian") if lora else None
        args = drm_config(tmp_path, output_dir=str(tmp_path / name), save_strategy="steps", save_steps=1, **kw)
        return DRMTrainer(shapes_pipe, args=args, train_dataset=latent_pairs(), peft_config=peft)

    full = make("full")
    full.train()
    resumed = make("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def channel_reward(prompts, images, **kwargs):
    """A prompt-dependent reward: the mean of the channel the prompt names (red -> 0, green -> 1, blue -> 2)."""
    channel = [0 if "red" in p else 1 if "green" in p else 2 for p in prompts]
    return [images[i, c].float().mean().item() for i, c in enumerate(channel)]


@pytest.mark.parametrize("column", [None, "tag"])
def test_cross_prompt_pairs_are_rescored_against_the_borrowing_prompt(shapes_pipe, column):
    from flow_trl.drm import sample_preference_pairs

    adapter = get_adapter(shapes_pipe)
    rows = [{"prompt": p, "tag": "colors" if i < 2 else "other"} for i, p in enumerate(PROMPTS)]
    kwargs = dict(num_samples=2, min_gap=1e-6, num_inference_steps=2, seed=3)
    own = sample_preference_pairs(shapes_pipe, rows, channel_reward, **kwargs)
    cross = sample_preference_pairs(
        shapes_pipe, rows, channel_reward, cross_prompt_samples=2, cross_prompt_column=column, **kwargs
    )
    # Same-prompt pairs: at most one per prompt (2 samples); a pool of 4 gives up to 6 per prompt.
    assert len(own) <= len(rows) and len(own) < len(cross) <= 6 * len(rows)
    sides = ("chosen", "rejected")
    latent_prompt = {row[f"{side}_latents"].sum().item(): row["prompt"] for row in own for side in sides}
    borrowed = 0
    for row in cross:
        assert row["chosen_score"] - row["rejected_score"] >= 1e-6
        for side in sides:
            latents = row[f"{side}_latents"]
            # Every score is the reward of this pair's prompt on that image, borrowed images included.
            image = adapter.decode(latents[None].to(adapter.transformer.dtype))
            assert channel_reward([row["prompt"]], image)[0] == pytest.approx(row[f"{side}_score"], abs=1e-5)
            source = latent_prompt.get(latents.sum().item())
            if source is not None and source != row["prompt"]:
                borrowed += 1
                if column == "tag":
                    assert rows[PROMPTS.index(source)]["tag"] == row["tag"]
    assert borrowed > 0
