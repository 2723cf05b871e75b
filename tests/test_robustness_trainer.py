"""Rollouts in eval mode without dropout, rollout randomness per rollout, AWM's trust region off-policy, checkpoints
written before rotation and push, and checkpoints refused by the wrong trainer."""

import json
import os
import shutil

import pytest
import torch
from helpers import MODEL, TINY_RUN, redness, tiny_lora, train_prompts
from peft import LoraConfig

from flow_trl import DanceGRPOConfig, DanceGRPOTrainer, FlowAWMConfig, FlowAWMTrainer, FlowNFTConfig, FlowNFTTrainer
from flow_trl.toy import shapes_dataset
from flow_trl.trainer.outputs import POLICY_STATE_FILE, TRAINER_RECORD_FILE


TINY = dict(TINY_RUN, num_inference_steps=3, learning_rate=1e-2, disable_tqdm=True)


def nft(tmp_path, lora=True, **overrides):
    """A tiny NFT trainer: a LoRA (nonzero from the start), or full fine-tuning with `lora=False`."""
    args = FlowNFTConfig(output_dir=str(tmp_path / "nft"), **{**TINY, **overrides})
    peft_config = tiny_lora() if lora else None
    return FlowNFTTrainer(MODEL, args=args, reward_funcs=redness, train_dataset=train_prompts(16),
                          peft_config=peft_config)


# ---- rollouts in eval mode, dropout off for likelihood ratios -------------------------------------------------------


def test_first_grpo_replay_has_ratio_one_with_lora_dropout(tmp_path):
    args = DanceGRPOConfig(output_dir=str(tmp_path), timestep_fraction=1.0, **TINY)
    assert args.disable_dropout and not FlowNFTConfig(output_dir=str(tmp_path)).disable_dropout
    assert FlowAWMConfig(output_dir=str(tmp_path)).disable_dropout
    # a LoRA with random A and B, so that its dropout changes the velocity from the first step on
    peft_config = LoraConfig(r=4, lora_dropout=0.1, init_lora_weights=False)
    trainer = DanceGRPOTrainer(MODEL, args=args, reward_funcs=redness, train_dataset=train_prompts(16),
                               peft_config=peft_config)
    trainer.model.train()  # as in training_step, which rolls out from inside the training loop
    inputs = trainer._generate_and_score(list(shapes_dataset("train").select([0, 0, 1, 1])))
    assert trainer.model.training  # sampling restored train mode
    for chunk in range(trainer._num_loss_chunks(inputs)):
        trainer._compute_loss(trainer.model, inputs, chunk)
    ratios = trainer._metrics["train"]["ratio"]
    assert len(ratios) == args.num_inference_steps - 1 and all(abs(r - 1) < 1e-6 for r in ratios), ratios
    assert all(c == 0 for c in trainer._metrics["train"]["clip_frac"])


def test_sampling_and_evaluation_run_in_eval_mode_and_restore_train_mode(tmp_path):
    trainer = nft(tmp_path)
    trainer.eval_dataset = shapes_dataset("test").select(range(2))
    modes = []
    velocity = trainer.adapter.velocity

    def recording(transformer, *args, **kwargs):
        modes.append(transformer.training)
        return velocity(transformer, *args, **kwargs)

    trainer.adapter.velocity = recording
    trainer.model.train()
    trainer.sample(["a photo of a red circle"], torch.Generator().manual_seed(0), "old")
    assert modes and not any(modes) and trainer.model.training
    modes.clear()
    trainer.evaluate()
    assert modes and not any(modes) and trainer.model.training


# ---- rollout randomness and the soft update -------------------------------------------------------------------------


def test_rollouts_of_one_optimizer_step_differ_and_the_old_policy_moves_once_per_step(tmp_path):
    # 2 rollouts of 4 images per optimizer step (gradient accumulation 2, one micro-batch per rollout)
    trainer = nft(tmp_path, max_steps=2, gradient_accumulation_steps=2, generation_batch_size=4)
    noises, updates = [], []
    initial_noise, soft_update = trainer._initial_noise, trainer.policies.soft_update

    def recording_noise(num_samples, generator):
        noises.append(initial_noise(num_samples, generator))
        return noises[-1]

    def recording_update(target, decay):
        updates.append((trainer.state.global_step, target))
        soft_update(target, decay)

    trainer._initial_noise, trainer.policies.soft_update = recording_noise, recording_update
    trainer.train()
    assert len(noises) == 4 and trainer._rollouts.count == 4
    assert not torch.equal(noises[0], noises[1]) and not torch.equal(noises[2], noises[3])
    assert updates == [(1, "old")]  # before the first rollout after optimizer step 1, not again before the second


def test_one_rollout_per_step_keeps_the_global_step_seeds(tmp_path):
    trainer = nft(tmp_path, max_steps=2)
    seeds = []
    initial_noise = trainer._initial_noise

    def recording(num_samples, generator):
        seeds.append(generator.initial_seed())
        return initial_noise(num_samples, generator)

    trainer._initial_noise = recording
    trainer.train()
    # rollout k of a run with one rollout per optimizer step is keyed on (seed, global step k, process, salt)
    assert seeds == [hash((0, step, 0, 0)) % 2**63 for step in (0, 1)]


# ---- AWM's ratio after the first optimizer step of a rollout --------------------------------------------------------


def test_awm_second_optimizer_step_of_a_rollout_is_clipped(tmp_path):
    args = FlowAWMConfig(output_dir=str(tmp_path), **{**TINY, "max_steps": 2}, steps_per_generation=2,
                         num_train_timesteps=1, clip_range=1e-4, beta=0.0, ema_kl_coef=0.0)
    trainer = FlowAWMTrainer(MODEL, args=args, reward_funcs=redness, train_dataset=train_prompts(16),
                             peft_config=tiny_lora())
    trainer.train()
    assert trainer._rollouts.count == 1  # both optimizer steps train the same rollout
    first, second = [entry for entry in trainer.state.log_history if "awm/ratio" in entry]
    assert first["awm/ratio"] == 1.0 and first["awm/clip_frac"] == 0.0
    assert second["awm/ratio"] != 1.0 and second["awm/clip_frac"] > 0


def test_awm_skips_the_old_pass_when_every_step_trains_whole_rollouts(tmp_path):
    args = FlowAWMConfig(output_dir=str(tmp_path), **TINY, gradient_accumulation_steps=2, num_train_timesteps=1)
    trainer = FlowAWMTrainer(MODEL, args=args, reward_funcs=redness, train_dataset=train_prompts(16),
                             peft_config=LoraConfig(r=4))
    inputs = trainer._generate_and_score(list(shapes_dataset("train").select([0, 0, 1, 1, 2, 2, 3, 3])))
    assert "old_log_likelihood" not in inputs and inputs["rollout_step"] == 0


# ---- checkpoints --------------------------------------------------------------------------------------------------


def test_failed_checkpoint_write_keeps_the_previous_checkpoint_resumable(tmp_path):
    trainer = nft(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, save_total_limit=1)
    policy_state, calls = trainer.policies.state_dict, []

    def failing_second_time():
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return policy_state()

    trainer.policies.state_dict = failing_second_time
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    out = tmp_path / "nft"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]
    files = set(os.listdir(out / "checkpoint-1"))
    assert {POLICY_STATE_FILE, TRAINER_RECORD_FILE, "trainer_state.json", "optimizer.pt",
            "pytorch_lora_weights.safetensors"} <= files
    resumed = nft(tmp_path, max_steps=2, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert resumed.state.global_step == 2 and resumed._rollouts.count == 2  # the rollout count was restored


def test_flow_trl_files_are_in_the_checkpoint_when_it_is_pushed(tmp_path):
    trainer = nft(tmp_path, weight_ema_decay=0.9, save_strategy="steps", save_steps=1)
    trainer.args.push_to_hub = True  # set after __init__, which would create a Hub repository
    pushed = []
    trainer._push_from_checkpoint = lambda folder: pushed.append(set(os.listdir(folder)))
    trainer._finish_current_push = lambda: None
    trainer.train()
    assert len(pushed) == 1
    assert {POLICY_STATE_FILE, TRAINER_RECORD_FILE, "flow_trl_weight_ema.safetensors"} <= pushed[0]


@pytest.fixture(scope="module")
def nft_checkpoint(tmp_path_factory):
    """A LoRA NFT checkpoint after one optimizer step."""
    tmp_path = tmp_path_factory.mktemp("nft_checkpoint")
    nft(tmp_path, save_strategy="steps", save_steps=1).train()
    return str(tmp_path / "nft" / "checkpoint-1")


def test_checkpoint_records_its_trainer(nft_checkpoint):
    with open(os.path.join(nft_checkpoint, TRAINER_RECORD_FILE)) as f:
        record = json.load(f)
    assert record == {"algorithm": "NFT", "trainer_class": "FlowNFTTrainer", "lora": True, "policies": ["old"],
                      "num_rollouts": 1}


def test_another_algorithms_checkpoint_is_refused(tmp_path, nft_checkpoint):
    awm = FlowAWMTrainer(MODEL, args=FlowAWMConfig(output_dir=str(tmp_path / "awm"), **TINY), reward_funcs=redness,
                         train_dataset=train_prompts(16), peft_config=LoraConfig(r=4))
    with pytest.raises(ValueError, match=r"saved by FlowNFTTrainer \(NFT\); FlowAWMTrainer \(AWM\) cannot resume"):
        awm.train(resume_from_checkpoint=nft_checkpoint)
    grpo = DanceGRPOTrainer(MODEL, args=DanceGRPOConfig(output_dir=str(tmp_path / "grpo"), **TINY),
                            reward_funcs=redness, train_dataset=train_prompts(16), peft_config=LoraConfig(r=4))
    with pytest.raises(ValueError, match="Resume it with FlowNFTTrainer"):  # GRPO keeps no extra policy to miss
        grpo._load_from_checkpoint(nft_checkpoint)


def test_lora_checkpoint_is_refused_by_full_fine_tuning(tmp_path, nft_checkpoint):
    trainer = nft(tmp_path, lora=False)
    with pytest.raises(ValueError, match="saved by a LoRA run.*pass the run's peft_config"):
        trainer._load_from_checkpoint(nft_checkpoint)


def test_checkpoint_without_record_is_accepted_with_a_warning_and_policies_are_checked(tmp_path, nft_checkpoint):
    old = tmp_path / "old-checkpoint"
    shutil.copytree(nft_checkpoint, old)
    (old / TRAINER_RECORD_FILE).unlink()
    with pytest.warns(UserWarning, match="has no flow_trl_trainer.json"):
        nft(tmp_path)._load_from_checkpoint(str(old))
    awm = FlowAWMTrainer(MODEL, args=FlowAWMConfig(output_dir=str(tmp_path / "awm"), **TINY), reward_funcs=redness,
                         train_dataset=train_prompts(16), peft_config=LoraConfig(r=4))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="does not hold the policies FlowAWMTrainer keeps"):
        awm._load_from_checkpoint(str(old))
