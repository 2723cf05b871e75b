"""Bad inputs and misuse that flow_trl already handles, each failing (or warning) with a message that says what to
change. Config checks take milliseconds; the trainer checks stop before any rollout. The catalogue of every handled
input, with the test that exercises it, is in docs/troubleshooting.md."""

import dataclasses
import logging
import sys
import warnings

import pytest
import torch
from datasets import Dataset
from helpers import MODEL, tiny_config, tiny_lora, train_prompts
from safetensors.torch import save_file

from flow_trl import (
    DanceGRPOConfig,
    DanceGRPOTrainer,
    DRMConfig,
    DRMTrainer,
    FlowAWMConfig,
    FlowDPOConfig,
    FlowDPOTrainer,
    FlowNFTConfig,
    FlowNFTTrainer,
    FlowOPDConfig,
    ManifoldAnchorMixin,
    StepGRPOConfig,
)
from flow_trl.advantages import (
    adapt_slas_gamma,
    group_advantages,
    shape_advantages,
    slas_advantages,
    step_advantages,
)
from flow_trl.drm import stepwise_sample
from flow_trl.rewards import DetectorReward, JPEGCompressibility
from flow_trl.sampling import sigma_grid
from flow_trl.timesteps import sample_training_sigmas
from flow_trl.toy import (
    ShapesReward,
    parse_prompt,
    render,
    shapes_dataset,
    shapes_preference_dataset,
)
from flow_trl.toy.evaluation import generate, sigma_schedule
from flow_trl.trainer.base_config import ManifoldAnchorArguments, NormGuardArguments


def config(cls, tmp_path, **overrides):
    return tiny_config(cls, tmp_path / "out", **overrides)


# ---- configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "overrides", "match"),
    [
        (FlowNFTConfig, {"auto_find_batch_size": True}, "auto_find_batch_size=True would shrink batches"),
        (FlowNFTConfig, {"generation_batch_size": 8, "steps_per_generation": 2},
         "at most one of `generation_batch_size` and `steps_per_generation`"),
        (FlowNFTConfig, {"generation_batch_size": 6}, r"generation_batch_size \(6\) must be a multiple of"),
        (FlowNFTConfig, {"scale_rewards": "global"}, "scale_rewards must be one of"),
        (FlowNFTConfig, {"advantage_shaping": "rank"}, "advantage_shaping must be one of"),
        (FlowNFTConfig, {"slas_order": "shape_only"}, "slas_order must be one of"),
        (FlowNFTConfig, {"slas_gamma": -1.0}, "slas_gamma must be >= 0"),
        (FlowNFTConfig, {"sde_type": "ddim"}, "sde_type must be one of"),
        (FlowNFTConfig, {"num_inference_steps": 1}, "num_inference_steps must be at least 2"),
        (FlowNFTConfig, {"beta": -0.1}, "beta must be >= 0"),
        (FlowNFTConfig, {"norm_guard_coef": -1.0}, "norm_guard_coef must be >= 0"),
        (FlowOPDConfig, {"mar_coef": -1.0}, "mar_coef must be >= 0"),
        (FlowNFTConfig, {"advantage_clip": 0.0}, "advantage_clip must be positive"),
        (FlowNFTConfig, {"num_iterations": 0}, "num_iterations must be >= 1"),
        (FlowNFTConfig, {"full_finetune_params": "linear", "lora_export_rank": 0},
         "lora_export_rank must be at least 1"),
        (FlowNFTConfig, {"implicit_policy_strength": 0.0}, "implicit_policy_strength must be positive"),
        (FlowNFTConfig, {"timestep_fraction": 0.0}, r"timestep_fraction must be in \(0, 1\]"),
        (FlowNFTConfig, {"old_policy_decay": "cosine"}, "old_policy_decay must be one of"),
        (FlowNFTConfig, {"advantage_scale": 0.0}, "advantage_scale must be positive"),
        (FlowAWMConfig, {"ema_decay_schedule": "cosine"}, "ema_decay_schedule must be one of"),
        (FlowAWMConfig, {"clip_range": 0.0}, "clip_range must be positive"),
        (FlowAWMConfig, {"advantage_max": 0.0}, "advantage_max must be positive"),
        (FlowAWMConfig, {"num_train_timesteps": 0}, "num_train_timesteps must be positive"),
        (FlowAWMConfig, {"ema_kl_coef": -1.0}, "ema_kl_coef must be >= 0"),
        (FlowAWMConfig, {"advantage_scale": -1.0}, "advantage_scale must be positive"),
        (DanceGRPOConfig, {"clip_range": 0.0}, "clip_range must be positive"),
        (DanceGRPOConfig, {"kl_type": "k3"}, "kl_type must be one of"),
        (FlowDPOConfig, {"dpo_beta": 0.0}, "dpo_beta must be positive"),
        (FlowDPOConfig, {"num_train_timesteps": 0}, "num_train_timesteps must be at least 1"),
        (FlowDPOConfig, {"timestep_sampler": "grid_subset"}, "timestep_sampler must be one of"),
        (FlowDPOConfig, {"rollout_policy": "teacher"}, "rollout_policy must be one of"),
        (FlowDPOConfig, {"ref_update_steps": 0}, "ref_update_steps must be positive or None"),
        (FlowOPDConfig, {"teachers": ["counting=a", "counting=b"]}, "'counting' is given two teachers"),
        (FlowOPDConfig, {"cold_start": "average"}, "cold_start must be one of"),
        (FlowOPDConfig, {"teacher_kl_coef": 0.0}, "teacher_kl_coef must be positive"),
        (StepGRPOConfig, {"advantage_shaping": "slas"}, "Step-GRPO normalises each step's scores per group"),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)
def test_config_rejects_bad_values(tmp_path, cls, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(cls, tmp_path, **overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"eval_sigmas": [0.5, 1.5]}, r"eval_sigmas must lie in \[0, 1\]"),
        ({"thurstone_base_var": 0.0}, "thurstone_base_var must be positive"),
        ({"num_blocks": 0}, "num_blocks and num_sigma_buckets must be at least 1"),
        ({"num_sigma_buckets": 0}, "num_blocks and num_sigma_buckets must be at least 1"),
        ({"gradient_checkpointing": True}, "gradient_checkpointing is not supported by DiffusionRewardModel"),
    ],
)
def test_drm_config_rejects_bad_values(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        DRMConfig(output_dir=str(tmp_path / "drm"), report_to="none", **overrides)


def test_save_steps_inside_a_rollout_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        config(FlowNFTConfig, tmp_path, steps_per_generation=2, save_strategy="steps", save_steps=3)
    assert "checkpoints fall inside a rollout" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config(FlowNFTConfig, tmp_path, steps_per_generation=2, save_strategy="steps", save_steps=4)
    assert "checkpoints fall inside a rollout" not in caplog.text


# ---- trainers: arguments and datasets --------------------------------------------------------------------------


def test_eval_dataset_without_prompt_column(tmp_path):
    with pytest.raises(ValueError, match="The eval dataset needs a 'prompt' column; its columns are \\['text'\\]"):
        FlowNFTTrainer(MODEL, args=config(FlowNFTConfig, tmp_path), reward_funcs="shapes",
                       train_dataset=train_prompts(16),
                       eval_dataset=Dataset.from_dict({"text": ["a photo of a circle"]}))


def test_an_eval_dataset_that_training_would_never_evaluate_warns(tmp_path):
    trainer = FlowNFTTrainer(MODEL, args=config(FlowNFTConfig, tmp_path), reward_funcs="shapes",
                             train_dataset=train_prompts(16), eval_dataset=train_prompts(2))
    with pytest.warns(UserWarning, match="eval_strategy is 'no'.*Set eval_strategy='steps'"):
        trainer.train()
    with warnings.catch_warnings():  # evaluating by hand, or evaluating during training, is what the dataset is for
        warnings.filterwarnings("error", message=".*eval_strategy is 'no'")
        trainer.evaluate()
        FlowNFTTrainer(MODEL, args=config(FlowNFTConfig, tmp_path / "steps", eval_strategy="steps", eval_steps=1),
                       reward_funcs="shapes", train_dataset=train_prompts(16), eval_dataset=train_prompts(2)).train()


def test_norm_guard_on_a_trainer_without_it(tmp_path):
    """The config of a trainer without NormGuard has no `norm_guard_coef`; a config composed with it is refused by a
    trainer that does not apply it."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'norm_guard_coef'"):
        config(DanceGRPOConfig, tmp_path, norm_guard_coef=0.1)

    @dataclasses.dataclass
    class NormGuardGRPOConfig(NormGuardArguments, DanceGRPOConfig):
        pass

    with pytest.raises(ValueError, match="DanceGRPOTrainer does not include NormGuardMixin; set norm_guard_coef=0"):
        DanceGRPOTrainer(MODEL, args=config(NormGuardGRPOConfig, tmp_path, norm_guard_coef=0.1),
                         reward_funcs="shapes", train_dataset=train_prompts(16))


def test_mar_adapter_without_lora(tmp_path):
    class MARNFTTrainer(ManifoldAnchorMixin, FlowNFTTrainer):
        pass

    @dataclasses.dataclass
    class MARNFTConfig(ManifoldAnchorArguments, FlowNFTConfig):
        pass

    args = config(MARNFTConfig, tmp_path, mar_coef=0.1, mar_adapter=str(tmp_path / "anchor"))
    with pytest.raises(ValueError, match="mar_adapter is a LoRA on the student's base: pass a peft_config"):
        MARNFTTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=train_prompts(16))


def test_reward_weights_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match="reward_weights has 1 values but there are 2 reward functions"):
        FlowNFTTrainer(MODEL, args=config(FlowNFTConfig, tmp_path, reward_weights=[1.0]),
                       reward_funcs=["shapes", "shapes_quality"], train_dataset=train_prompts(16))


def test_model_init_kwargs_with_a_pipeline_object(tmp_path, shapes_pipe):
    args = config(FlowNFTConfig, tmp_path, model_init_kwargs={"dtype": "float32"})
    with pytest.raises(ValueError, match="`model_init_kwargs` only applies when `model` is a model id or path"):
        FlowNFTTrainer(shapes_pipe, args=args, reward_funcs="shapes", train_dataset=train_prompts(16))


def test_fewer_prompts_than_one_rollout_needs(tmp_path):
    args = config(FlowNFTConfig, tmp_path, per_device_train_batch_size=8)  # 4 distinct prompts per rollout
    trainer = FlowNFTTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=train_prompts(3))
    with pytest.raises(ValueError, match="The training dataset has 3 prompts but one rollout needs 4 distinct"):
        trainer.train()


def test_train_without_a_train_dataset(tmp_path):
    trainer = FlowNFTTrainer(MODEL, args=config(FlowNFTConfig, tmp_path), reward_funcs="shapes")
    with pytest.raises(ValueError, match="Training requires a train_dataset"):
        trainer.train()


def test_evaluate_without_an_eval_dataset(tmp_path):
    trainer = FlowNFTTrainer(MODEL, args=config(FlowNFTConfig, tmp_path), reward_funcs="shapes",
                             train_dataset=train_prompts(16))
    with pytest.raises(ValueError, match=r"evaluate\(\) needs an eval_dataset"):
        trainer.evaluate()


def test_offline_dpo_evaluate_without_reward_functions(tmp_path):
    trainer = FlowDPOTrainer(MODEL, args=config(FlowDPOConfig, tmp_path, num_train_timesteps=1),
                             train_dataset=shapes_preference_dataset("train", num_pairs=2), peft_config=tiny_lora())
    with pytest.raises(ValueError, match=r"evaluate\(\) scores samples with reward functions; pass `reward_funcs`"):
        trainer.evaluate(eval_dataset=shapes_dataset("test").select(range(2)))


def test_drm_trainer_with_another_config(tmp_path):
    with pytest.raises(TypeError, match="`args` must be a DRMConfig, got FlowNFTConfig"):
        DRMTrainer(MODEL, args=config(FlowNFTConfig, tmp_path))


def test_drm_accuracy_without_a_dataset(tmp_path, shapes_pipe):
    args = DRMConfig(output_dir=str(tmp_path / "drm"), num_blocks=1, head_dim=16, report_to="none")
    trainer = DRMTrainer(shapes_pipe, args=args)
    with pytest.raises(ValueError, match="accuracy_by_sigma needs a dataset"):
        trainer.accuracy_by_sigma()


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([[0.0, 1.0], [1.0, 0.0]], r"an image array must be \[H, W, 3\] or \[3, H, W\]; got shape \(2, 2\)"),
        (7, "unsupported image value of type int"),
    ],
)
def test_unreadable_preference_image(value, match):
    from flow_trl.preference import encode_preference_dataset

    dataset = Dataset.from_dict({"prompt": ["a photo of a circle"], "chosen": [value], "rejected": [value]})
    with pytest.raises(ValueError, match=f"Row 0 of the preference dataset: cannot read its 'chosen' image .*{match}"):
        encode_preference_dataset(dataset, encode=lambda images: images, resolution=8)


# ---- rewards ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reward_funcs", "match"),
    [
        (None, "`reward_funcs` is required"),
        ([], "`reward_funcs` is empty"),
        ("my_package_that_does_not_exist.reward", "Cannot import the reward function 'my_package_that_does_not_exist"),
        ("flow_trl.rewards.no_such_reward", "Cannot import the reward function 'flow_trl.rewards.no_such_reward'"),
    ],
)
def test_reward_funcs_that_cannot_be_resolved(reward_funcs, match):
    from flow_trl.rewards import resolve_reward_funcs

    with pytest.raises(ValueError, match=match):
        resolve_reward_funcs(reward_funcs)


def test_trainer_without_reward_funcs(tmp_path):
    with pytest.raises(ValueError, match="`reward_funcs` is required"):
        FlowNFTTrainer(MODEL, args=config(FlowNFTConfig, tmp_path), train_dataset=train_prompts(16))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: JPEGCompressibility(batch_size=0), "`batch_size` must be >= 1"),
        (lambda: JPEGCompressibility(scale=0), "`scale` must be > 0"),
        (lambda: DetectorReward(threshold=1.5), r"`threshold` and `nms_iou` must be in \[0, 1\]"),
        (lambda: DetectorReward(nms_iou=-0.1), r"`threshold` and `nms_iou` must be in \[0, 1\]"),
    ],
    ids=["batch_size", "jpeg_scale", "threshold", "nms_iou"],
)
def test_reward_model_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"objects": []}, "Metadata needs a non-empty 'objects' list"),
        ({"objects": [{"shape": "", "count": 1}]}, "Bad object clause .*'shape' must name the object"),
        ({"objects": [{"shape": "dog", "count": 0}]}, "Bad object clause .*'count' be >= 1"),
        ({"objects": [{"shape": "dog", "count": 1}, {"shape": "cat", "count": 1}], "relation": "near"},
         "A relation must be one of"),
    ],
)
def test_detector_metadata(meta, match):
    from flow_trl.rewards.detection import check_metadata

    with pytest.raises(ValueError, match=match):
        check_metadata(meta)


@pytest.mark.parametrize(
    ("objects", "match"),
    [
        ([{"shape": "circle", "color": "pink", "count": 1}], "'color' must be None or one of"),
        ([], "Metadata needs a non-empty 'objects' list"),
    ],
)
def test_shapes_reward_metadata(objects, match):
    with pytest.raises(ValueError, match=match):
        ShapesReward()(["a circle"], torch.rand(1, 3, 64, 64), objects=[objects])


def test_shapes_reward_relation_needs_two_objects():
    objects = [[{"shape": "circle", "color": None, "count": 1}]]
    with pytest.raises(ValueError, match="A relation needs exactly two object clauses"):
        ShapesReward()(["a circle"], torch.rand(1, 3, 64, 64), objects=objects, relation=["left of"])


# ---- models, LoRA and weight averaging -------------------------------------------------------------------------


def test_drm_from_a_non_sd3_transformer():
    from flow_trl import DiffusionRewardModel

    class FluxTransformer2DModel(torch.nn.Module):
        config = {"num_layers": 2}

    with pytest.raises(ValueError, match="built from an SD3Transformer2DModel .*got FluxTransformer2DModel"):
        DiffusionRewardModel.from_transformer(FluxTransformer2DModel())


def test_merge_without_paths_or_with_bad_weights(tmp_path):
    from flow_trl.lora import merge_lora_adapters

    with pytest.raises(ValueError, match="needs at least one LoRA path"):
        merge_lora_adapters([])
    for weights in ([1.0], [1.0, -1.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="weights must be 2 non-negative values with a positive sum"):
            merge_lora_adapters([tmp_path / "a", tmp_path / "b"], weights=weights, method="weighted")
    with pytest.raises(ValueError, match="Pass `weights` \\(one per path\\) exactly when method='weighted'"):
        merge_lora_adapters([tmp_path / "a"], weights=[1.0], method="mean")


def test_weight_difference_of_different_architectures():
    from flow_trl.lora import lora_from_weight_difference

    with pytest.raises(ValueError, match="`trained` and `base` differ in architecture at 'weight'"):
        lora_from_weight_difference(torch.nn.Linear(4, 4), torch.nn.Linear(4, 8), rank=2)


def test_weight_ema_of_a_frozen_module_or_an_incomplete_state():
    from flow_trl.trainer.ema import ParameterEMA

    with pytest.raises(ValueError, match="no trainable parameters to average"):
        ParameterEMA(torch.nn.Linear(2, 2).requires_grad_(False), decay=0.9)
    ema = ParameterEMA(torch.nn.Linear(2, 2), decay=0.9)
    with pytest.raises(ValueError, match="The saved EMA lacks 1 trained weights, e.g. \\['weight'\\]"):
        ema.load_state_dict({"bias": torch.zeros(2)})


# ---- saving and resuming ---------------------------------------------------------------------------------------


def test_resume_from_a_folder_without_the_policy_state(tmp_path):
    trainer = FlowNFTTrainer(MODEL, args=config(FlowNFTConfig, tmp_path), reward_funcs="shapes",
                             train_dataset=train_prompts(16), peft_config=tiny_lora())
    folder = tmp_path / "exported"
    trainer.save_model(str(folder))  # a final export, not a checkpoint: no old-policy state
    with pytest.raises(FileNotFoundError, match="flow_trl_policies.safetensors is missing: this checkpoint cannot"), \
            pytest.warns(UserWarning, match="has no flow_trl_trainer.json"):  # a folder, not a checkpoint
        trainer.train(resume_from_checkpoint=str(folder))


def test_resume_from_a_lora_of_other_targets(tmp_path):
    trainer = FlowNFTTrainer(MODEL, args=config(FlowNFTConfig, tmp_path), reward_funcs="shapes",
                             train_dataset=train_prompts(16), peft_config=tiny_lora())
    folder = tmp_path / "other"
    folder.mkdir()
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(4, 8)},
              str(folder / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ValueError, match="Checkpoint LoRA has unexpected keys"), \
            pytest.warns(UserWarning, match="has no flow_trl_trainer.json"):
        trainer.train(resume_from_checkpoint=str(folder))


# ---- shapes world and low-level functions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: generate(None, ["a photo of a circle"], [0, 1]), "Got 1 prompts but 2 seeds"),
        (lambda: sigma_schedule(0), "num_inference_steps must be at least 1"),
        (lambda: sigma_grid(4, shift=0.0), "shift must be positive"),
        (lambda: sample_training_sigmas("uniform", 2, 0, sigma_grid(4), torch.Generator()),
         "num_timesteps must be at least 1"),
        (lambda: group_advantages(torch.zeros(4), num_generations=0), "num_generations must be at least 1"),
        (lambda: shape_advantages(torch.zeros(4), gamma=-1.0), "gamma must be >= 0"),
        (lambda: slas_advantages(torch.zeros(4), 2, 0.5, order="shape_only"), "order must be one of"),
        (lambda: adapt_slas_gamma(0.5, 0.1, target_kl=0.0), "target_kl must be positive and factor above 1"),
        (lambda: step_advantages(torch.zeros(4, 2), 2, mode="delta"), "mode must be one of"),
        (lambda: stepwise_sample(None, None, torch.zeros(1, 4, 8, 8), sigma_grid(4), num_branches=0),
         "num_branches must be at least 1"),
        (lambda: parse_prompt("a photo of a circle and a square and a triangle"), r"at most two clauses"),
        (lambda: render({"objects": [{"shape": "hexagon", "color": None, "count": 1}], "relation": None}, seed=0),
         "Unknown shape 'hexagon'"),
    ],
    ids=["generate_seeds", "sigma_schedule", "sigma_grid_shift", "num_timesteps", "group_size", "shaping_gamma",
         "slas_order", "slas_target_kl", "step_advantage_mode", "drm_branches", "three_clauses", "unknown_shape"],
)
def test_function_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_layout_that_does_not_fit_the_image():
    crowded = {"objects": [{"shape": "circle", "color": None, "count": 4},
                           {"shape": "square", "color": None, "count": 4}], "relation": "left of"}
    with pytest.raises(RuntimeError, match="Could not lay out .* at size 16"):
        render(crowded, seed=0, size=16)


def test_diagnostics_plots_without_matplotlib(tmp_path, monkeypatch):
    from flow_trl.diagnostics import plot_norm_profiles

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    with pytest.raises(ImportError, match=r"The diagnostics plots need matplotlib: `pip install flow-trl\[plots\]`"):
        plot_norm_profiles({}, tmp_path / "profile.png")
