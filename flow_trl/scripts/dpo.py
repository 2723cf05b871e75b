"""Train with Diffusion-DPO: `flow-trl dpo [--flags | --config cfg.yaml]`.

Online (pairs from the policy's own rollouts, best vs worst of each group) on a prompt dataset; offline on a
preference dataset with `prompt`, `chosen` and `rejected` image columns. With no `--model`, trains online on the
embedded shapes world (the tiny transformer's linear weights, saved with an exact LoRA export) and prints the
held-out score before and after. With a model:

    accelerate launch examples/scripts/dpo.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/preference-pairs --output_dir sd35-dpo --bf16
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .utils import SHAPES_COMMON_DEFAULTS, ScriptArguments, TrainerScript, build_trainer


# The shapes-world recipe (online; measured figures: docs/benchmarks.md): every linear layer's weight of the tiny
# transformer trained in full, as `flow-trl nft` does, published as an exact rank-128 LoRA next to the transformer.
SHAPES_DPO_DEFAULTS: dict[str, Any] = {
    **SHAPES_COMMON_DEFAULTS,
    "output_dir": "shapes-dpo",
    "use_peft": False,
    "full_finetune_params": "linear",
    "lora_export_rank": 128,
    "learning_rate": 2e-4,
    "num_train_timesteps": 3,
}


@dataclass
class DPOScriptArguments(ScriptArguments):
    """[`ScriptArguments`] plus offline training on pairs of the model's own samples."""

    pairs_from_samples: int = field(
        default=0,
        metadata={"help": "Train offline on pairs of the model's own samples: this many ODE samples per training "
                  "prompt, each prompt's best vs worst by the reward functions, saved to "
                  "<output_dir>/preference_pairs (0: train online, or offline on a preference --dataset_name)."},
    )
    pairs_min_margin: float = field(
        default=0.0,
        metadata={"help": "With --pairs_from_samples: no pair from a prompt whose best and worst rewards differ by "
                  "this much or less."},
    )


class DPOTrainerScript(TrainerScript):
    """`flow-trl dpo`: online, offline on a preference dataset, or offline on pairs of the model's own samples."""

    def build(self, script_args: DPOScriptArguments, training_args):
        """Online (or on a preference --dataset_name): the default. With --pairs_from_samples, sample the pairs
        with the untrained model first, save them, and build the trainer on them."""
        from ..preference import sample_preference_pairs
        from ..trainer import FlowDPOTrainer

        trainer = super().build(script_args, training_args)  # online: the prompts and the rewards
        if not script_args.pairs_from_samples:
            return trainer
        pairs = sample_preference_pairs(trainer, trainer.train_dataset, script_args.pairs_from_samples,
                                        batch_size=training_args.per_device_train_batch_size,
                                        min_margin=script_args.pairs_min_margin, seed=training_args.seed)
        del trainer
        if len(pairs) == 0:
            raise ValueError(
                "No preference pair: every prompt's samples tie on the rewards (within --pairs_min_margin). Raise "
                "--pairs_from_samples, lower --pairs_min_margin, or use a reward that tells the samples apart."
            )
        gap = sum(c - r for c, r in zip(pairs["chosen_reward"], pairs["rejected_reward"])) / len(pairs)
        print(f"{len(pairs)} preference pairs from {script_args.pairs_from_samples} samples per prompt "
              f"(mean reward gap {gap:.3f})")
        trainer = build_trainer(FlowDPOTrainer, script_args, training_args, train_dataset=pairs)
        pairs.save_to_disk(str(Path(training_args.output_dir) / "preference_pairs"))
        return trainer


SCRIPT = DPOTrainerScript("dpo", "FlowDPOTrainer", "FlowDPOConfig", SHAPES_DPO_DEFAULTS, DPOScriptArguments)
make_parser, main, cli = SCRIPT.make_parser, SCRIPT.main, SCRIPT.cli


if __name__ == "__main__":
    cli()
