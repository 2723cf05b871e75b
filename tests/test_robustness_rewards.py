"""Rewards that misbehave and runs that cannot learn: unique reward names, checked reward returns and weights, and
the once-per-trainer warnings for rollouts without a reward and for gradients that stay exactly 0."""

import functools
import logging
import math

import numpy as np
import pytest
import torch
from helpers import MODEL, redness, tiny_config, train_prompts
from transformers import TrainerControl, TrainerState, TrainingArguments

from flow_trl import DanceGRPOConfig, DanceGRPOTrainer, FlowNFTConfig, FlowNFTTrainer
from flow_trl.rewards import (
    RemoteReward,
    check_reward_weights,
    compute_rewards,
    reward_func_names,
    reward_values,
    unique_names,
    weighted_reward,
)
from flow_trl.trainer.health import RewardHealth, ZeroGradientCallback


HEALTH_LOGGER = "flow_trl.trainer.health"


RUN = dict(num_inference_steps=2, learning_rate=1e-2, guidance_scale=1.0, disable_tqdm=True)


def tiny_args(tmp_path, config_class=FlowNFTConfig, **overrides):
    return tiny_config(config_class, tmp_path / "out", **{**RUN, **overrides})


def warnings_from(caplog, text):
    return [r for r in caplog.records if r.name == HEALTH_LOGGER and text in r.getMessage()]


# ---- unique names ------------------------------------------------------------------------------------------------


def test_unique_names_suffixes_every_repeat_in_order_and_keeps_singletons():
    assert unique_names(["a", "b", "a"]) == ["a_1", "b", "a_2"]
    assert unique_names(["a", "a", "a_1"]) == ["a_2", "a_3", "a_1"]  # never collides with a name already taken
    assert unique_names(["x", "y"]) == ["x", "y"]


def scaled(prompts, images, factor=1.0, **kwargs):
    return (redness(prompts, images) * factor).tolist()


def test_partials_lambdas_and_remote_rewards_get_distinct_names():
    funcs = [functools.partial(scaled, factor=1.0), functools.partial(scaled, factor=-1.0),
             lambda prompts, images, **kw: [0.0] * len(prompts), lambda prompts, images, **kw: [1.0] * len(prompts),
             RemoteReward("http://127.0.0.1:1/score"), RemoteReward("http://127.0.0.1:2/score"), redness]
    assert reward_func_names(funcs) == ["scaled_1", "scaled_2", "lambda_1", "lambda_2", "remote_1", "remote_2",
                                        "redness"]


def test_duplicate_rewards_log_separately_and_the_model_card_lists_both(tmp_path):
    trainer = FlowNFTTrainer(
        MODEL, args=tiny_args(tmp_path, reward_weights=[1.0, 0.5]),
        train_dataset=train_prompts(8),
        reward_funcs=[functools.partial(scaled, factor=1.0), functools.partial(scaled, factor=-1.0)],
    )
    trainer.train()
    logs = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert logs["rewards/scaled_1/mean"] == pytest.approx(-logs["rewards/scaled_2/mean"])
    assert logs["rewards/scaled_1/mean"] != 0
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"")  # an existing sample image: the card copies it instead of sampling a grid
    trainer.create_model_card(sample_image=grid)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| `scaled_1` | 1.0 |" in card and "| `scaled_2` | 0.5 |" in card


# ---- what a reward function returns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "returned, got",
    [
        (None, "returned None"),
        (0.5, "returned 0.5 (a float)"),
        (np.float64(0.5), "(a float64)"),
        ("0.5", "returned '0.5' (a str)"),
        ({"a": 1.0}, "(a dict)"),
        (object(), "(a object)"),
        (["0.5", "0.7"], "a list containing '0.5' (a str, at index 0)"),
        ([0.5, [0.7]], "a list containing [0.7] (a list, at index 1)"),
        (torch.tensor(0.5), "a tensor of shape ()"),
        (torch.zeros(2, 2), "a tensor of shape (2, 2)"),
        (torch.zeros(2, dtype=torch.complex64), "a tensor of dtype torch.complex64"),
    ],
)
def test_a_reward_of_the_wrong_type_names_the_function_and_the_expected_type(returned, got):
    def judge(prompts, images, **kwargs):
        return returned

    with pytest.raises(TypeError) as info:
        compute_rewards([judge], ["a", "b"], torch.zeros(2, 3, 4, 4))
    message = str(info.value)
    assert message.startswith("Reward function 'judge' returned") and got in message
    assert "a list of floats (None or NaN to abstain on an image) or a 1-D tensor" in message
    assert "(2 here)" in message


def test_the_error_uses_the_unique_name_of_a_duplicate():
    def good(prompts, images, **kwargs):
        return [1.0] * len(prompts)

    bad = functools.partial(lambda prompts, images, **kw: None)
    with pytest.raises(TypeError, match="'lambda_2' returned None"):
        compute_rewards([lambda prompts, images, **kw: [0.0, 0.0], bad, good], ["a", "b"], torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize(
    "returned, expected",
    [
        ([0.5, None], [0.5, math.nan]),
        ((1, True), [1.0, 1.0]),
        (np.array([0.25, None], dtype=object), [0.25, math.nan]),
        (np.array([1, 2], dtype=np.int64), [1.0, 2.0]),
        ([np.float32(0.5), torch.tensor(2.0)], [0.5, 2.0]),
        (torch.tensor([[0.5], [1.5]]), [0.5, 1.5]),  # a [B, 1] model head
        (torch.tensor([True, False]), [1.0, 0.0]),
        ((v for v in (3.0, 4.0)), [3.0, 4.0]),
    ],
)
def test_accepted_returns(returned, expected):
    torch.testing.assert_close(reward_values(returned, "r", 2), torch.tensor(expected), equal_nan=True)


def test_wrong_length_and_infinite_values_fail_with_the_name():
    with pytest.raises(ValueError, match="'r' returned 3 values for 2 images"):
        reward_values([1.0, 2.0, 3.0], "r", 2)
    with pytest.raises(ValueError, match="'r' returned an infinite value: not a usable reward"):
        reward_values(torch.tensor([1.0, -math.inf]), "r", 2)


def test_values_beyond_float32_fail_instead_of_becoming_inf():
    with pytest.raises(ValueError, match=r"'r' returned 1e\+39, beyond float32's range"):
        reward_values([1e39, 0.0], "r", 2)


def test_values_whose_variance_overflows_float32_fail():
    # 1e30 fits float32, but (1e30)^2 does not: the group std would be inf and every advantage silently 0
    with pytest.raises(ValueError, match=r"values of reward function 'r' \(largest magnitude 1e\+30\) are too large"):
        reward_values([1e30, -1e30], "r", 2)
    assert reward_values([1e6, -1e6], "r", 2).tolist() == [1e6, -1e6]


# ---- reward weights ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[1.0, math.nan], [math.inf, 1.0]])
def test_non_finite_reward_weights_fail_at_config_time(tmp_path, weights):
    with pytest.raises(ValueError, match="reward_weights must be finite numbers"):
        tiny_args(tmp_path, reward_weights=weights)
    with pytest.raises(ValueError, match="reward_weights must be finite numbers"):
        weighted_reward(torch.ones(2, 2), weights)


def test_all_zero_reward_weights_fail_at_config_time(tmp_path):
    with pytest.raises(ValueError, match=r"reward_weights are all 0 \(\[0.0, 0.0\]\)"):
        tiny_args(tmp_path, reward_weights=[0.0, 0.0])
    check_reward_weights([0.0, 1.0])  # logging a function with weight 0 is fine


def test_a_weighted_sum_that_overflows_float32_fails():
    rewards = torch.tensor([[1e20], [1e20]])
    with pytest.raises(ValueError, match="The weighted rewards .* Lower `reward_weights`"):
        weighted_reward(rewards, [1e20])


# ---- rollouts without a reward -----------------------------------------------------------------------------------


def test_reward_health_warns_once_per_cause(caplog):
    health = RewardHealth()
    nan = math.nan
    with caplog.at_level(logging.WARNING, logger=HEALTH_LOGGER):
        health.check(torch.tensor([[1.0, nan], [2.0, nan]]), ["a", "b"])
        health.check(torch.tensor([[1.0, nan], [nan, nan]]), ["a", "b"])
        health.check(torch.tensor([[1.0, 0.5], [nan, nan]]), ["a", "b"])  # each function scored some image: fine
        health.check(torch.tensor([[nan, nan], [nan, nan]]), ["a", "b"])
        health.check(torch.tensor([[nan, nan], [nan, nan]]), ["a", "b"])
    assert len(warnings_from(caplog, "Reward function 'b' returned None/NaN for every image")) == 1
    assert len(warnings_from(caplog, "Reward function 'a'")) == 0
    assert len(warnings_from(caplog, "Every reward function (a, b) returned None/NaN")) == 1
    assert len(warnings_from(caplog, "")) == 2


def abstain(prompts, images, **kwargs):
    return [None] * len(prompts)


def test_a_run_where_every_reward_abstains_warns_once_and_stays_finite(tmp_path, caplog):
    # two rollouts (steps_per_generation 1), one warning; the velocity's own weights must not turn NaN
    trainer = FlowNFTTrainer(MODEL, args=tiny_args(tmp_path, max_steps=2), reward_funcs=abstain,
                             train_dataset=train_prompts(8))
    with caplog.at_level(logging.WARNING, logger=HEALTH_LOGGER):
        trainer.train()
    assert trainer._rollouts.count == 2
    assert len(warnings_from(caplog, "Every reward function (abstain) returned None/NaN for every image")) == 1
    assert all(torch.isfinite(p).all() for p in trainer.transformer.parameters())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(math.isfinite(entry["loss"]) and entry["advantages/abs_mean"] == 0 for entry in logged)


# ---- zero gradients ----------------------------------------------------------------------------------------------


def log_grad_norms(callback, norms, every=1):
    args, state, control = TrainingArguments(output_dir="unused", report_to="none"), TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    for norm in norms:
        state.global_step += every
        callback.on_log(args, state, control, logs={"loss": 0.0, "grad_norm": norm})


def test_zero_gradient_warning_needs_consecutive_zero_steps_and_fires_once(caplog):
    with caplog.at_level(logging.WARNING, logger=HEALTH_LOGGER):
        log_grad_norms(ZeroGradientCallback(patience=3), [0.0, 0.0, 1e-9, 0.0, 0.0])
        assert not warnings_from(caplog, "")  # a non-zero norm resets the count
        log_grad_norms(ZeroGradientCallback(patience=3), [0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
        assert len(warnings_from(caplog, "exactly 0 for 3 consecutive optimizer steps (up to step 3)")) == 1
        log_grad_norms(ZeroGradientCallback(patience=10), [0.0, 0.0], every=5)  # logging_steps=5: 10 steps
    assert len(warnings_from(caplog, "exactly 0 for 10 consecutive optimizer steps (up to step 10)")) == 1
    assert len(warnings_from(caplog, "")) == 2


def constant(prompts, images, **kwargs):
    return [1.0] * len(prompts)


def test_a_constant_reward_triggers_the_zero_gradient_warning(tmp_path, caplog):
    # every group ties: all advantages 0, so GRPO's clipped loss has exactly zero gradient
    args = tiny_args(tmp_path, DanceGRPOConfig, max_steps=2, timestep_fraction=0.5)
    trainer = DanceGRPOTrainer(MODEL, args=args, reward_funcs=constant,
                               train_dataset=train_prompts(8))
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ZeroGradientCallback))
    callback.patience = 2
    with caplog.at_level(logging.WARNING, logger=HEALTH_LOGGER):
        trainer.train()
    assert [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry] == [0.0, 0.0]
    found = warnings_from(caplog, "The gradient norm has been exactly 0 for 2 consecutive optimizer steps")
    assert len(found) == 1 and "raise `num_generations` or use a continuous reward" in found[0].getMessage()
