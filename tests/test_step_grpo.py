"""Per-step advantages against hand values, and StepGRPOTrainer end to end on the shapes world."""

import pytest
import torch
from helpers import MODEL, tiny_config, train_prompts
from peft import LoraConfig

from flow_trl import DiffusionRewardModel, StepGRPOConfig, StepGRPOTrainer
from flow_trl.advantages import mix_advantages, step_advantages
from flow_trl.toy import shapes_dataset
from flow_trl.trainer.grpo_trainer import DanceGRPOTrainer


STEP_GRPO = dict(learning_rate=1e-2, timestep_fraction=1.0)


def step_config(tmp_path, **overrides):
    return tiny_config(StepGRPOConfig, tmp_path / "step-grpo", **{**STEP_GRPO, **overrides})


@pytest.fixture(scope="module")
def drm(shapes_pipe):
    return DiffusionRewardModel.from_transformer(shapes_pipe.transformer, num_blocks=1, head_dim=8)


def test_step_advantages_normalise_each_step_within_each_group():
    after = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 2.0], [5.0, 6.0]])  # 2 groups of 2, 2 steps
    eps = 1e-4
    # step 0: group 1 (1, 3) -> -+1 / (1 + eps); group 2 (5, 5) -> zero std -> 0
    # step 1: group 1 (0, 0) -> 0; group 2 (2, 6) -> -+2 / (2 + eps)
    expected = torch.tensor([[-1 / (1 + eps), 0.0], [1 / (1 + eps), 0.0], [0.0, -2 / (2 + eps)], [0.0, 2 / (2 + eps)]])
    torch.testing.assert_close(step_advantages(after, 2), expected)
    before = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 5.0], [0.0, 5.0]])
    gains = after - before  # [[1, -1], [3, -3], [5, -3], [5, 1]]
    expected_gain = torch.tensor(
        [[-1 / (1 + eps), 1 / (1 + eps)], [1 / (1 + eps), -1 / (1 + eps)], [0.0, -2 / (2 + eps)], [0.0, 2 / (2 + eps)]]
    )
    torch.testing.assert_close(step_advantages(after, 2, "gain", before), expected_gain)
    assert torch.equal(gains[:, 0], after[:, 0])
    with pytest.raises(ValueError, match="needs scores_before"):
        step_advantages(after, 2, "gain")
    with pytest.raises(ValueError, match=r"\[N, S\]"):
        step_advantages(after[:, 0], 2)


def test_mix_with_the_terminal_advantage():
    step, terminal = torch.tensor([[1.0, -1.0], [0.0, 2.0]]), torch.tensor([0.5, -0.5])
    torch.testing.assert_close(mix_advantages(step, terminal, 0.25), 0.75 * step + 0.25 * terminal[:, None])
    torch.testing.assert_close(mix_advantages(step, terminal, 1.0), terminal[:, None].expand(2, 2))
    with pytest.raises(ValueError, match="terminal_weight"):
        mix_advantages(step, terminal, 1.5)


def test_transition_advantages_index_per_step_or_broadcast():
    rows, steps = torch.arange(3), torch.tensor([2, 0, 1])
    per_step = torch.arange(9.0).view(3, 3)
    torch.testing.assert_close(
        DanceGRPOTrainer._transition_advantages({"advantages": per_step}, rows, steps), torch.tensor([2.0, 3.0, 7.0])
    )
    terminal = torch.tensor([1.0, 2.0, 3.0])
    assert DanceGRPOTrainer._transition_advantages({"advantages": terminal}, rows, steps) is terminal


@pytest.mark.parametrize("mode", ["score", "gain"])
def test_rollout_gets_per_step_advantages_from_the_drm_and_ratio_one(tmp_path, drm, mode):
    args = step_config(tmp_path, step_advantage=mode)
    trainer = StepGRPOTrainer(
        MODEL, args=args, drm=drm, train_dataset=train_prompts(8), peft_config=LoraConfig(r=4)
    )
    assert trainer.reward_func_names == ["drm"]  # no reward_funcs: the DRM on the final images
    inputs = trainer._generate_and_score(list(shapes_dataset("train").select([0, 0, 1, 1])))
    n_steps = args.num_inference_steps - 1
    assert inputs["advantages"].shape == (4, n_steps)
    # recompute by hand: the DRM on each stored state at its own sigma, normalised per step within each group
    sigmas, cond = trainer.sigmas, inputs["cond"]
    with torch.no_grad():
        after = torch.stack([drm(inputs["latents_after"][:, k], sigmas[k + 1], cond) for k in range(n_steps)], 1)
        before = torch.stack([drm(inputs["latents_before"][:, k], sigmas[k], cond) for k in range(n_steps)], 1)
    expected = step_advantages(after, 2, mode, before if mode == "gain" else None)
    torch.testing.assert_close(inputs["advantages"], expected.clamp(-5, 5), rtol=1e-4, atol=1e-4)
    for chunk in range(trainer._num_loss_chunks(inputs)):
        trainer._compute_loss(trainer.model, inputs, chunk)
    assert all(abs(r - 1) < 1e-5 for r in trainer._metrics["train"]["ratio"])


def test_step_grpo_trains_and_terminal_weight_one_is_grpo(tmp_path, drm):
    args = step_config(tmp_path, max_steps=2, terminal_reward_weight=1.0)
    trainer = StepGRPOTrainer(
        MODEL,
        args=args,
        drm=drm,
        reward_funcs="shapes",
        train_dataset=train_prompts(8),
        peft_config=LoraConfig(r=4),
    )
    inputs = trainer._generate_and_score(list(shapes_dataset("train").select([0, 0, 1, 1])))
    terminal = trainer.compute_advantages(inputs["rewards"])
    torch.testing.assert_close(inputs["advantages"], terminal[:, None].expand_as(inputs["advantages"]))
    before = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if ".default." in n}
    trainer.train()
    params = dict(trainer.transformer.named_parameters())
    assert any(not torch.equal(before[n], params[n]) for n in before)
    logs = {k for entry in trainer.state.log_history for k in entry}
    assert {"ratio", "step_advantages/std", "drm/final_state_score", "rewards/shapes/mean"} <= logs


def test_step_grpo_config_errors(tmp_path):
    with pytest.raises(ValueError, match="step_advantage"):
        step_config(tmp_path, step_advantage="delta")
    with pytest.raises(ValueError, match="terminal_reward_weight"):
        step_config(tmp_path, terminal_reward_weight=2.0)
    with pytest.raises(ValueError, match="needs a DiffusionRewardModel"):
        StepGRPOTrainer(MODEL, args=step_config(tmp_path), train_dataset=shapes_dataset("train"))


def test_cli_trains_a_drm_and_step_grpo_reads_its_recipe(tmp_path, monkeypatch):
    import flow_trl.toy
    from flow_trl.cli import main
    from flow_trl.scripts import step_grpo
    from flow_trl.scripts.utils import parse_with_shapes_defaults

    rows = {split: flow_trl.toy.split_prompts(split)[:12] for split in ("train", "test")}
    monkeypatch.setattr(flow_trl.toy, "split_prompts", lambda split: rows[split])
    drm_dir = tmp_path / "drm"
    flags = f"--output_dir {drm_dir} --max_steps 2 --num_samples 4 --min_gap 0.01 --num_blocks 1"
    main(["drm", *flags.split(), "--per_device_train_batch_size", "4"])
    assert (drm_dir / "drm_eval.json").exists()
    assert DiffusionRewardModel.from_pretrained(str(drm_dir)).config.num_blocks == 1
    _, args = parse_with_shapes_defaults(
        step_grpo.make_parser(), ["--step_advantage", "gain"], step_grpo.SHAPES_STEP_GRPO_DEFAULTS
    )
    assert isinstance(args, StepGRPOConfig) and args.drm_model_name_or_path == "shapes-drm"
    assert args.step_advantage == "gain" and args.learning_rate == 3e-3  # GRPO's shapes recipe
