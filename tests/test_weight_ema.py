"""The weight EMA (`weight_ema_decay`): its arithmetic, that evaluation and the saved model use it, that it leaves
training untouched, and resume."""

import pytest
import torch
from helpers import MODEL, redness, tiny_lora, train_prompts
from test_trainer import StopAt, nft_config
from torch import nn
from transformers import TrainerCallback

from flow_trl import FlowNFTTrainer
from flow_trl.toy import shapes_dataset
from flow_trl.trainer.ema import ParameterEMA, ema_decay_at


def test_ema_follows_the_warm_up_formula_by_hand():
    module = nn.Linear(1, 1, bias=True)
    module.bias.requires_grad_(False)  # frozen weights are not averaged
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = ParameterEMA(module, decay=0.9)
    assert list(ema.shadow) == ["weight"]
    with torch.no_grad():
        module.weight.fill_(10.0)
    assert ema.update(1) == pytest.approx(0.1)  # k = 0: (1 + 0) / (10 + 0)
    assert ema.shadow["weight"].item() == pytest.approx(0.1 * 0 + 0.9 * 10)
    with torch.no_grad():
        module.weight.fill_(20.0)
    assert ema.update(2) == pytest.approx(2 / 11)
    assert ema.shadow["weight"].item() == pytest.approx(2 / 11 * 9 + 9 / 11 * 20)  # = 18
    assert ema_decay_at(10_000, 0.9) == 0.9  # capped at the configured decay


def test_ema_interval_skips_steps_and_applied_restores_the_weights():
    module = nn.Linear(2, 1)
    ema = ParameterEMA(module, decay=0.5, update_interval=2)
    start = {n: t.clone() for n, t in ema.shadow.items()}
    with torch.no_grad():
        module.weight.add_(1.0)
    assert ema.update(1) is None and torch.equal(ema.shadow["weight"], start["weight"])
    assert ema.update(2) == pytest.approx(2 / 11)
    trained = module.weight.detach().clone()
    with pytest.raises(RuntimeError), ema.applied():
        torch.testing.assert_close(module.weight.detach(), ema.shadow["weight"])
        raise RuntimeError("an error inside the block")
    assert torch.equal(module.weight.detach(), trained)  # restored even when the block fails


class RecordWeights(TrainerCallback):
    """The trained LoRA weights after every optimizer step (before the EMA takes them in)."""

    def __init__(self, trainer_ref):
        self.trainer_ref, self.steps = trainer_ref, []

    def on_step_end(self, args, state, control, **kwargs):
        params = self.trainer_ref[0].transformer.named_parameters()
        self.steps.append({n: p.detach().clone() for n, p in params if ".default." in n})


def train_recording(tmp_path, name, **overrides):
    args = nft_config(tmp_path, output_dir=str(tmp_path / name), max_steps=4, eval_strategy="steps", eval_steps=2,
                       num_images_to_log=0, per_device_eval_batch_size=4, **overrides)
    ref = []
    recorder = RecordWeights(ref)
    trainer = FlowNFTTrainer(MODEL, args=args, reward_funcs=redness, train_dataset=train_prompts(16),
                             eval_dataset=shapes_dataset("test").select(range(4)), peft_config=tiny_lora(),
                             callbacks=[recorder])
    ref.append(trainer)
    initial = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if ".default." in n}
    trainer.train()
    evals = [e["eval_reward"] for e in trainer.state.log_history if "eval_reward" in e]
    return trainer, initial, recorder.steps, evals


def test_training_is_unchanged_and_the_model_ends_as_the_ema(tmp_path):
    _, _, plain_steps, plain_evals = train_recording(tmp_path, "plain")
    trainer, initial, steps, evals = train_recording(tmp_path, "ema", weight_ema_decay=0.9)
    assert len(steps) == len(plain_steps) == 4
    for plain, averaged in zip(plain_steps, steps):  # the EMA never feeds back into training (nor does evaluation)
        for name in plain:
            torch.testing.assert_close(averaged[name], plain[name], atol=0, rtol=0, msg=name)
    expected = {n: t.clone() for n, t in initial.items()}
    for k, weights in enumerate(steps):
        d = min((1 + k) / (10 + k), 0.9)
        expected = {n: d * expected[n] + (1 - d) * weights[n] for n in expected}
    final = dict(trainer.transformer.named_parameters())
    trained_b = [n for n in expected if "lora_B" in n and torch.count_nonzero(steps[-1][n])]
    assert trained_b and any(not torch.allclose(final[n], steps[-1][n]) for n in trained_b)
    for name, value in expected.items():
        torch.testing.assert_close(final[name].detach(), value, atol=1e-6, rtol=1e-5, msg=name)
    # the in-training evaluations (steps 2 and 4) scored the average, not the trained weights
    assert len(evals) == len(plain_evals) == 2 and evals[0] != plain_evals[0] and evals[1] != plain_evals[1]
    assert trainer.evaluate()["eval_reward"] == pytest.approx(evals[1], abs=1e-6)  # the model now is the EMA


def test_resume_continues_the_ema(tmp_path):
    def run(out, stop_at=None, resume=None):
        args = nft_config(tmp_path, output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=2,
                           weight_ema_decay=0.9)
        trainer = FlowNFTTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=train_prompts(16),
                                 peft_config=tiny_lora(), callbacks=[StopAt(stop_at)] if stop_at else None)
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if "lora_" in n}

    full = run(tmp_path / "full")
    run(tmp_path / "part", stop_at=2)
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    for name in full:  # the final EMA (and NFT's old policy) as in the uninterrupted run
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0, msg=name)


def test_resuming_with_an_ema_from_a_checkpoint_without_one_fails_clearly(tmp_path):
    out = tmp_path / "plain"
    args = nft_config(tmp_path, output_dir=str(out), max_steps=2, save_strategy="steps", save_steps=2)
    FlowNFTTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=train_prompts(16),
                   peft_config=tiny_lora()).train()
    args = nft_config(tmp_path, output_dir=str(out), max_steps=4, save_strategy="no", weight_ema_decay=0.9)
    trainer = FlowNFTTrainer(MODEL, args=args, reward_funcs="shapes", train_dataset=train_prompts(16),
                             peft_config=tiny_lora())
    with pytest.raises(FileNotFoundError, match="weight_ema_decay=0"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))


@pytest.mark.parametrize("overrides", [{"weight_ema_decay": 1.0}, {"weight_ema_decay": -0.1},
                                       {"weight_ema_decay": 0.9, "weight_ema_update_interval": 0}])
def test_invalid_ema_settings_fail_clearly(tmp_path, overrides):
    with pytest.raises(ValueError, match="weight_ema"):
        nft_config(tmp_path, **overrides)
