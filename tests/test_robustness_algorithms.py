"""Algorithm-level robustness: noise-level ranges per step type, the advantage std conventions, OPD's constant-group
mask across processes and its gkd mean, DPO's reference refresh schedule, and offline preference image ranges."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import MODEL, tiny_config, tiny_lora
from peft import LoraConfig
from transformers.testing_utils import CaptureLogger

from flow_trl import (
    DanceGRPOConfig,
    DanceGRPOTrainer,
    FlowDPOConfig,
    FlowDPOTrainer,
    FlowOPDConfig,
    FlowOPDTrainer,
    FlowRLConfig,
    preference,
)
from flow_trl.advantages import ADVANTAGE_STDS, group_advantages
from flow_trl.drm.sampling import stepwise_sample
from flow_trl.preference import encode_preference_dataset, load_image
from flow_trl.sampling import NOISE_LEVEL_RANGES, sigma_grid, step
from flow_trl.toy import shapes_dataset
from flow_trl.trainer.opd_trainer import constant_group_mask, gkd_loss


# ---- noise-level ranges --------------------------------------------------------------------------------------------

# (step type, noise level, valid?) at and around each derived boundary
NOISE_CASES = [
    *[(t, eta, ok) for t in ("flow_sde", "dance_sde") for eta, ok in
      [(0.0, False), (-0.1, False), (1e-6, True), (0.7, True), (1.0, True), (5.0, True), (math.inf, False),
       (math.nan, False)]],
    ("cps", 0.0, False), ("cps", -0.5, False), ("cps", 1e-6, True), ("cps", 0.5, True), ("cps", 1.0, True),
    ("cps", 1.0001, False), ("cps", 1.5, False), ("cps", 2.0, False), ("cps", 3.0, False), ("cps", math.nan, False),
]


@pytest.mark.parametrize("step_type, eta, valid", NOISE_CASES)
def test_noise_level_is_validated_against_the_step_type(tmp_path, step_type, eta, valid):
    kwargs = dict(output_dir=str(tmp_path), sde_type=step_type, noise_level=eta, report_to="none")
    if valid:
        assert FlowRLConfig(**kwargs).noise_level == eta
        return
    high = "at most 1" if step_type == "cps" else "finite"
    with pytest.raises(ValueError, match=rf"noise_level \(eta\) must be positive and {high} for the '{step_type}'"):
        FlowRLConfig(**kwargs)


def test_noise_level_checks_reach_every_config_and_ignore_ode(tmp_path):
    out = str(tmp_path)
    with pytest.raises(ValueError, match=r"'cps' step \(valid: 0 < eta <= 1\); got 1.5\. .*1.5 acts as 0.5"):
        DanceGRPOConfig(output_dir=out, sde_type="cps", noise_level=1.5, report_to="none")
    with pytest.raises(ValueError, match=r"'cps' step \(valid: 0 < eta <= 1\); got 3.0\. .*negative"):
        FlowOPDConfig(output_dir=out, sde_type="cps", noise_level=3.0, report_to="none")
    with pytest.raises(ValueError, match=r"'flow_sde' step \(valid: 0 < eta < inf\); got 0.0"):
        FlowDPOConfig(output_dir=out, sde_type="flow_sde", noise_level=0.0, report_to="none")
    assert FlowRLConfig(output_dir=out, sde_type="ode", noise_level=2.0, report_to="none").noise_level == 2.0
    assert set(NOISE_LEVEL_RANGES) == {"flow_sde", "dance_sde", "cps"}


def test_the_step_functions_refuse_noise_levels_outside_their_range():
    """`step` itself (and so every rollout and step-wise sampler) refuses what the configs refuse: CPS at eta = 1.5
    would silently act as eta = 0.5 (its std sigma_next sin(eta pi / 2) is the same), at 3.0 its std is negative."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    assert math.isclose(0.4 * math.sin(1.5 * math.pi / 2), 0.4 * math.sin(0.5 * math.pi / 2))
    assert step("cps", x, v, 0.6, 0.4, 1.0).log_prob is not None
    for step_type, eta in [("cps", 1.5), ("cps", 3.0), ("flow_sde", -0.1), ("dance_sde", float("nan"))]:
        with pytest.raises(ValueError, match=f"for the '{step_type}' step"):
            step(step_type, x, v, 0.6, 0.4, eta)
    with pytest.raises(ValueError, match="at most 1 for the 'cps' step"):
        stepwise_sample(lambda x, s: x, None, x, sigma_grid(4), step_type="cps", noise_level=1.5)


# ---- advantage std conventions -------------------------------------------------------------------------------------


def test_both_advantage_std_conventions_match_hand_computation():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # two groups of 3, both with mean 2
    population = group_advantages(rewards, 3, "group", **ADVANTAGE_STDS["population"])
    s1, s2 = math.sqrt(2 / 3), math.sqrt(24 / 3)  # population stds: sum of squares / 3
    expected = [-1 / (s1 + 1e-4), 0.0, 1 / (s1 + 1e-4), -2 / (s2 + 1e-4), -2 / (s2 + 1e-4), 4 / (s2 + 1e-4)]
    torch.testing.assert_close(population, torch.tensor(expected))
    unbiased = group_advantages(rewards, 3, "group", **ADVANTAGE_STDS["unbiased"])
    u1, u2 = 1.0, math.sqrt(24 / 2)  # Bessel: sum of squares / 2
    expected = [-1 / (u1 + 1e-8), 0.0, 1 / (u1 + 1e-8), -2 / (u2 + 1e-8), -2 / (u2 + 1e-8), 4 / (u2 + 1e-8)]
    torch.testing.assert_close(unbiased, torch.tensor(expected))
    batch = group_advantages(rewards, 3, "batch", **ADVANTAGE_STDS["unbiased"])
    b = math.sqrt((1 + 0 + 1 + 4 + 4 + 16) / 5)
    torch.testing.assert_close(batch, torch.tensor([-1 / b, 0.0, 1 / b, -2 / b, -2 / b, 4 / b]))
    # a group with a single finite reward has no unbiased std: 0, not NaN
    lone = group_advantages(torch.tensor([1.0, math.nan, 2.0, 4.0]), 2, **ADVANTAGE_STDS["unbiased"])
    torch.testing.assert_close(lone, torch.tensor([0.0, 0.0, -1 / math.sqrt(2), 1 / math.sqrt(2)]))


def test_grpo_trainer_uses_the_configured_advantage_std(tmp_path):
    with pytest.raises(ValueError, match=r"advantage_std must be one of \('population', 'unbiased'\)"):
        DanceGRPOConfig(output_dir=str(tmp_path), advantage_std="bessel", report_to="none")
    assert DanceGRPOConfig(output_dir=str(tmp_path), report_to="none").advantage_std == "population"
    trainer = DanceGRPOTrainer(MODEL, args=tiny_config(DanceGRPOConfig, tmp_path), reward_funcs="shapes",
                               train_dataset=shapes_dataset("train"), peft_config=LoraConfig(r=4, lora_alpha=8))
    rewards = torch.tensor([1.0, 3.0, 0.0, 4.0])  # groups of 2: population std 1 and 2, unbiased sqrt(2) and 2 sqrt(2)
    torch.testing.assert_close(trainer.compute_advantages(rewards),
                               torch.tensor([-1 / (1 + 1e-4), 1 / (1 + 1e-4), -2 / (2 + 1e-4), 2 / (2 + 1e-4)]))
    trainer.args.advantage_std = "unbiased"
    r2 = math.sqrt(2)
    torch.testing.assert_close(trainer.compute_advantages(rewards), torch.tensor([-1 / r2, 1 / r2, -1 / r2, 1 / r2]))


# ---- OPD: constant-group mask across processes, gkd mean ------------------------------------------------------------


def test_constant_group_mask_judges_groups_that_straddle_processes():
    # groups of 4 over 2 processes of 6 rows: group 1 (rows 4-7) is split; process 0 holds its rows [2, 2], which
    # look constant on their own, but the group varies
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0])
    assert constant_group_mask(rewards, 4, process_index=0, num_processes=2).tolist() == [1.0] * 6
    assert constant_group_mask(rewards, 4, process_index=1, num_processes=2).tolist() == [1, 1, 0, 0, 0, 0]
    assert constant_group_mask(rewards, 4).tolist() == [1.0] * 8 + [0.0] * 4
    with pytest.raises(ValueError, match="rewards of all 5 processes"):
        constant_group_mask(rewards, 4, process_index=0, num_processes=5)
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\)"):
        constant_group_mask(rewards, 4, process_index=2, num_processes=2)


def test_gkd_loss_averages_over_kept_samples_only():
    kl = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    loss = gkd_loss(kl, 2.0, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert loss.item() == pytest.approx(2.0 * (1.0 + 2.0) / 2)  # not 2 * 3 / 4: the masked pair does not dilute
    none = gkd_loss(kl, 2.0, torch.zeros(4))
    none.backward()
    assert none.item() == 0.0 and kl.grad.tolist() == [0.0] * 4  # all masked: zero loss and gradient, no NaN


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """One random teacher LoRA in diffusers format (shared by both tasks)."""
    root = tmp_path_factory.mktemp("teacher")
    trainer = DanceGRPOTrainer(MODEL, args=tiny_config(DanceGRPOConfig, root / "t"),
                               reward_funcs="shapes", train_dataset=shapes_dataset("train"),
                               peft_config=LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, param in trainer.transformer.named_parameters():
            if ".default." in name and "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    trainer.save_model(str(root / "teacher"))
    return str(root / "teacher")


def test_opd_gkd_trainer_loss_ignores_filtered_groups(tmp_path, teacher, monkeypatch):
    args = tiny_config(FlowOPDConfig, tmp_path, task_column="tag", opd_mode="gkd", teacher_kl_coef=2.0,
                       filter_constant_reward_groups=True, mar_coef=0.0, diagnostics_every_log=False,
                       timestep_fraction=1.0)
    data = shapes_dataset("train").filter(lambda r: r["tag"] in ("counting", "colors"))
    trainer = FlowOPDTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=data,
                             peft_config=LoraConfig(r=4, lora_alpha=8),
                             teachers={"counting": teacher, "colors": teacher})
    row = next(r for r in data if r["tag"] == "counting")
    inputs = trainer._generate_and_score([row] * 4)
    torch.testing.assert_close(inputs["keep"], constant_group_mask(inputs["rewards"], 2))
    kl = torch.tensor([1.0, 2.0, 3.0, 4.0])
    monkeypatch.setattr("flow_trl.trainer.opd_trainer.transition_kl", lambda transition, v: kl)
    inputs["keep"] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert trainer._compute_loss(trainer.model, inputs, 0).item() == pytest.approx(2.0 * (3.0 + 4.0) / 2)


# ---- DPO: reference refresh every ref_update_steps optimizer steps --------------------------------------------------


def test_dpo_reference_refreshes_at_every_multiple_of_ref_update_steps(tmp_path):
    # 2 optimizer steps per rollout, refresh every 3: rollouts start at steps 0, 2, 4, none of them a multiple of 3
    args = tiny_config(FlowDPOConfig, tmp_path, per_device_train_batch_size=2, steps_per_generation=2,
                       num_inference_steps=3, num_train_timesteps=1, max_steps=6, ref_update_steps=3,
                       learning_rate=1e-2, diagnostics_every_log=False)
    trainer = FlowDPOTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=shapes_dataset("train"),
                             peft_config=tiny_lora())
    refreshes = []
    copy = trainer.policies.copy

    def spy(source, target):
        if target == "dpo_ref":
            refreshes.append(trainer.state.global_step)
        copy(source, target)

    trainer.policies.copy = spy
    trainer.train()
    assert refreshes == [3, 6]
    params = dict(trainer.transformer.named_parameters())
    refs = [n for n in params if ".dpo_ref." in n]
    assert refs and all(torch.equal(params[n], params[n.replace(".dpo_ref.", ".default.")]) for n in refs)


# ---- offline preference images: value ranges, identical pairs -------------------------------------------------------


def test_preference_images_are_read_by_dtype_and_range():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    pixels[0, 0], pixels[0, 1] = 0, 255
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(load_image(pixels, 8), expected)
    torch.testing.assert_close(load_image(pixels.astype(np.int64), 8), expected)  # lists of ints from datasets
    torch.testing.assert_close(load_image(pixels.tolist(), 8), expected)
    torch.testing.assert_close(load_image(pixels / 255.0, 8), expected)
    for bad, message in [
        (pixels.astype(np.float32), r"float image must have values in \[0, 1\]; this one spans \[0, 255\]"),
        (pixels / 127.5 - 1, r"float image must have values in \[0, 1\]; this one spans \[-1, 1\]"),
        (np.full((8, 8, 3), np.nan), "NaN or infinite"),
        (pixels.astype(np.int64) * 4, "integer image must have values in 0-255"),
        (pixels > 128, "integers .* or floats"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_image(bad, 8)
    data = Dataset.from_dict({"prompt": ["a"], "chosen": [pixels.astype(np.float32)], "rejected": [pixels]})
    with pytest.raises(ValueError, match=r"Row 0 of the preference dataset: cannot read its 'chosen' image \(a float"):
        encode_preference_dataset(data, lambda images: images, 8)


def test_identical_preference_pairs_warn_once(tmp_path):
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(2))
    data = Dataset.from_dict({"prompt": ["p0", "p1", "p2", "p3"], "chosen": [a, b, a, b], "rejected": [b, b, a, a]})
    with CaptureLogger(preference.logger) as captured:
        encoded = encode_preference_dataset(data, lambda images: images.mean(dim=1, keepdim=True), 8, batch_size=1)
    assert captured.out.count("identical 'chosen' and 'rejected'") == 1
    assert "2 of the 4 preference pairs" in captured.out and "rows [1, 2]" in captured.out
    torch.testing.assert_close(encoded[0]["chosen_latents"], torch.from_numpy(a).float().mean(-1)[None] / 255)
    with CaptureLogger(preference.logger) as captured:
        encode_preference_dataset(data.select([0, 3]), lambda images: images, 8)
    assert "identical" not in captured.out


def test_sd3_timesteps_reach_a_bf16_transformer_in_fp32():
    """A bf16 transformer gets t = 1000 sigma in fp32 (as StableDiffusion3Pipeline passes it): cast to bf16,
    818.2 would become 820 and the LoRA would train at other times than it is sampled at by diffusers."""
    from flow_trl.models import get_adapter
    from flow_trl.toy import load_shapes_pipeline

    pipe = load_shapes_pipeline(torch_dtype=torch.bfloat16)
    adapter = get_adapter(pipe)
    seen = {}

    def transformer(**kwargs):
        seen.update(kwargs)
        return (kwargs["hidden_states"],)

    cond = adapter.encode_prompts(["a red circle"])
    latents = torch.zeros(1, *adapter.latent_shape(adapter.default_resolution, adapter.default_resolution))
    adapter.predict(transformer, latents, torch.tensor([0.8182]), cond)
    assert seen["timestep"].dtype == torch.float32
    torch.testing.assert_close(seen["timestep"], torch.tensor([818.2]))
    assert seen["hidden_states"].dtype == torch.bfloat16
