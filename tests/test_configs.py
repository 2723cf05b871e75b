"""The configs' shared conventions: one step-type vocabulary, one wording for checks, defaults that trainers use,
distinct names for distinct coefficients, and args that stay what the user gave."""

import dataclasses
import inspect

import pytest
import torch
from peft import LoraConfig

from flow_trl import (
    DanceGRPOConfig,
    DanceGRPOTrainer,
    DRMConfig,
    DRMTrainer,
    FlowAWMConfig,
    FlowDPOConfig,
    FlowNFTConfig,
    FlowOPDConfig,
    FlowRLConfig,
    StepGRPOConfig,
)
from flow_trl.sampling import STEP_TYPES
from flow_trl.toy import shapes_dataset
from flow_trl.trainer.base_trainer import FlowRLTrainer
from flow_trl.trainer.nft_trainer import advantage_to_r
from flow_trl.trainer.validation import check_choice, check_non_negative, check_positive


RL_CONFIGS = [FlowRLConfig, FlowNFTConfig, FlowAWMConfig, FlowDPOConfig, DanceGRPOConfig, FlowOPDConfig,
              StepGRPOConfig]


def make(cls, tmp_path, **overrides):
    return cls(output_dir=str(tmp_path), report_to="none", **overrides)


@pytest.mark.parametrize("cls", RL_CONFIGS, ids=lambda c: c.__name__)
def test_every_trainer_defaults_to_no_cfg(tmp_path, cls):
    assert make(cls, tmp_path).guidance_scale == 1.0


@pytest.mark.parametrize("cls", RL_CONFIGS, ids=lambda c: c.__name__)
def test_sde_type_defaults_and_values_are_the_sampling_step_types(tmp_path, cls):
    args = make(cls, tmp_path)
    assert args.sde_type in STEP_TYPES
    with pytest.raises(ValueError, match=r"sde_type must be one of \('ode', 'flow_sde', 'dance_sde', 'cps'\); got"):
        make(cls, tmp_path, sde_type="dance")


def test_grpo_family_keeps_the_step_type_it_was_given(tmp_path):
    assert make(DanceGRPOConfig, tmp_path).sde_type == "dance_sde"
    assert make(FlowOPDConfig, tmp_path).sde_type == "flow_sde"
    for step_type in ("flow_sde", "dance_sde", "cps"):
        assert make(DanceGRPOConfig, tmp_path, sde_type=step_type, noise_level=0.5).sde_type == step_type


def test_coefficients_have_distinct_names():
    names = {cls: {f.name for f in dataclasses.fields(cls)} for cls in RL_CONFIGS}
    assert {"implicit_policy_strength", "advantage_scale"} <= names[FlowNFTConfig]
    assert {"ema_kl_coef", "advantage_scale", "advantage_max"} <= names[FlowAWMConfig]
    assert all("nft_beta" not in n and "ema_beta" not in n for n in names.values())
    assert all("beta" in n for n in names.values())  # the KL coefficient to the reference, as TRL's GRPOConfig
    with pytest.raises(TypeError, match="nft_beta"):
        FlowNFTConfig(output_dir="x", nft_beta=1.0)


def test_advantage_scale_is_independent_of_advantage_clip(tmp_path):
    args = make(FlowNFTConfig, tmp_path, advantage_clip=None)  # no clipping: r saturates at 0 and 1 anyway
    assert args.advantage_clip is None and args.advantage_scale == 5.0
    assert make(FlowAWMConfig, tmp_path, advantage_clip=None, advantage_scale=2.0).advantage_scale == 2.0
    r = advantage_to_r(torch.tensor([-10.0, -2.5, 0.0, 2.5, 10.0]), advantage_scale=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


@pytest.mark.parametrize(
    ("cls", "overrides", "match"),
    [
        (FlowNFTConfig, {"beta": float("nan")}, "beta must be >= 0; got nan"),
        (FlowOPDConfig, {"mar_coef": float("nan")}, "mar_coef must be >= 0; got nan"),
        (FlowAWMConfig, {"ema_kl_coef": float("nan")}, "ema_kl_coef must be >= 0; got nan"),
        (FlowNFTConfig, {"slas_gamma": float("nan")}, "slas_gamma must be >= 0; got nan"),
        (FlowNFTConfig, {"guidance_scale": 0.0}, "guidance_scale must be positive; got 0.0"),
        (DanceGRPOConfig, {"guidance_scale": -1.0}, "guidance_scale must be positive; got -1.0"),
        (FlowNFTConfig, {"implicit_policy_strength": float("nan")}, "implicit_policy_strength must be positive"),
        (FlowDPOConfig, {"timestep_sampler": "grid_subset"},
         r"timestep_sampler must be one of \('discrete', 'discrete_wo_init', 'logit_normal', 'uniform'\)"),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)
def test_config_checks_reject_nan_and_non_positive_guidance(tmp_path, cls, overrides, match):
    with pytest.raises(ValueError, match=match):
        make(cls, tmp_path, **overrides)


def test_drm_config_uses_the_shared_checks(tmp_path):
    with pytest.raises(ValueError, match=r"loss_type must be one of \('bradley_terry', 'thurstone'\); got 'hinge'"):
        DRMConfig(output_dir=str(tmp_path), report_to="none", loss_type="hinge")
    with pytest.raises(ValueError, match="thurstone_base_var must be positive; got 0.0"):
        DRMConfig(output_dir=str(tmp_path), report_to="none", thurstone_base_var=0.0)


def test_check_helpers_wording():
    check_choice("x", "a", ("a", "b"))
    check_positive("x", None, optional=True)
    check_non_negative("x", 0.0)
    with pytest.raises(ValueError, match=r"^x must be one of \('a', 'b'\); got 'c'\.$"):
        check_choice("x", "c", ("a", "b"))
    with pytest.raises(ValueError, match=r"^x must be positive or None; got 0\.$"):
        check_positive("x", 0, optional=True)
    with pytest.raises(ValueError, match=r"^x must be >= 0; got -1\.$"):
        check_non_negative("x", -1)


def test_opd_config_keeps_the_teachers_as_given(tmp_path):
    args = make(FlowOPDConfig, tmp_path, teachers=["counting=a", "colors=b"])
    assert args.teachers == ["counting=a", "colors=b"]
    with pytest.raises(ValueError, match="teachers entries are 'task=path'; got 'counting'"):
        make(FlowOPDConfig, tmp_path, teachers=["counting"])


def test_drm_trainer_arguments_follow_the_other_trainers_order():
    drm = list(inspect.signature(DRMTrainer.__init__).parameters)[1:]
    rl = list(inspect.signature(FlowRLTrainer.__init__).parameters)[1:]
    shared = [name for name in rl if name in drm]
    assert shared == ["model", "args", "train_dataset", "eval_dataset", "callbacks", "optimizers", "peft_config"]
    assert drm[: len(shared)] == shared  # positional use lines up with FlowRLTrainer's; reward_model comes last
    assert drm[len(shared):] == ["reward_model"]


def test_adapted_slas_gamma_lives_on_the_trainer_and_in_its_checkpoint_state(tmp_path):
    args = make(DanceGRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=2, num_inference_steps=2,
                advantage_shaping="slas", slas_gamma=1.0, slas_target_kl=1.0)
    rows = shapes_dataset("train").select(range(4))

    def build():
        from flow_trl.toy import SHAPES_PIPELINE_DIR

        return DanceGRPOTrainer(str(SHAPES_PIPELINE_DIR), args=args, reward_funcs="shapes", train_dataset=rows,
                                peft_config=LoraConfig(r=4))

    trainer = build()
    trainer._approx_kls = (1e-6,)  # far below the target: gamma grows by 1.1
    trainer._before_generation()
    assert trainer.slas_gamma == pytest.approx(1.1)
    assert args.slas_gamma == 1.0  # the config is what the user gave
    state = trainer._algorithm_state()
    assert state["slas_gamma"] == pytest.approx(1.1)
    resumed = build()
    assert resumed.slas_gamma == 1.0
    resumed._restore_algorithm_state(state)
    assert resumed.slas_gamma == pytest.approx(1.1) and args.slas_gamma == 1.0
    rewards = torch.tensor([0.1, 0.5, 0.2, 0.9])
    from flow_trl.advantages import clip_advantages, slas_advantages

    expected = clip_advantages(slas_advantages(rewards, 2, 1.1, args.slas_order), args.advantage_clip)
    torch.testing.assert_close(resumed.compute_advantages(rewards), expected)
