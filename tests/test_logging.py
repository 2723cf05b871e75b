"""Logging: metrics and sample grids reach TensorBoard (and W&B), the progress bar shows the reward, a summary ends
training."""

import types

import pytest
from peft import LoraConfig
from transformers import TrainerCallback

from flow_trl import FlowNFTConfig, FlowNFTTrainer
from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_dataset


class FakeWandbCallback(TrainerCallback):
    """What `_save_samples` uses of transformers' WandbCallback: a `_wandb` module with a live run."""

    def __init__(self):
        self.logged = []
        self._wandb = types.SimpleNamespace(run=object(), Image=lambda path: ("image", path), log=self.logged.append)


class PostfixRecorder(TrainerCallback):
    """Reads the progress bar's postfix at each step (the trainer sets it after logging)."""

    def __init__(self):
        self.postfixes = []

    def on_step_begin(self, args, state, control, **kwargs):
        bar = getattr(self.progress, "training_bar", None)
        if bar is not None:
            self.postfixes.append(bar.postfix)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("logging")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(out / "tb"))  # transformers' TensorBoardCallback reads it
    args = FlowNFTConfig(
        output_dir=str(out / "run"), report_to="tensorboard", disable_tqdm=False,
        per_device_train_batch_size=4, num_generations=2, num_inference_steps=3, max_steps=3, logging_steps=1,
        eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4, num_images_to_log=4, save_strategy="no",
        guidance_scale=1.0, seed=0,
    )
    wandb, recorder = FakeWandbCallback(), PostfixRecorder()
    trainer = FlowNFTTrainer(
        str(SHAPES_PIPELINE_DIR), args=args, reward_funcs="shapes", callbacks=[wandb, recorder],
        train_dataset=shapes_dataset("train").select(range(8)), eval_dataset=shapes_dataset("test").select(range(4)),
        peft_config=LoraConfig(r=4, lora_alpha=8),
    )
    recorder.progress = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "ProgressCallback")
    trainer.train()
    monkeypatch.undo()
    return trainer, wandb, recorder, out


def test_scalars_and_sample_grids_reach_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, _, out = run
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/reward", "train/rewards/shapes/mean", "train/advantages/std", "train/loss",
                "train/velocity_norm_ratio", "eval/reward"):
        assert tag in scalars, tag
    assert len(events.Scalars("train/reward")) == 3
    images = [t for t in events.Tags()["images"] if t.startswith("eval/samples")]
    assert images, events.Tags()["images"]


def test_sample_grids_reach_wandb(run):
    trainer, wandb, _, out = run
    (entry,) = wandb.logged
    assert entry["train/global_step"] == 3
    kind, path = entry["eval/samples"]
    assert kind == "image" and path.endswith("eval_step_000003.png")


def test_progress_bar_shows_the_current_reward(run):
    trainer, _, recorder, _ = run
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    assert recorder.postfixes[1:] == [f"reward={r:.4f}" for r in rewards[:2]]


def test_training_ends_with_a_summary(run, capsys):
    from flow_trl.trainer.base_trainer import format_training_summary

    trainer, _, _, _ = run
    summary = trainer.training_summary()
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    assert summary["steps"] == 3 and summary["images_generated"] == 12  # 3 rollouts of 4 images
    assert summary["reward"] == (rewards[0], rewards[-1])
    assert summary["eval_reward"][1] == trainer.state.log_history[-2]["eval_reward"]
    text = format_training_summary(summary)
    assert text.startswith("NFT training finished: 3 steps, 12 images generated") and "rewards/shapes/mean" in text
