"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2`: a few NFT steps on the shapes world,
recording what each process generated, scored and trained on, to `<out>/rank<k>.json`."""

import json
import sys

import torch
from peft import LoraConfig

from flow_trl import FlowNFTConfig, FlowNFTTrainer
from flow_trl.toy import SHAPES_PIPELINE_DIR, ShapesReward, shapes_dataset


class RecordingNFTTrainer(FlowNFTTrainer):
    """Records each rollout: this process's prompts and rewards, and the gathered rewards and advantages."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts, self.eval_scored = [], []

    def compute_advantages(self, rewards):
        advantages = super().compute_advantages(rewards)
        self.rollouts.append({"gathered_rewards": rewards.tolist(), "gathered_advantages": advantages.tolist()})
        return advantages

    def _prepare_training_inputs(self, inputs, generator):
        self.rollouts[-1].update(rewards=inputs["rewards"].tolist(), advantages=inputs["advantages"].tolist())
        return super()._prepare_training_inputs(inputs, generator)


def main(out: str) -> None:
    shapes = ShapesReward()
    calls = []

    def reward(prompts, images, **columns):  # the shapes reward, remembering what this process scored
        values = shapes(prompts, images, **columns)
        calls.append({"prompts": prompts, "rewards": [float(v) for v in values]})
        return values

    args = FlowNFTConfig(
        output_dir=f"{out}/run", per_device_train_batch_size=3, num_generations=4, steps_per_generation=2,
        num_inference_steps=3, max_steps=4, learning_rate=1e-2, logging_steps=1, save_strategy="no",
        report_to="none", seed=0, guidance_scale=1.0, per_device_eval_batch_size=2, num_images_to_log=0,
    )
    trainer = RecordingNFTTrainer(
        str(SHAPES_PIPELINE_DIR), args=args, reward_funcs=reward,
        train_dataset=shapes_dataset("train").select(range(24)), eval_dataset=shapes_dataset("test").select(range(6)),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"),
    )
    trainer.train()
    train_calls = list(calls)
    calls.clear()
    metrics = trainer.evaluate()
    lora = torch.cat([p.detach().flatten() for n, p in trainer.transformer.named_parameters() if ".default." in n])
    rank = trainer.accelerator.process_index
    record = {
        "num_processes": trainer.accelerator.num_processes,
        "scale_rewards": args.scale_rewards,
        "advantage_clip": args.advantage_clip,
        "train_calls": train_calls,
        "rollouts": trainer.rollouts,
        "eval_calls": calls,
        "eval_reward": metrics["eval_reward"],
        "lora_sum": lora.double().sum().item(),
        "lora_abs_sum": lora.double().abs().sum().item(),
    }
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(record, f)
    trainer.accelerator.end_training()  # destroys the process group before exit (see flow_trl.scripts.utils)


if __name__ == "__main__":
    main(sys.argv[1])
